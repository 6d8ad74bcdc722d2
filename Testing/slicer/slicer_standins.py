"""Stand-ins for the pieces of the Slicer application that slicer-core lacks (Qt widgets, the module base classes, the
parameter-node wrapper), so that DRGS4DSlicer.py - Widget included - runs under pytest with the real MRML classes.

The parameter-node wrapper stand-in binds widgets by the rules of Slicer's own GUI connectors
(Base/Python/slicer/parameterNodeWrapper/guiConnectors.py) at each supported release, written below as data:
which widget class can show which value type, and what the annotation must then carry.  They were read from
Slicer/Slicer at the tags v5.6.0, v5.8.0, v5.10.0 and v5.12.0 (5.12's file is the same as 5.10's).  Like Slicer,
a widget is matched by its exact class, and ``connectGui`` raises (connecting nothing) if any binding breaks a rule.
No Slicer code is copied; the behaviour the module relies on is re-stated: values are written to the widgets on
connect and on every Modified event of the node, and a widget's change signal writes the parameter.
"""

from __future__ import annotations

import enum
import pathlib
import time
import types
import typing
import xml.etree.ElementTree as ET

import vtk

# ---- the connector rules -----------------------------------------------------------------------------------------
# value kinds: bool, int, float, str, path, node, range (FloatRange), color (QColor), enum
# needs: "bounded"  - WithinRange, or both Minimum and Maximum ("... where the float types is unbounded")
#        "choice"   - a Choice annotation ("requires the Choice annotation")
#        "range"    - RangeBounds (range widgets)
STRINGABLE = ("int", "float", "str", "bool")
RULES_5_6 = {
    "QCheckBox": {"bool": None},
    "QPushButton": {"bool": None},
    "QSlider": {"int": "bounded"},
    "QSpinBox": {"int": None},
    "QDoubleSpinBox": {"float": None},
    "ctkSliderWidget": {"float": "bounded"},
    "qMRMLSliderWidget": {"float": "bounded"},
    "QComboBox": dict({k: "choice" for k in STRINGABLE}, enum=None),
    "QLineEdit": {"str": None},
    "QTextEdit": {"str": None},
    "ctkRangeWidget": {"range": "range"},
    "ctkPathLineEdit": {"path": None},
    "ctkDirectoryButton": {"path": None},
    "qMRMLNodeComboBox": {"node": None},
}
RULES_5_8 = dict(RULES_5_6, **{
    "ctkCheckBox": {"bool": None},
    "ctkDoubleSlider": {"float": None},
    "ctkDoubleSpinBox": {"float": None},
    "qMRMLSpinBox": {"float": None},
    "ctkComboBox": dict({k: "choice" for k in STRINGABLE}, enum=None),
    "QLabel": {"str": None},
    "ctkDoubleRangeSlider": {"range": "range"},
    "qMRMLRangeWidget": {"range": "range"},
})
# 5.10: the float connector also takes int parameters (same widgets, same bounds rule); two new widgets
RULES_5_10 = dict(RULES_5_8, **{
    name: dict(RULES_5_8[name], int=RULES_5_8[name]["float"])
    for name in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
                 "qMRMLSpinBox")
}, **{
    "ctkCheckablePushButton": {"bool": None},
    "ctkColorPickerButton": {"color": None},
})
CONNECTOR_RULES = {"5.6": RULES_5_6, "5.8": RULES_5_8, "5.10": RULES_5_10, "5.12": RULES_5_10}
SUPPORTED_VERSIONS = tuple(CONNECTOR_RULES)


# ---- validators (the annotations the module uses) ----------------------------------------------------------------

class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Decimals:
    def __init__(self, value):
        self.value = value


def _split(hint):
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, extras
    return hint, []


def _first(extras, cls):
    return next((e for e in extras if isinstance(e, cls)), None)


def _kind(base) -> str:
    if base in (bool, int, float, str):
        return base.__name__
    if isinstance(base, type) and issubclass(base, pathlib.PurePath):
        return "path"
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "enum"
    if getattr(base, "__name__", "").startswith("vtkMRML"):
        return "node"
    return getattr(base, "__name__", str(base))


# ---- Qt widget stand-ins -----------------------------------------------------------------------------------------

