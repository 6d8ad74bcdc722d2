"""The extension as Slicer and the Extensions Index see it: every file Slicer imports works on Python 3.9 (Slicer 5.6 /
5.8 show the panel and a message there), the panel's mirrors of engine facts agree with the engine, the CMake lists
name every file, the metadata the index asks for is present."""

import ast
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "DRGS4DSlicer"
SLICER_FILES = [MODULE / "DRGS4DSlicer.py"] + sorted((MODULE / "DRGS4DSlicerLib").glob("*.py"))
OLDEST_PYTHON = (3, 9)  # Slicer 5.6 and 5.8


# ---- Python 3.9 ----------------------------------------------------------------------------------------------------

def annotation_problems(source: str, name: str = "<file>") -> list:
    """Syntax newer than 3.9, and ``X | Y`` in annotations that Python evaluates at run time (all of them unless the
    file has ``from __future__ import annotations``; in a @parameterNodeWrapper class even then, because the wrapper
    evaluates them with typing.get_type_hints)."""
    problems = []
    try:
        tree = ast.parse(source, feature_version=OLDEST_PYTHON)
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: not Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} syntax ({exc.msg})"]
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                    any(a.name == "annotations" for a in n.names) for n in tree.body)
    evaluated = []
    for node in ast.walk(tree):
        wrapped = isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", getattr(d, "attr", "")) == "parameterNodeWrapper" for d in node.decorator_list)
        if wrapped:
            evaluated += [s.annotation for s in node.body if isinstance(s, ast.AnnAssign)]
        if postponed:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            evaluated += [a.annotation for a in args if a is not None and a.annotation is not None]
            evaluated += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            evaluated.append(node.annotation)
    for annotation in evaluated:
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                problems.append(f"{name}:{sub.lineno}: '{ast.unparse(annotation)}' is evaluated at run time and "
                                "'X | Y' needs Python 3.10 (use Optional/Union)")
    return problems


def test_every_file_slicer_imports_is_python_39_syntax_and_annotations():
    problems = []
    for path in SLICER_FILES:
        problems += annotation_problems(path.read_text(), path.name)
    assert problems == []


@pytest.mark.parametrize("source, expected", [
    ("def f(x) -> str | None:\n    return x\n", "needs Python 3.10"),
    ("from __future__ import annotations\ndef f(x) -> str | None:\n    return x\n", None),
    ("from __future__ import annotations\n@parameterNodeWrapper\nclass P:\n    a: int | None = 0\n", "needs Python"),
    ("match x:\n    case 1:\n        pass\n", "syntax"),
])
def test_the_annotation_check_can_fail(source, expected):
    problems = annotation_problems(source)
    assert (expected is None and problems == []) or any(expected in p for p in problems), problems


