"""Every text the panel shows can be translated: it goes through ``_()`` (Slicer's ``tr``) in DRGS4DSlicer.py or
``protocol.tr`` in DRGS4DSlicerLib (which the module points at Slicer's ``tr``) as one whole sentence with named
``{placeholders}``, formatted after translation - never glued together with ``+`` or written as an f-string.

The scan reads the source with ``ast``.  Prose is a literal with two words or more.  Not shown to users, so exempt:
docstrings, log calls and log lines, node names (``_new_node``, ``_browse``), the self-test's progress texts, and
developer errors (ValueError & co.) - the few of those that do reach the panel are translated all the same.
"""

import ast
import re
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "DRGS4DSlicer"
SOURCES = [MODULE_DIR / "DRGS4DSlicer.py"] + sorted((MODULE_DIR / "DRGS4DSlicerLib").glob("*.py"))
PROSE = re.compile(r"[A-Za-z]{2,}[ ,;:]+[A-Za-z]{2,}")
TRANSLATE = {"_", "tr", "translate"}
LOGGING = {"log", "logging", "logger"}
EXEMPT_CALLS = {"_new_node", "_browse", "delayDisplay", "getLogger"}
DEVELOPER_ERRORS = {"ValueError", "KeyError", "TypeError", "FileNotFoundError", "ProtocolError", "TimeoutError",
                    "AssertionError", "NotImplementedError"}
SHOWN_CALLS = {"errorDisplay", "infoDisplay", "confirmOkCancelDisplay", "showStatusMessage", "InputProblem",
               "DependencyError", "RemoteError", "RuntimeError", "status", "ask", "addItem"}


def _name(func) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _literal_text(node) -> str:
    """The literal text of a str constant or of an f-string's fixed parts ('' for anything else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return ""


def _prose_in(node) -> bool:
    """A prose literal in ``node`` or in a ``+`` chain of it."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _prose_in(node.left) or _prose_in(node.right)
    if isinstance(node, ast.IfExp):
        return _prose_in(node.body) or _prose_in(node.orelse)
    return bool(PROSE.search(_literal_text(node)))


def _parents(tree) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _exempt(node, parents) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Expr) and isinstance(parent.value, ast.Constant):
            return True  # a docstring
        if isinstance(parent, ast.Call):
            name = _name(parent.func)
            owner = parent.func.value if isinstance(parent.func, ast.Attribute) else None
            if name in EXEMPT_CALLS or (isinstance(owner, ast.Name) and owner.id in LOGGING):
                return True
            if name in TRANSLATE:
                return False  # judged by the translation-call rule
        if isinstance(parent, ast.Raise) and isinstance(parent.exc, ast.Call) \
                and _name(parent.exc.func) in DEVELOPER_ERRORS:
            return True
        if isinstance(parent, ast.Dict):
            keys = [k.value for k in parent.keys if isinstance(k, ast.Constant)]
            if "line" in keys:  # a log line of the worker or the remote job
                return True
        node = parent
    return False


def violations(source: str, filename: str = "<source>") -> list:
    tree = ast.parse(source)
    parents = _parents(tree)
    found = []

    def report(node, why):
        found.append(f"{Path(filename).name}:{node.lineno}: {why}: {ast.get_source_segment(source, node)[:70]!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in TRANSLATE:
            args = node.args[1:] if _name(node.func) == "translate" and len(node.args) > 1 else node.args[:1]
            for arg in args:
                if isinstance(arg, (ast.JoinedStr, ast.BinOp, ast.Call)):
                    report(arg, "translated text built at run time (use a literal with {placeholders})")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _prose_in(node):
            if not isinstance(parents.get(node), ast.BinOp) and not _exempt(node, parents):
                report(node, "sentence glued with '+'")
        elif isinstance(node, ast.JoinedStr) and _prose_in(node) and not isinstance(parents.get(node), ast.BinOp):
            if not _exempt(node, parents):
                report(node, "f-string sentence (not translatable)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PROSE.search(node.value):
            parent = parents.get(node)
            widget_text = isinstance(parent, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr in ("text", "toolTip") for t in parent.targets)
            shown = (isinstance(parent, ast.Call) and _name(parent.func) in SHOWN_CALLS) or widget_text \
                or (isinstance(parent, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "message"
                                                         and v is node for k, v in zip(parent.keys, parent.values)))
            if shown and not _exempt(node, parents):
                report(node, "untranslated text shown in the panel")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_user_visible_text_is_translatable(path):
    assert violations(path.read_text(encoding="utf-8"), str(path)) == []


def test_the_scan_finds_what_it_must():
    """Each kind of untranslatable text once; the allowed forms pass."""
    bad = '''
def f(n, exc, ui):
    ui.label.text = "Found " + str(n) + " runs"
    ui.label.text = f"{n} frames of the run"
    raise InputProblem("The folder does not exist")
    event = {"event": "error", "message": f"remote server: {exc}"}
    ui.label.text = _(f"{n} frames of the run")
    ui.label.text = tr("Found {n} runs" + " today")
'''
    assert len(violations(bad)) == 6, violations(bad)
    good = '''
def f(n, exc, ui, log):
    """A docstring with words."""
    ui.label.text = _("Found {count} runs").format(count=n)
    ui.label.text = tr("Found {count} runs", count=n)
    log.warning(f"could not read {n} files")
    raise ValueError(f"not a valid run: {n}")
    event = {"event": "log", "line": f"cancel: {exc}"}
    ui.label.text = "\\n".join([tr("first line"), tr("second line")])
    node = self._new_node("vtkMRMLModelNode", f"{n} preview surface", "model")
'''
    assert violations(good) == []
