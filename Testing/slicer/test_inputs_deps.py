"""inputs.py (case description, readable errors, exporting scene volumes) and deps.py (first-use install)."""

import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from DRGS4DSlicerLib import deps, inputs
from slicer_standins import pytorch_utils_module

REPO = Path(__file__).resolve().parents[2]


# ---- inputs ------------------------------------------------------------------------------------------------------

def test_readable_errors_never_show_tracebacks():
    from drgs_core.errors import DRGSInputError

    e = DRGSInputError("views > frames", "40", "at most 30", "lower the slider")
    assert inputs.readable_error(e) == str(e)
    assert inputs.readable_error(FileNotFoundError(2, "No such file", "/x/fill.nii.gz")).startswith(
        "File not found: /x/fill.nii.gz")
    missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert "torch" in inputs.readable_error(missing) and "install" in inputs.readable_error(missing)
    assert inputs.readable_error(RuntimeError("boom")) == "RuntimeError: boom"


def test_input_request_validation(tmp_path):
    assert inputs.input_request(case=str(tmp_path)) == {"case": str(tmp_path)}
    with pytest.raises(inputs.InputProblem, match="does not exist"):
        inputs.input_request(case=str(tmp_path / "nope"))
    with pytest.raises(inputs.InputProblem, match="mask run, geometry JSON"):
        inputs.input_request(fill=str(tmp_path))
    f = tmp_path / "f.nii.gz"
    f.write_bytes(b"")
    with pytest.raises(inputs.InputProblem, match="geometry JSON file does not exist"):
        inputs.input_request(fill=str(f), mask=str(f), geometry=str(tmp_path / "g.json"))