def test_vermin_finds_no_library_use_newer_than_39():
    """Standard-library features (e.g. zip(strict=), itertools.pairwise) that 3.9 lacks; vermin is in the test extra."""
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e .[test])")
    done = subprocess.run([vermin, "--target=3.9-", "--no-tips", "--violations", "--eval-annotations",
                           *map(str, SLICER_FILES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _python39():
    """A working Python 3.9 interpreter on this machine, if any (pyenv shims may name one that cannot run)."""
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates = sorted(str(p) for p in pyenv.glob("3.9*/bin/python3.9")) if pyenv.is_dir() else []
    candidates += [c for c in (shutil.which("python3.9"),) if c]
    for candidate in candidates:
        try:
            done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                  capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if done.stdout.strip() == "True":
            return candidate
    return None


IMPORT_UNDER_39 = textwrap.dedent('''
    import importlib.abc, importlib.machinery, sys, types, typing

    class Anything(types.ModuleType):
        """A module where every name is a harmless class (qt, vtk, slicer, numpy ... are not installed here)."""
        __path__ = []
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})
            setattr(self, name, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        roots = ("qt", "vtk", "slicer", "numpy", "ctk")
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in self.roots:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
        def create_module(self, spec):
            return Anything(spec.name)
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    import slicer.parameterNodeWrapper as pnw
    def parameterNodeWrapper(cls):
        typing.get_type_hints(cls, include_extras=True)  # what Slicer's wrapper does first
        return cls
    pnw.parameterNodeWrapper = parameterNodeWrapper
    import slicer.i18n
    slicer.i18n.tr = lambda text: text
    sys.path.insert(0, sys.argv[1])
    import DRGS4DSlicer
    assert DRGS4DSlicer.engineRunsInThisPython() is False
    print("imported" if "needs Python 3.10" in DRGS4DSlicer.pythonTooOldMessage() else "no message")
''')


def test_the_module_imports_under_a_real_python_39(tmp_path):
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 on this machine (the AST check above covers the syntax)")
    script = tmp_path / "import39.py"
    script.write_text(IMPORT_UNDER_39)
    done = subprocess.run([python, str(script), str(MODULE)], capture_output=True, text=True, timeout=120,
                          env=dict({k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
                                   PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stdout + done.stderr[-3000:]


def test_supported_versions_are_stated_once_and_agree():
    setup = (REPO / "setup.py").read_text()
    assert 'python_requires=">=3.10"' in setup
    module = (MODULE / "DRGS4DSlicer.py").read_text()
    assert "ENGINE_MIN_PYTHON = (3, 10)" in module
    readme = (REPO / "README.md").read_text()
    matrix = readme[readme.index("| Slicer |"):]
    for row in ("| 5.12", "| 5.10", "| 5.8", "| 5.6"):
        assert row in matrix
    assert "slicer.packaging" not in readme or "5.12" in readme[readme.index("slicer.packaging") - 300:
                                                                readme.index("slicer.packaging") + 300]


# ---- mirrors of engine facts ---------------------------------------------------------------------------------------

def test_panel_stage_names_mirror_the_engine():
    from drgs_core.stages import STAGES
    from DRGS4DSlicerLib import protocol

    assert protocol.STAGES == STAGES


def test_panel_request_keys_are_reconstruct_config_fields():
    from dataclasses import fields

    from drgs_core.pipeline import ReconstructConfig
    from DRGS4DSlicerLib.job import REQUEST_KEYS

    assert set(REQUEST_KEYS) <= {f.name for f in fields(ReconstructConfig)}


def test_panel_worker_protocol_version_matches():
    from drgs_core import worker
    from DRGS4DSlicerLib import protocol

    assert protocol.PROTOCOL_VERSION == worker.PROTOCOL_VERSION


def test_demo_phantom_for_sample_data(tmp_path, worker_env, monkeypatch):
    """The SampleData entry's downloader asks the worker for the tiny phantom: no file is downloaded."""
    pytest.importorskip("torch")
    from DRGS4DSlicerLib import process, selftest

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    event = process.run_worker_command(selftest.phantom_command(tmp_path / "demo"), timeout=300)
    assert event["event"] == "phantom", event
    case = json.loads((Path(event["case"]) / "transforms.json").read_text())
    assert len(case["frames"]) == selftest.TINY_PHANTOM["n_frames"]


# ---- CMake, metadata, files ----------------------------------------------------------------------------------------

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
                   "EXTENSION_HOMEPAGE", 'set(EXTENSION_DEPENDS "PyTorch")'):
        assert needle in top, needle


def test_extension_index_metadata():
    top = (REPO / "CMakeLists.txt").read_text()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', top).group(1)
    for person in contributors.split(","):
        assert re.fullmatch(r"\s*[^()]+ \([^()]+\)\s*", person), person  # "Name (Organisation)"
    assert re.search(r'set\(EXTENSION_SCREENSHOTURLS "https://\S+\.png"\)', top)
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'set(EXTENSION_LICENSE' not in top or "Apache" in top
    module = (MODULE / "DRGS4DSlicer.py").read_text()
    assert "DOCUMENTATION_URL" in module and 'href="{url}"' in module
    assert re.search(r'contributors = \["[^"(]+ \([^)]+\)"', module)
    # the help's link lands on the README's Slicer section (GitHub's heading anchor), in the homepage's repository
    url = re.search(r'DOCUMENTATION_URL = "([^"]+)"', module).group(1)
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]+)', top).group(1)
    assert url.startswith(homepage + "#")
    headings = re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    assert url.split("#", 1)[1] in anchors
    assert "Apache-2.0" in module and "IPMI 2025" in module  # acknowledgement: licence and the method's paper


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


def test_user_visible_strings_are_translatable_without_concatenation():
    """In the module file: no ``_("...") + ...`` and no f-string inside ``_()`` (translators need whole sentences
    with named placeholders)."""
    tree = ast.parse((MODULE / "DRGS4DSlicer.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side in (node.left, node.right):
                assert not (isinstance(side, ast.Call) and getattr(side.func, "id", "") == "_"), ast.unparse(node)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_":
            assert node.args and isinstance(node.args[0], ast.Constant), ast.unparse(node)


def test_ui_names_used_by_the_code_exist():
    import xml.etree.ElementTree as ET

    widgets = {w.get("name") for w in ET.parse(MODULE / "Resources" / "UI" / "DRGS4DSlicer.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "DRGS4DSlicer.py").read_text()))
    assert used - widgets == set()