class FakeWidget:
    """A widget from the .ui: properties, PythonQt-style ``connect("signal(args)", slot)``, visibility, enabled."""

    def __init__(self, cls: str, name: str, props: dict):
        self.__dict__["_cls"] = cls
        self.__dict__["_props"] = dict(props)
        self.__dict__["_slots"] = {}
        self.__dict__["_blocked"] = False
        self.__dict__["objectName"] = name
        self.__dict__["enabled"] = True
        self.__dict__["visible"] = True
        self.__dict__["text"] = props.get("text", "")
        self.__dict__["toolTip"] = props.get("toolTip", "")

    def property(self, name):
        return self._props.get(name)

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal.split("(")[0], []).append(slot)

    def disconnect(self, signal: str, slot) -> None:
        self._slots.get(signal.split("(")[0], []).remove(slot)

    def emit(self, signal: str, *args) -> None:
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args)

    def blockSignals(self, block: bool) -> bool:
        old = self._blocked
        self.__dict__["_blocked"] = bool(block)
        return old

    def setVisible(self, visible):
        self.__dict__["visible"] = bool(visible)

    def setEnabled(self, enabled):
        self.__dict__["enabled"] = bool(enabled)

    def setMRMLScene(self, scene):
        self.__dict__["mrmlScene"] = scene

    def clear(self):
        self.__dict__["text"] = ""

    def appendPlainText(self, line):
        self.__dict__["text"] = (self.text + "\n" + line) if self.text else line


class FakeRangeWidget(FakeWidget):
    """QSlider, QSpinBox, ctkSliderWidget: a value clamped to [minimum, maximum]; valueChanged on change."""

    def __init__(self, cls, name, props):
        super().__init__(cls, name, props)
        integer = cls in ("QSlider", "QSpinBox")
        self.__dict__.update(minimum=float(props.get("minimum", 0)), maximum=float(props.get("maximum", 99)),
                             _value=float(props.get("value", 0)), _integer=integer,
                             singleStep=props.get("singleStep", 1))

    def _set(self, value):
        value = min(max(float(value), self.minimum), self.maximum)
        if self._integer:
            value = float(round(value))
        if value != self._value:
            self.__dict__["_value"] = value
            self.emit("valueChanged", self.value)

    @property
    def value(self):
        return int(self._value) if self._integer else self._value

    def __setattr__(self, name, value):
        if name == "value":
            self._set(value)
        elif name in ("minimum", "maximum"):
            self.__dict__[name] = float(value)
            self._set(self._value)  # Qt clamps the value into the new range (and signals)
        else:
            self.__dict__[name] = value

    def setRange(self, lo, hi):
        self.__dict__["minimum"], self.__dict__["maximum"] = float(lo), float(hi)
        self._set(self._value)

    def setMinimum(self, lo):
        self.minimum = lo

    def setMaximum(self, hi):
        self.maximum = hi


class FakeCheckBox(FakeWidget):
    @property
    def checked(self):
        return self.__dict__.get("_checked", False)

    def __setattr__(self, name, value):
        if name == "checked":
            if bool(value) != self.checked:
                self.__dict__["_checked"] = bool(value)
                self.emit("stateChanged", 2 if value else 0)
                self.emit("toggled", bool(value))
        else:
            self.__dict__[name] = value


class FakeComboBox(FakeWidget):
    def __init__(self, cls, name, props):
        super().__init__(cls, name, props)
        self.__dict__.update(_items=[], _index=-1)

    @property
    def currentIndex(self):
        return self._index

    @property
    def count(self):
        return len(self._items)

    @property
    def currentText(self):
        return self._items[self._index][0] if self._index >= 0 else ""

    def __setattr__(self, name, value):
        if name == "currentIndex":
            value = int(value) if 0 <= int(value) < len(self._items) else -1
            if value != self._index:
                self.__dict__["_index"] = value
                self.emit("currentIndexChanged", value)
        else:
            self.__dict__[name] = value

    def addItem(self, text, data=None):
        self._items.append((str(text), data))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self):
        self.__dict__["_items"] = []
        self.currentIndex = -1

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def itemData(self, index):
        return self._items[index][1] if 0 <= index < len(self._items) else None


class FakePathLineEdit(FakeWidget):
    @property
    def currentPath(self):
        return self.__dict__.get("_path", "")

    def __setattr__(self, name, value):
        if name == "currentPath":
            if str(value) != self.currentPath:
                self.__dict__["_path"] = str(value)
                self.emit("currentPathChanged", str(value))
        else:
            self.__dict__[name] = value


class FakeNodeComboBox(FakeWidget):
    def currentNode(self):
        return self.__dict__.get("_node")

    def setCurrentNode(self, node):
        if node is not self.currentNode():
            self.__dict__["_node"] = node
            self.emit("currentNodeChanged", node)


