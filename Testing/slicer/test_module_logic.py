"""DRGS4DSlicer.py's Logic outside Slicer: the module imported with the stand-ins of slicer_standins (the widget has its
own tests in test_widget.py), driven against a real MRML scene and the real worker process running the real engine on
the tiny phantom."""

import pathlib
import sys
import time
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_standins import load_module  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def module(monkeypatch, scene, tmp_path, worker_env):
    for key, value in worker_env.items():  # the Logic starts workers with this process's environment
        monkeypatch.setenv(key, value)
    yield load_module(monkeypatch, scene, tmp_path, "5.12")
    sys.modules.pop("DRGS4DSlicer", None)


def test_module_metadata_and_parameter_defaults(module):
    parent = types.SimpleNamespace()
    module.DRGS4DSlicer(parent)
    assert parent.title == "DRGS4D" and parent.categories and "Reconstruct" in parent.helpText
    p = module.DRGS4DSlicerLogic().getParameterNode()
    assert p.inputMode == "case folder" and p.views == 30 and p.schedule == "fast" and p.device == "auto"
    assert p.detectorBinning == "auto"
    assert module._path(p.caseFolder) is None and module._path(pathlib.Path("/x")) == "/x"


def _wait(job, timeout=300):
    deadline = time.time() + timeout
    while not job.finished:
        job.poll()
        assert time.time() < deadline, job.log_lines[-20:]
        time.sleep(0.02)
    return job.state


def test_logic_runs_a_case_and_works_on_the_results(module, tiny_case, tmp_path):
    logic = module.DRGS4DSlicerLogic()
    p = logic.getParameterNode()
    p.caseFolder = pathlib.Path(tiny_case)
    p.outputFolder = tmp_path / "out"
    p.views, p.iterations, p.previewInterval, p.preset, p.device = 8, 100, 50, "tiny", "cpu"
    p.loadRenderedDSA, p.detectorBinning = False, "1"
    previews = []
    job = logic.startReconstruction(p, onPreviewVolume=previews.append)
    assert job.run_dir.parent == tmp_path / "out" and job.run_dir.name.startswith(pathlib.Path(tiny_case).name + "_")
    assert job.request == {"case": tiny_case, "out": str(job.run_dir), "views": 8, "schedule": "fast",
                           "iterations": 100, "device": "cpu", "seed": 0, "snapshot_every": 50,
                           "static_field": False, "preset": "tiny", "detector_binning": 1}
    state = _wait(job)
    assert state.status == "done", (state.error, job.log_lines[-20:])
    assert len(previews) == 1  # the hook runs once, when the preview node is created
    volume, seg = job.updater.node("volume"), job.updater.node("segmentation")
    assert job.updater.node("renders") is None and job.updater.node("sequence") is not None  # the load options

    # results through the Logic, as the Results section uses them (also after a scene reload: attach)
    iso = state.metrics["iso_level"]
    top = float(slicer.util.arrayFromVolume(volume).max())
    segmentation, count = logic.applyThreshold(volume, seg, iso)
    assert segmentation is seg and count > 0
    import SimpleITK as sitk  # at the engine's level the panel's segmentation is the engine's labelmap

    engine = sitk.GetArrayFromImage(sitk.ReadImage(state.outputs["segmentation"])) > 0
    assert count == int(engine.sum())
    _, fewer = logic.applyThreshold(volume, seg, 0.5 * (iso + top))
    assert 0 < fewer < count
    label = logic.exportLabelmap(volume, seg)
    assert int((slicer.util.arrayFromVolume(label) > 0).sum()) == fewer
    files = logic.exportFiles(volume, seg, str(job.run_dir))
    assert files and all(pathlib.Path(f).parent == job.run_dir / "export" for f in files)
    with pytest.raises(module.inputs.InputProblem):
        logic.applyThreshold(None, None, 0.01)


def test_logic_scene_volume_inputs_are_exported_for_the_worker(module, scene, tmp_path):
    """Scene volumes are written by a background task; the request names the written files."""
    logic = module.DRGS4DSlicerLogic()
    p = logic.getParameterNode()
    p.inputMode = "scene volumes"
    with pytest.raises(module.inputs.InputProblem, match="fill and the mask"):
        logic.startVolumeExport(p, tmp_path / "inputs")
    with pytest.raises(module.inputs.InputProblem, match="fill and the mask"):
        logic.inputRequest(p, tmp_path)  # not exported yet
    for name in ("fillVolume", "maskVolume"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.ones((4, 5, 6), np.float32))
        setattr(p, name, node)
    geometry = tmp_path / "transforms.json"
    geometry.write_text("{}")
    p.geometryFile = geometry
    task = logic.startVolumeExport(p, tmp_path / "inputs")
    deadline = time.monotonic() + 30
    while (event := task.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert event["event"] == "result", event
    request = logic.inputRequest(p, tmp_path / "inputs", exported=event["result"])
    assert request == {"fill": str(tmp_path / "inputs" / "fill_run.nrrd"),
                       "mask": str(tmp_path / "inputs" / "mask_run.nrrd"), "geometry": str(geometry)}
    assert all(pathlib.Path(request[role]).is_file() for role in ("fill", "mask"))
    assert logic.caseName(p) == "fillVolume"


def test_logic_reports_a_broken_case_readably(module, tmp_path):
    logic = module.DRGS4DSlicerLogic()
    p = logic.getParameterNode()
    p.caseFolder = tmp_path / "does-not-exist"
    with pytest.raises(module.inputs.InputProblem, match="does not exist"):
        logic.startReconstruction(p)
