"""Static checks of the Slicer module without Slicer: the widget names the code uses exist in the .ui, every
SlicerParameterName binds to a parameter of the @parameterNodeWrapper class with a widget that can represent its
type, parameters the code reads exist, and the CMake lists name every script and resource.

The checkers return lists of problems; the tests also feed them broken copies to prove that they can fail."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "DRGS4DSlicer"
PY = MODULE / "DRGS4DSlicer.py"
UI = MODULE / "Resources" / "UI" / "DRGS4DSlicer.ui"

# which widget classes can bind which parameter kinds (Slicer's parameterNodeWrapper GUI connectors)
CONNECTORS = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"},
    "QSlider": {"int"}, "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "ctkDoubleSpinBox": {"float"},
    "QComboBox": {"choice", "enum"}, "ctkComboBox": {"choice", "enum"},
    "QLineEdit": {"str"}, "QTextEdit": {"str"}, "QLabel": {"str"},
    "ctkPathLineEdit": {"path"}, "ctkDirectoryButton": {"path"},
    "qMRMLNodeComboBox": {"node"}, "qMRMLSubjectHierarchyTreeView": {"node"},
}
WRAPPER_METHODS = {"connectGui", "disconnectGui", "connectParametersToGui", "parameterNode", "getValue", "setValue",
                   "isCached", "StartModify", "EndModify", "default", "allParameters"}


def parse_ui(text: str):
    """widgets {name: class}, bindings [(widget, class, parameter)], node types {widget: [types]}, scene receivers."""
    root = ET.fromstring(text)
    widgets, bindings, node_types = {}, [], {}
    for w in root.iter("widget"):
        name, cls = w.get("name"), w.get("class")
        widgets[name] = cls
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bindings.append((name, cls, p.findtext("string")))
            if p.get("name") == "nodeTypes":
                node_types[name] = [s.text for s in p.iter("string")]
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    return widgets, bindings, node_types, receivers, root


def _module_constants(tree: ast.Module) -> dict:
    """Evaluate simple module-level constant assignments (lists, dicts, comprehensions of literals)."""
    env = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                value = eval(compile(ast.Expression(node.value), "<const>", "eval"), {"__builtins__": {"range": range}},
                             dict(env))
            except Exception:  # noqa: BLE001 - not a plain constant
                continue
            for t in node.targets:
                env[t.id] = value
    return env


def _kind(annotation: ast.AST, constants: dict):
    """(kind, extra) of a wrapper annotation: kind in bool/int/float/str/path/node/choice."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        base, extras = elts[0], elts[1:]
        for extra in extras:
            if isinstance(extra, ast.Call) and getattr(extra.func, "id", "") == "Choice":
                choices = eval(compile(ast.Expression(extra.args[0]), "<choice>", "eval"), {}, dict(constants))
                return "choice", list(choices)
        return _kind(base, constants)
    if isinstance(annotation, ast.Name):
        if annotation.id in ("bool", "int", "float", "str"):
            return annotation.id, None
        if annotation.id.startswith("vtkMRML"):
            return "node", annotation.id
    if isinstance(annotation, ast.Attribute) and annotation.attr in ("Path", "PosixPath", "WindowsPath"):
        return "path", None
    return "other", ast.unparse(annotation)


def parse_module(text: str):
    """wrapper parameters {name: (kind, extra)}, self.ui names used, parameter names read through p / _parameterNode."""
    tree = ast.parse(text)
    constants = _module_constants(tree)
    params = None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            params = {s.target.id: _kind(s.annotation, constants) for s in node.body if isinstance(s, ast.AnnAssign)}
    ui_names, used_params = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if isinstance(v, ast.Attribute) and v.attr == "ui" and getattr(v.value, "id", "") == "self":
                ui_names.add(node.attr)
            if (isinstance(v, ast.Name) and v.id == "p") or (isinstance(v, ast.Attribute)
                                                             and v.attr == "_parameterNode"):
                used_params.add(node.attr)
    return params, ui_names, used_params