WIDGET_CLASSES = {"QSlider": FakeRangeWidget, "QSpinBox": FakeRangeWidget, "ctkSliderWidget": FakeRangeWidget,
                  "QCheckBox": FakeCheckBox, "ctkCheckBox": FakeCheckBox, "QComboBox": FakeComboBox,
                  "ctkComboBox": FakeComboBox, "ctkPathLineEdit": FakePathLineEdit,
                  "qMRMLNodeComboBox": FakeNodeComboBox}


def _property_value(prop: ET.Element):
    for child in prop:
        if child.tag in ("number", "double"):
            return float(child.text)
        if child.tag == "string":
            return child.text or ""
        if child.tag == "bool":
            return child.text == "true"
        if child.tag == "stringlist":
            return [s.text for s in child]
    return None


def load_ui(path) -> tuple[FakeWidget, dict]:
    """Every widget of a .ui file as a stand-in: (root widget, {objectName: widget})."""
    root = ET.parse(path).getroot().find("widget")
    widgets = {}
    for element in root.iter("widget"):
        props = {p.get("name"): _property_value(p) for p in element.findall("property")}
        cls = element.get("class")
        widgets[element.get("name")] = WIDGET_CLASSES.get(cls, FakeWidget)(cls, element.get("name"), props)
    return widgets[root.get("name")], widgets


class FakeTimer:
    def __init__(self):
        self.active, self.interval, self.slots = False, None, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class FakeSettings:
    """qt.QSettings over one dict per imported module (``qt_module().settings``): the application settings."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


def qt_module():
    settings = type("QSettings", (FakeSettings,), {"store": {}})
    return types.SimpleNamespace(QTimer=FakeTimer, QSettings=settings, settings=settings.store)


# ---- the parameter-node wrapper ----------------------------------------------------------------------------------

class Connector:
    """A widget bound to one parameter under one version's rules (read/write/on-change of the widget)."""

    SIGNALS = {"FakeRangeWidget": "valueChanged", "FakeCheckBox": "stateChanged", "FakeComboBox": "currentIndexChanged",
               "FakePathLineEdit": "currentPathChanged", "FakeNodeComboBox": "currentNodeChanged"}

    def __init__(self, widget, name, hint, rules):
        base, extras = _split(hint)
        kind = _kind(base)
        cls = widget._cls
        need = rules.get(cls, {}).get(kind, "missing")
        if need == "missing":
            raise RuntimeError(f"Unable to create GUI connector from datatype '{hint}' to widget type '{cls}'")
        within, lo, hi = _first(extras, WithinRange), _first(extras, Minimum), _first(extras, Maximum)
        if need == "bounded" and within is None and (lo is None or hi is None):
            raise RuntimeError(f"Cannot have a connection to {cls} where the {kind} type is unbounded ({name})")
        choice = _first(extras, Choice)
        if need == "choice" and choice is None:
            raise RuntimeError(f"{cls} for '{name}' requires the Choice annotation")
        self.widget, self.name, self.base, self.kind, self.callback = widget, name, base, kind, None
        self.choices = choice.choices if choice is not None else None
        if isinstance(widget, FakeRangeWidget):
            if within is not None:
                widget.setRange(within.minimum, within.maximum)
            else:  # an unbounded int spin box gets the full 32-bit range, a float one +-inf
                unbounded = (-(2 ** 31), 2 ** 31 - 1) if widget._integer else (float("-inf"), float("inf"))
                widget.setRange(lo.minimum if lo else unbounded[0], hi.maximum if hi else unbounded[1])
        if isinstance(widget, FakeComboBox):
            widget.clear()
            for c in self.choices:
                widget.addItem(str(c))
        if isinstance(widget, FakeNodeComboBox):
            widget.nodeTypes = [base.__name__]
        self.signal = self.SIGNALS[type(widget).__name__]

    def read(self):
        w = self.widget
        if isinstance(w, FakeRangeWidget):
            return int(w.value) if self.kind == "int" else float(w.value)
        if isinstance(w, FakeCheckBox):
            return w.checked
        if isinstance(w, FakeComboBox):
            return self.choices[w.currentIndex]
        if isinstance(w, FakePathLineEdit):
            return self.base(w.currentPath)
        return w.currentNode()

    def write(self, value):
        w = self.widget
        if isinstance(w, FakeRangeWidget):
            w.value = value
        elif isinstance(w, FakeCheckBox):
            w.checked = value
        elif isinstance(w, FakeComboBox):
            if value not in self.choices:
                raise ValueError(f"Unable to find value {value} in choices {self.choices}")
            w.currentIndex = self.choices.index(value)
        elif isinstance(w, FakePathLineEdit):
            w.currentPath = str(value)
        else:
            w.setCurrentNode(value)

    def on_changed(self, callback):
        if self.callback is not None:
            self.widget.disconnect(self.signal, self.callback)
        self.callback = callback
        if callback is not None:
            self.widget.connect(self.signal, callback)