def test_describe_reports_engine_input_errors_readably(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    (case / "transforms.json").write_text("{}")
    with pytest.raises(inputs.InputProblem) as info:
        inputs.describe_inputs({"case": str(case)})
    assert "Traceback" not in str(info.value) and str(info.value)


def test_describe_through_the_worker_matches_the_engine(tmp_path):
    """A small case written with the engine's own writer, described in-process and through --describe."""
    from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
    from drgs_core.io import Case, write_case

    n, h, w = 6, 8, 10
    geo = ConeBeamGeometry(750.0, 1200.0, (h, w), (0.5, 0.6), np.linspace(-1.0, 1.0, n))
    case = Case(dsa=np.ones((n, h, w), np.float32), geometry=geo, grid=VolumeGrid((4, 5, 6), (2.0, 2.0, 2.0)),
                name="tiny")
    folder = tmp_path / "tiny"
    write_case(case, folder)
    from drgs_core import worker

    raw = {"case": str(folder), "detector_binning": 1}  # describe reads as a run does: binning applies
    local = worker.summarize_case(worker.load_case_for_request(raw))
    remote = inputs.describe_inputs(raw, python=sys.executable, external=True)
    assert remote == inputs.describe_inputs(raw)  # Slicer's own interpreter, here this one
    assert inputs.describe_inputs({"case": str(folder)})["detector_shape"] == [h // 2, w // 2]  # "auto" bins 2x2
    assert local["n_frames"] == remote["n_frames"] == n
    assert local["detector_shape"] == [h, w] and local["volume_resolution"] == [4, 5, 6]
    assert local["primary_deg"] == pytest.approx([np.degrees(-1.0), np.degrees(1.0)])
    text = inputs.format_summary(local)
    assert "6 frames" in text and "10 × 8 pixels" in text and "4 × 5 × 6 voxels" in text
    with pytest.raises(inputs.InputProblem):
        inputs.describe_inputs({"case": str(tmp_path / "nope")}, python=sys.executable, external=True)


def test_export_scene_volume_keeps_the_stack_order(scene, tmp_path):
    """A scene volume is snapshotted (no copy) and written from another thread; the engine reads the same stack."""
    slicer = pytest.importorskip("slicer")
    import threading

    import SimpleITK as sitk

    stack = np.random.default_rng(0).random((7, 5, 6)).astype(np.float32)  # [N, H, W]
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fill")
    slicer.util.updateVolumeFromArray(node, stack)
    node.SetSpacing(0.3, 0.4, 1.0)
    node.SetOrigin(10.0, -20.0, 5.0)
    snapshot = inputs.snapshot_volume_node(node, "fill run")
    assert np.shares_memory(snapshot.array, slicer.util.arrayFromVolume(node))  # nothing copied in the main thread
    written = {}
    thread = threading.Thread(target=lambda: written.update(inputs.write_volume_snapshots(
        {"fill": (snapshot, tmp_path / "fill_run.nrrd")})))
    thread.start()
    thread.join()
    path = written["fill"]
    assert path == str(tmp_path / "fill_run.nrrd") and sorted(p.name for p in tmp_path.iterdir()) == ["fill_run.nrrd"]
    image = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stack)
    assert image.GetSpacing() == pytest.approx((0.3, 0.4, 1.0))
    assert image.GetOrigin() == pytest.approx((-10.0, 20.0, 5.0))  # RAS (10, -20, 5) in LPS
    from drgs_core.io import read_stack

    np.testing.assert_array_equal(read_stack(path), stack)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(inputs.InputProblem, match="no image data"):
        inputs.snapshot_volume_node(empty, "mask run")


# ---- deps --------------------------------------------------------------------------------------------------------

def test_requirements_mirror_setup_py():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    install = next(k.value for k in call.keywords if k.arg == "install_requires")
    required = [ast.literal_eval(e) for e in install.elts]
    torch = [r for r in required if r.startswith("torch")]
    assert torch == [deps.TORCH_REQUIREMENT]
    assert sorted(r for r in required if not r.startswith("torch")) == sorted(deps.REQUIREMENTS)


def test_is_satisfied():
    assert deps.is_satisfied("numpy>=1.0")
    assert not deps.is_satisfied("numpy>=999")
    assert not deps.is_satisfied("surely-not-installed-package-xyz")


class _Recorder:
    def __init__(self):
        self.calls = []


def _fake_modules(with_packaging=True, **pytorch):
    """slicer.packaging, slicer.util and PyTorchUtils stand-ins (the latter by the rules read from SlicerPyTorch)."""
    rec = _Recorder()
    packaging = types.SimpleNamespace(pip_ensure=lambda reqs, **kw: rec.calls.append(("pip_ensure", [str(r) for r in reqs], kw)))
    util = types.SimpleNamespace(pip_install=lambda reqs: rec.calls.append(("pip_install", reqs)))
    return rec, (packaging if with_packaging else None), util, pytorch_utils_module(**pytorch)


def test_nothing_is_installed_without_consent(monkeypatch):
    monkeypatch.setattr(deps, "missing_requirements", lambda r=None: ["nibabel>=5.0"])
    monkeypatch.setattr(deps, "torch_missing", lambda: True)
    rec, packaging, util, ptu = _fake_modules()
    asked = []
    installer = deps.Installer(lambda title, text: asked.append(text) or False, packaging, util, ptu)
    with pytest.raises(deps.DependencyError, match="not installed"):
        installer.ensure()
    assert rec.calls == [] and ptu.installs == [] and "nibabel>=5.0" in asked[0] and "PyTorch Utils" in asked[0]


def test_install_uses_pytorch_utils_and_pip_ensure(monkeypatch):
    rec, packaging, util, ptu = _fake_modules()
    monkeypatch.setattr(deps, "missing_requirements", lambda r=None: [] if rec.calls else ["nibabel>=5.0"])
    monkeypatch.setattr(deps, "torch_missing", lambda: not ptu.PyTorchUtilsLogic.torchInstalled())
    assert deps.Installer(lambda t, x: True, packaging, util, ptu).ensure()
    assert ptu.installs == [["install", "torch>=2.1", "torchvision"]]  # no backend forced: it follows the driver
    (name, reqs, kw), = rec.calls
    assert name == "pip_ensure" and reqs == ["nibabel>=5.0"]
    assert kw["prompt_install"] is False and kw["requester"] == "DRGS4D"


def test_install_falls_back_to_util_pip_install_and_pip_torch(monkeypatch):
    monkeypatch.setattr(deps, "missing_requirements", lambda r=None: ["pynrrd>=1.0"])
    monkeypatch.setattr(deps, "torch_missing", lambda: True)
    rec, _, util, _ = _fake_modules(with_packaging=False)
    installer = deps.Installer(lambda t, x: True, None, util, None)
    with pytest.raises(deps.DependencyError, match="still missing"):  # the fakes install nothing for real
        installer.ensure()
    assert rec.calls == [("pip_install", ["torch>=2.1"]), ("pip_install", ["pynrrd>=1.0"])]


@pytest.mark.parametrize("pytorch, message", [
    (dict(failure=RuntimeError("pip failed: no space left on device")), "no space left on device"),
    (dict(installed=True), "older than DRGS4D needs"),  # present, yet below the requirement: no silent pass
])
def test_failed_torch_install_is_a_dependency_error(monkeypatch, pytorch, message):
    monkeypatch.setattr(deps, "missing_requirements", lambda r=None: [])
    monkeypatch.setattr(deps, "torch_missing", lambda: True)
    rec, packaging, util, ptu = _fake_modules(**pytorch)
    with pytest.raises(deps.DependencyError, match=message):
        deps.Installer(lambda t, x: True, packaging, util, ptu).ensure()


def test_the_pytorch_utils_stand_in_keeps_the_rules_read_from_slicer_pytorch():
    """installTorch's keywords and what it does with them, torchInstalled as a staticmethod, None on a refusal."""
    import inspect

    logic_class = pytorch_utils_module().PyTorchUtilsLogic
    assert list(inspect.signature(logic_class.installTorch).parameters) == [
        "self", "askConfirmation", "forceComputationBackend", "torchVersionRequirement",
        "torchvisionVersionRequirement"]
    assert isinstance(inspect.getattr_static(logic_class, "torchInstalled"), staticmethod)
    logic = logic_class()
    with pytest.raises(TypeError):
        logic.installTorch(versionRequirement=">=2.1")  # a keyword PyTorchUtils does not have
    with pytest.raises(ValueError, match="torchtorch"):
        logic.installTorch(torchVersionRequirement="torch>=2.1")  # a whole requirement, not a specifier
    assert pytorch_utils_module(confirm=False).PyTorchUtilsLogic().installTorch(askConfirmation=True) is None
    assert logic.installTorch(torchVersionRequirement=">=2.1") is not None and logic_class.torchInstalled()


def test_all_present_means_no_question(monkeypatch):
    monkeypatch.setattr(deps, "missing_requirements", lambda r=None: [])
    monkeypatch.setattr(deps, "torch_missing", lambda: False)
    assert deps.Installer(lambda t, x: pytest.fail("asked"), None, None, None).ensure()


def test_bundled_package_without_metadata_counts_as_present(monkeypatch):
    import importlib.metadata

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    assert deps.is_satisfied("SimpleITK>=2.2")  # importable here, as in Slicer
    assert not deps.is_satisfied("surely-not-installed-package-xyz>=1")