def check(py_text: str, ui_text: str) -> list[str]:
    problems = []
    widgets, bindings, node_types, receivers, root = parse_ui(ui_text)
    params, ui_names, used_params = parse_module(py_text)
    if params is None:
        return ["no @parameterNodeWrapper class in the module"]
    if root.find("widget").get("class") != "qMRMLWidget":
        problems.append("the top-level widget must be a qMRMLWidget (setMRMLScene)")
    for name in sorted(ui_names - set(widgets)):
        problems.append(f"self.ui.{name} is used in the code but there is no such widget in the .ui")
    seen = {}
    for widget, cls, param in bindings:
        if param not in params:
            problems.append(f"{widget}: SlicerParameterName '{param}' is not a parameter of the wrapper")
            continue
        if param in seen:
            problems.append(f"{widget} and {seen[param]} both bind '{param}'")
        seen[param] = widget
        kind, extra = params[param]
        if kind not in CONNECTORS.get(cls, set()):
            problems.append(f"{widget} ({cls}) cannot represent '{param}' of kind {kind}")
        if kind == "node":
            types = node_types.get(widget, [])
            if extra not in types:
                problems.append(f"{widget}: nodeTypes {types} do not include {extra}")
            if widget not in receivers:
                problems.append(f"{widget} is not connected to the mrmlSceneChanged signal")
    for name in sorted(used_params - set(params) - WRAPPER_METHODS):
        problems.append(f"the code reads parameter '{name}' that the wrapper does not define")
    return problems


def test_module_and_ui_agree():
    assert check(PY.read_text(), UI.read_text()) == []


def test_all_inputs_and_settings_are_bound():
    _, bindings, *_ = parse_ui(UI.read_text())
    bound = {p for _, _, p in bindings}
    for name in ("inputMode", "caseFolder", "fillFile", "maskFile", "geometryFile", "fillVolume", "maskVolume",
                 "views", "schedule", "iterations", "device", "previewInterval", "outputFolder", "threshold",
                 "pythonExecutable", "useExternalPython"):
        assert name in bound, name


@pytest.mark.parametrize("mutation, expected", [
    (("py", "self.ui.statusLabel", "self.ui.statusLabelTypo"), "statusLabelTypo"),
    (("ui", "<string>views</string>", "<string>viewCount</string>"), "'viewCount' is not a parameter"),
    (("ui", 'class="QSlider" name="viewsSlider"', 'class="QCheckBox" name="viewsSlider"'), "cannot represent"),
    (("py", "    nFrames: int = 0\n", ""), "reads parameter 'nFrames'"),
    (("ui", "<receiver>fillVolumeSelector</receiver>", "<receiver>nobody</receiver>"), "mrmlSceneChanged"),
])
def test_the_checker_can_fail(mutation, expected):
    where, old, new = mutation
    py, ui = PY.read_text(), UI.read_text()
    if where == "py":
        assert old in py
        py = py.replace(old, new, 1)
    else:
        assert old in ui
        ui = ui.replace(old, new, 1)
    problems = check(py, ui)
    assert any(expected in p for p in problems), problems


def test_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", text))
    present = {p.name for p in (MODULE / "DRGS4DSlicerLib").glob("*.py")}
    assert listed == present
    for rel in re.findall(r"(Resources/[\w/]+\.\w+)", text.replace("${MODULE_NAME}", "DRGS4DSlicer")):
        assert (MODULE / rel).is_file(), rel
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text
    top = (REPO / "CMakeLists.txt").read_text()
    for needle in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(DRGS4DSlicer)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})",
                   "EXTENSION_HOMEPAGE", "EXTENSION_DEPENDS"):
        assert needle in top, needle


def test_icon_is_a_real_128px_png():
    from PIL import Image

    path = MODULE / "Resources" / "Icons" / "DRGS4DSlicer.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        colors = im.convert("RGBA").getcolors(128 * 128)
        assert colors is None or len(colors) > 16  # a drawing, not a flat square


def test_lib_does_not_import_qt_or_the_app():
    for path in (MODULE / "DRGS4DSlicerLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert not re.match(r"^(qt|ctk|PythonQt|slicer\.app|__main__)\b", name), f"{path.name}: {name}"
                assert name not in ("slicer.app", "slicer.qSlicerApplication"), f"{path.name}: {name}"