def parameter_node_wrapper_module(version: str, connections: list | None = None):
    """A ``slicer.parameterNodeWrapper`` stand-in enforcing the connector rules of Slicer ``version``.

    Values live in the MRML node (parameters and node references), so every wrapper of the same node sees them, and
    changing one fires the node's ModifiedEvent, as in Slicer.  ``connections`` (if given) collects every
    (parameter, widget) binding made, for the tests.
    """
    rules = CONNECTOR_RULES[version]

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)  # as Slicer does: annotations evaluated here
        defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}

        def default_of(name):
            if name in defaults:
                return defaults[name]
            kind = _kind(_split(hints[name])[0])
            return {"path": pathlib.Path(), "node": None, "bool": False, "int": 0, "float": 0.0, "str": ""}[kind]

        class Wrapper:
            __doc__ = cls.__doc__
            allParameters = dict(hints)

            def __init__(self, node):
                object.__setattr__(self, "parameterNode", node)
                object.__setattr__(self, "_guis", {})
                object.__setattr__(self, "_next_tag", 0)
                object.__setattr__(self, "_updating", False)
                object.__setattr__(self, "_observed", False)
                for name in hints:
                    if _kind(_split(hints[name])[0]) != "node" and not node.GetParameter(name):
                        self._store(name, default_of(name))

            # values
            def _store(self, name, value):
                kind = _kind(_split(hints[name])[0])
                node = self.parameterNode
                if kind == "node":
                    node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                    return
                for check in _split(hints[name])[1]:
                    if isinstance(check, Choice) and value not in check.choices:
                        raise ValueError(f"{name}: {value!r} is not one of {check.choices}")
                    if isinstance(check, WithinRange) and not check.minimum <= value <= check.maximum:
                        raise ValueError(f"{name}: {value!r} is not within [{check.minimum}, {check.maximum}]")
                node.SetParameter(name, repr(value) if kind in ("int", "float", "bool") else str(value))

            def getValue(self, name):
                base = _split(hints[name])[0]
                kind = _kind(base)
                node = self.parameterNode
                if kind == "node":
                    return node.GetNodeReference(name)
                text = node.GetParameter(name)
                if kind == "bool":
                    return text == "True"
                if kind in ("int", "float"):
                    return base(float(text)) if kind == "float" else int(text)
                return base(text)

            def setValue(self, name, value):
                self._store(name, value)

            def __getattr__(self, name):
                if name in hints:
                    return self.getValue(name)
                raise AttributeError(name)

            def __setattr__(self, name, value):
                if name not in hints:
                    raise AttributeError(f"'{cls.__name__}' has no parameter '{name}'")
                self.setValue(name, value)

            def dataType(self, name):
                return hints[name]

            # observation (delegated to the node, as VTKObservationMixin expects)
            def AddObserver(self, event, callback, priority=0.0):
                return self.parameterNode.AddObserver(event, callback, priority)

            def RemoveObserver(self, tag):
                self.parameterNode.RemoveObserver(tag)

            # GUI
            def connectGui(self, gui):
                bindings = {w.property("SlicerParameterName"): w for w in vars(gui).values()
                            if isinstance(w, FakeWidget) and w.property("SlicerParameterName")}
                for name in bindings:
                    if name not in hints:
                        raise ValueError(f"'{name}' is not a parameter of {cls.__name__}")
                made = {name: Connector(w, name, hints[name], rules) for name, w in bindings.items()}
                tag = self._next_tag
                object.__setattr__(self, "_next_tag", tag + 1)
                self._guis[tag] = made
                for name, connector in made.items():
                    connector.write(self.getValue(name))
                    connector.on_changed(self._gui_to_param(name, connector))
                    if connections is not None:
                        connections.append((name, connector.widget))
                if not self._observed:
                    object.__setattr__(self, "_observed", True)
                    self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: self._param_to_gui())
                return tag

            def disconnectGui(self, tag):
                for connector in self._guis.pop(tag, {}).values():
                    connector.on_changed(None)

            def _gui_to_param(self, name, connector):
                def callback(*args):
                    if not self._updating:
                        self.setValue(name, connector.read())
                return callback

            def _param_to_gui(self):
                if self._updating:
                    return
                object.__setattr__(self, "_updating", True)
                try:
                    for made in list(self._guis.values()):
                        for name, connector in made.items():
                            connector.write(self.getValue(name))
                finally:
                    object.__setattr__(self, "_updating", False)

        Wrapper.__name__ = cls.__name__
        return Wrapper

    mod = types.ModuleType("slicer.parameterNodeWrapper")
    mod.parameterNodeWrapper = parameterNodeWrapper
    mod.Choice, mod.Minimum, mod.Maximum = Choice, Minimum, Maximum
    mod.WithinRange, mod.Decimals = WithinRange, Decimals
    return mod


