"""DRGS4DSlicer.py outside Slicer: import the module with minimal stand-ins for the pieces only the Slicer application
provides (qt, the ScriptedLoadableModule base classes, parameterNodeWrapper, slicer.app) and drive its Logic against a
real MRML scene and the real worker process running the real engine on the tiny phantom.  This catches mistakes in the
module file that the Qt-free library tests cannot see; the widget itself needs Slicer (its self-test covers it
there)."""

import importlib
import pathlib
import sys
import time
import types
import typing

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

REPO = pathlib.Path(__file__).resolve().parents[2]


def _stub_parameter_node_wrapper():
    mod = types.ModuleType("slicer.parameterNodeWrapper")

    class _Validator:
        def __init__(self, *args):
            self.args = args

    class Choice(_Validator):
        pass

    class Minimum(_Validator):
        pass

    class WithinRange(_Validator):
        pass

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = {}
        for name, hint in hints.items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if hasattr(cls, name):
                defaults[name] = getattr(cls, name)
            elif base is pathlib.Path:
                defaults[name] = pathlib.Path()
            else:
                defaults[name] = None

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            for key, value in defaults.items():
                object.__setattr__(self, key, value)

        return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__, "_defaults": defaults})

    mod.parameterNodeWrapper = parameterNodeWrapper
    mod.Choice, mod.Minimum, mod.WithinRange = Choice, Minimum, WithinRange
    return mod


def _stub_scripted_loadable_module():
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

        def getParameterNode(self):
            return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    return mod


@pytest.fixture
def module(monkeypatch, scene, tmp_path, worker_env):
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", _stub_parameter_node_wrapper())
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", _stub_scripted_loadable_module())
    app = types.SimpleNamespace(temporaryPath=str(tmp_path / "slicer-tmp"), defaultScenePath=str(tmp_path),
                                processEvents=lambda: None)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for key, value in worker_env.items():  # the Logic starts workers with this process's environment
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(REPO / "DRGS4DSlicer"))
    sys.modules.pop("DRGS4DSlicer", None)
    mod = importlib.import_module("DRGS4DSlicer")
    yield mod
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
    while not job.worker.finished():
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
    _, fewer = logic.applyThreshold(volume, seg, 0.5 * (iso + top))
    assert 0 < fewer < count
    label = logic.exportLabelmap(volume, seg)
    assert int((slicer.util.arrayFromVolume(label) > 0).sum()) == fewer
    files = logic.exportFiles(volume, seg, str(job.run_dir))
    assert files and all(pathlib.Path(f).parent == job.run_dir / "export" for f in files)
    with pytest.raises(module.inputs.InputProblem):
        logic.applyThreshold(None, None, 0.01)


def test_logic_scene_volume_inputs_are_exported_for_the_worker(module, scene, tmp_path):
    logic = module.DRGS4DSlicerLogic()
    p = logic.getParameterNode()
    p.inputMode = "scene volumes"
    with pytest.raises(module.inputs.InputProblem, match="fill and the mask"):
        logic.inputRequest(p, tmp_path)
    for name in ("fillVolume", "maskVolume"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.ones((4, 5, 6), np.float32))
        setattr(p, name, node)
    geometry = tmp_path / "transforms.json"
    geometry.write_text("{}")
    p.geometryFile = geometry
    request = logic.inputRequest(p, tmp_path / "inputs")
    assert request == {"fill": str(tmp_path / "inputs" / "fill_run.nrrd"),
                       "mask": str(tmp_path / "inputs" / "mask_run.nrrd"), "geometry": str(geometry)}
    assert logic.caseName(p) == "fillVolume"


def test_logic_reports_a_broken_case_readably(module, tmp_path):
    logic = module.DRGS4DSlicerLogic()
    p = logic.getParameterNode()
    p.caseFolder = tmp_path / "does-not-exist"
    with pytest.raises(module.inputs.InputProblem, match="does not exist"):
        logic.startReconstruction(p)