# ---- Slicer's DICOM database -----------------------------------------------------------------------------------
# What the panel relies on, read from commontk/CTK at 868d56c (Libs/DICOM/Core: ctkDICOMDatabase.h, .cpp and
# Resources/dicom-schema.sql, schema 0.8.1): the Q_PROPERTYs isOpen, isInMemory, databaseFilename and
# databaseDirectory of ctkDICOMDatabase; in its SQLite file the tables Series (SeriesInstanceUID, Modality) and Images
# (SOPInstanceUID, Filename, SeriesInstanceUID); Filename is relative to databaseDirectory for files inside it
# (ctk::internalPathFromAbsolute), absolute otherwise, and empty for entries known only by URL.
CTK_DICOM_TABLES = {"Series": ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "InsertTimestamp"),
                    "Images": ("SOPInstanceUID", "Filename", "URL", "SeriesInstanceUID", "InsertTimestamp")}


class FakeDicomDatabase:
    """A ctkDICOMDatabase stand-in over a real SQLite file with the columns above.  ``series``: {series uid:
    (modality, [files])}; files under ``folder`` are stored relative to it, as CTK does.  Calling any other method
    (the Qt API the panel must not use, as it would run in the main thread) fails."""

    def __init__(self, folder, series, open_=True):
        import sqlite3

        self.databaseDirectory = str(folder)
        self.databaseFilename = str(pathlib.Path(folder) / "ctkDICOM.sql")
        self.isOpen, self.isInMemory = open_, False
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.databaseFilename) as db:
            for table, columns in CTK_DICOM_TABLES.items():
                db.execute("CREATE TABLE '{}' ({})".format(table, ", ".join(f"'{c}' VARCHAR NULL" for c in columns)))
            for number, (uid, (modality, files)) in enumerate(series.items()):
                db.execute("INSERT INTO Series VALUES (?, ?, ?, ?)", (uid, "1.2.3", modality, "2026"))
                for k, name in enumerate(files):
                    path = pathlib.Path(name)
                    stored = str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
                    db.execute("INSERT INTO Images VALUES (?, ?, ?, ?, ?)", (f"{uid}.{k}", stored, None, uid, "2026"))

    def __getattr__(self, name):
        raise AssertionError(f"the panel called ctkDICOMDatabase.{name} in the main thread")


# ---- the PyTorch extension's PyTorchUtils ------------------------------------------------------------------------
# What the panel relies on, read from fepegar/SlicerPyTorch at e1c85cc (main; PyTorchUtils/PyTorchUtils.py):
# - ``PyTorchUtils.PyTorchUtilsLogic()`` takes no arguments.
# - ``torchInstalled()`` is a staticmethod returning a bool: torch's distribution metadata exists and ``import torch``
#   works (a broken torch can raise from the import instead).
# - ``installTorch(askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
#   torchvisionVersionRequirement=None)``, only these parameters.  The requirement strings are appended to the
#   package names ("torch" + torchVersionRequirement), so they are bare specifiers such as ">=2.1".  light-the-torch
#   installs torch and torchvision for the computation backend it detects (the NVIDIA driver's CUDA, else CPU) unless
#   one is forced.  With askConfirmation the user is asked, and declining returns None; otherwise the imported torch
#   module is returned, and a failed installation raises (it does not return None).
PYTORCH_UTILS_SOURCE = "fepegar/SlicerPyTorch@e1c85cc0a62e92fa6c38223cd88c611906adb60e"


def pytorch_utils_module(installed=False, confirm=True, failure=None):
    """A ``PyTorchUtils`` module stand-in with the behaviour above.  ``installs`` records the light-the-torch argument
    lists; ``failure`` (an exception) is raised by the installation."""
    from packaging.requirements import Requirement

    module = types.ModuleType("PyTorchUtils")
    module.installs = []
    state = {"installed": installed}

    class PyTorchUtilsLogic:
        def __init__(self):
            self._torch = None

        @staticmethod
        def torchInstalled():
            return state["installed"]

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            args = ["install", "torch" + (torchVersionRequirement or ""),
                    "torchvision" + (torchvisionVersionRequirement or "")]
            for text, name in zip(args[1:], ("torch", "torchvision")):
                if Requirement(text).name != name:  # e.g. "torchtorch>=2.1" from a whole requirement
                    raise ValueError(f"light-the-torch would install {text!r}")
            if forceComputationBackend is not None:
                args.append(f"--pytorch-computation-backend={forceComputationBackend}")
            if askConfirmation and not confirm:
                return None
            module.installs.append(args)
            if failure is not None:
                raise failure
            state["installed"] = True
            return types.SimpleNamespace(__version__="2.7.1+cu128")

    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    return module


# ---- importing the module -----------------------------------------------------------------------------------------

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2] / "DRGS4DSlicer"


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name, result=None):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result() if callable(result) else result
        return record

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def load_module(monkeypatch, scene, tmp_path, version, module_dir=None, answer=True):
    """Import DRGS4DSlicer.py (from ``module_dir``) with the stand-ins of Slicer ``version``."""
    import importlib
    import sys

    import slicer

    module_dir = module_dir or MODULE_DIR
    record = Recorder()
    connections = []
    monkeypatch.setitem(sys.modules, "qt", qt_module())
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", parameter_node_wrapper_module(version,
                                                                                                    connections))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted_loadable_module(module_dir))
    app = types.SimpleNamespace(temporaryPath=str(tmp_path / "slicer-tmp"), defaultScenePath=str(tmp_path),
                                processEvents=lambda: None, connect=record("app.connect"))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
    children = {}

    def loadUI(path):
        root, widgets = load_ui(path)
        children.update({k: v for k, v in widgets.items() if v is not root})
        return root

    util = slicer.util
    monkeypatch.setattr(util, "loadUI", loadUI, raising=False)
    monkeypatch.setattr(util, "childWidgetVariables", lambda root: types.SimpleNamespace(**children), raising=False)
    for name in ("setSliceViewerLayers", "errorDisplay", "infoDisplay", "showStatusMessage", "selectModule"):
        monkeypatch.setattr(util, name, record(name), raising=False)
    monkeypatch.setattr(util, "confirmOkCancelDisplay", record("confirm", lambda: answer), raising=False)
    monkeypatch.setattr(util, "WaitCursor", lambda: __import__("contextlib").nullcontext(), raising=False)
    monkeypatch.syspath_prepend(str(module_dir))
    sys.modules.pop("DRGS4DSlicer", None)
    module = importlib.import_module("DRGS4DSlicer")
    monkeypatch.setattr(module.DRGS4DSlicerLogic, "showVolumeRendering",
                        staticmethod(record("showVolumeRendering")))
    module._record, module._connections = record, connections
    return module



# ---- the module base classes -------------------------------------------------------------------------------------

def scripted_loadable_module(module_dir):
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(widgets=[], addWidget=lambda w: self.layout.widgets.append(w))

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(pathlib.Path(module_dir) / "Resources" / relative)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            import slicer

            node = slicer.mrmlScene.GetSingletonNode("DRGS4DSlicer", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("DRGS4DSlicer")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    return mod


def tick_until(widget, done, timeout: float = 240.0, wait_limit: float | None = None) -> list:
    """Run the panel's timer (``onPollWorker``, as Slicer's QTimer would) until ``done()``; returns the main-thread
    CPU time of every tick (s).  wait_limit: also bound each tick's wall time (a handler must not wait idly)."""
    durations, deadline = [], time.monotonic() + timeout
    while not done():
        t0, w0 = time.thread_time(), time.perf_counter()  # CPU time of this (the main) thread: stable when busy
        widget.onPollWorker()
        durations.append(time.thread_time() - t0)
        if wait_limit is not None:
            assert time.perf_counter() - w0 < wait_limit
        assert time.monotonic() < deadline, widget.ui.statusLabel.text
        time.sleep(0.01)
    return durations
