"""The panel itself: DRGS4DSlicerWidget.setup() / enter() / exit() / cleanup() and every parameter's round trip
GUI <-> parameter node, under stand-ins that bind widgets by the connector rules of each supported Slicer release
(slicer_standins.CONNECTOR_RULES), with the real MRML classes and Slicer's real VTKObservationMixin (slicer-core),
which warns when an observer is removed twice.  Also: the threshold range, the device list from --probe, the message
on a Python too old for the engine, background input checks, and the main-thread time of every click and timer tick
while a 256^3 result streams in, scene volumes are written, the demo phantom is made, and the Results section
segments, exports and writes a 256^3 result."""

import pathlib
import shutil
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer")

import slicer_standins as si  # noqa: E402
from slicer_standins import load_module, tick_until  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "DRGS4DSlicer"
UI = MODULE_DIR / "Resources" / "UI" / "DRGS4DSlicer.ui"
# parameters the panel keeps without a .ui binding: device (its list comes from --probe) and bookkeeping
UNBOUND = {"device", "nFrames", "lastRunFolder"}


@pytest.fixture(params=si.SUPPORTED_VERSIONS, ids=lambda v: f"slicer-{v}")
def version(request):
    return request.param


@pytest.fixture
def panel(monkeypatch, scene, tmp_path, version):
    module = load_module(monkeypatch, scene, tmp_path, version)
    widget = module.DRGS4DSlicerWidget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # VTKObservationMixin warns "does not have observer" on a double removal
        widget.setup()
        widget.enter()
        yield module, widget
        widget.cleanup()
    sys.modules.pop("DRGS4DSlicer", None)


def _bound(module):
    return {name: w for name, w in module._connections}


# ---- binding and lifecycle ---------------------------------------------------------------------------------------

def test_every_parameter_is_bound_under_the_rules_of_the_version(panel):
    module, widget = panel
    p = widget._parameterNode
    assert set(_bound(module)) == set(type(p).allParameters) - UNBOUND
    assert widget.ui.thresholdSliderWidget.maximum == module.THRESHOLD_LIMIT  # no result volume yet
    assert widget.ui.viewsSlider.maximum == 200 and widget.ui.iterationsSlider.maximum == 60000


def _user_value(name, widget, p, scene, tmp_path):
    """A value different from the current one that the user could enter in the widget."""
    current = getattr(p, name)
    hint = type(p).allParameters[name]
    base, extras = si._split(hint)
    choice = si._first(extras, si.Choice)
    if choice is not None:
        return next(c for c in reversed(choice.choices) if c != current)
    if base is bool:
        return not current
    if base is int:
        return min(int(widget.maximum), int(current) + 7)
    if base is float:
        return round(float(current) / 2 + 0.001, 6)
    if base is pathlib.Path:
        return tmp_path / f"{name}-chosen"
    return scene.AddNewNodeByClass(base.__name__, name)


def _set_in_gui(widget, value):
    if isinstance(widget, si.FakeComboBox):
        widget.currentIndex = [t for t, _ in widget._items].index(str(value))
    elif isinstance(widget, si.FakeCheckBox):
        widget.checked = value
    elif isinstance(widget, si.FakeRangeWidget):
        widget.value = value
    elif isinstance(widget, si.FakePathLineEdit):
        widget.currentPath = str(value)
    else:
        widget.setCurrentNode(value)


def _shown(widget):
    if isinstance(widget, si.FakeComboBox):
        return widget.currentText
    if isinstance(widget, si.FakeCheckBox):
        return widget.checked
    if isinstance(widget, si.FakeRangeWidget):
        return widget.value
    if isinstance(widget, si.FakePathLineEdit):
        return widget.currentPath
    return widget.currentNode()


def test_every_parameter_round_trips_between_gui_and_node(panel, scene, tmp_path):
    module, widget = panel
    p = widget._parameterNode
    for name, w in sorted(_bound(module).items()):
        value = _user_value(name, w, p, scene, tmp_path)
        _set_in_gui(w, value)  # the user changes the widget ...
        assert getattr(p, name) == value, name  # ... and the parameter node follows
        back = _user_value(name, w, p, scene, tmp_path)
        setattr(p, name, back)  # a script (or a loaded scene) changes the parameter ...
        expected = str(back) if isinstance(w, (si.FakeComboBox, si.FakePathLineEdit)) else back
        assert _shown(w) == expected, name  # ... and the widget shows it


def test_exit_and_enter_again_reconnect_once(panel):
    module, widget = panel
    p = widget._parameterNode
    widget.exit()
    assert widget._parameterNode is None
    widget.ui.seedSpinBox.value = 42  # not connected while the module is hidden
    assert p.seed == 0
    widget.exit()  # a second exit is harmless
    widget.enter()
    widget.enter()  # so is a second enter
    assert widget.ui.seedSpinBox.value == 0  # the node's value is written back on connect
    widget.ui.seedSpinBox.value = 5
    assert widget._parameterNode.seed == 5
    assert widget.hasObserver(widget._parameterNode, module.vtk.vtkCommand.ModifiedEvent,
                              widget._onParameterNodeModified)


def test_cleanup_stops_everything(panel):
    module, widget = panel
    widget._timer.start()
    widget.cleanup()
    assert not widget._timer.isActive() and widget._parameterNode is None
    widget.enter()  # the fixture's cleanup runs once more: no warnings either


def test_schedule_and_preset_set_the_iterations(panel):
    module, widget = panel
    widget.ui.scheduleComboBox.currentIndex = 1  # full
    assert widget._parameterNode.iterations == 30000 and widget.ui.iterationsSlider.value == 30000
    widget.ui.presetComboBox.currentIndex = 2  # tiny
    assert widget._parameterNode.iterations == 150


def test_threshold_slider_follows_the_result_volume(panel, scene):
    module, widget = panel
    p = widget._parameterNode
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "result")
    slicer.util.updateVolumeFromArray(volume, np.linspace(0, 0.05, 64, dtype=np.float32).reshape(4, 4, 4))
    p.resultVolume = volume
    slider = widget.ui.thresholdSliderWidget
    assert slider.maximum == pytest.approx(0.05) and slider.singleStep == pytest.approx(0.0001)
    assert p.threshold == pytest.approx(0.008)
    slider.value = 0.03
    assert p.threshold == pytest.approx(0.03)
    widget.exit()
    widget.enter()  # connecting sets the annotation's range again; the panel restores the volume's
    assert widget.ui.thresholdSliderWidget.maximum == pytest.approx(0.05)
    assert widget._parameterNode.threshold == pytest.approx(0.03)


# ---- device list, GPU messages, old Python -----------------------------------------------------------------------

PROBE_GPUS = {"event": "probe", "python": "3.12.10", "drgs_core": "0.1.0", "torch": "2.7.1+cu128",
              "cuda": [{"index": 0, "name": "NVIDIA RTX A6000", "memory_gb": 47.5},
                       {"index": 1, "name": "NVIDIA RTX A6000", "memory_gb": 47.5}],
              "problem": None, "backend": "torch", "backend_device": "cuda:0", "it_per_s": 10.0, "fast_run_s": 1015}
PROBE_CPU = dict(PROBE_GPUS, cuda=[], backend="torch", backend_device="cpu", it_per_s=None, fast_run_s=None)


def test_device_list_comes_from_the_probe(panel):
    module, widget = panel
    p = widget._parameterNode
    combo = widget.ui.deviceComboBox
    assert [d for _, d in combo._items] == ["auto", "cpu"]
    widget._onProbed(PROBE_GPUS)
    assert [d for _, d in combo._items] == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert combo._items[3][0] == "GPU 1: NVIDIA RTX A6000 (47.5 GB)"
    combo.currentIndex = 3
    assert p.device == "cuda:1"
    p.device = "cpu"
    assert combo.currentText == "CPU"
    text = widget.ui.deviceInfoLabel.text
    assert "PyTorch 2.7.1+cu128" in text and "PyTorch reference renderer" in text and "16 min" in text
    widget._onProbed(dict(PROBE_GPUS, cuda=[]))  # a scene saved on a GPU machine keeps its device visible
    p.device = "cuda:1"
    assert combo.currentText == "cuda:1"


@pytest.mark.parametrize("answer", [True, False])
def test_no_cuda_gpu_says_so_and_offers_the_cpu(monkeypatch, scene, tmp_path, answer):
    module = load_module(monkeypatch, scene, tmp_path, "5.12", answer=answer)
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    widget.enter()
    widget._onProbed(PROBE_CPU)
    assert "No CUDA GPU found" in widget.ui.deviceInfoLabel.text
    assert widget._confirmDevice() is answer
    assert module._record.named("confirm") and "no CUDA GPU" in module._record.named("confirm")[0][1][1]
    assert widget._parameterNode.device == ("cpu" if answer else "auto")
    widget.cleanup()


def test_a_python_too_old_for_the_engine_gets_a_plain_message(monkeypatch, scene, tmp_path):
    module = load_module(monkeypatch, scene, tmp_path, "5.8")
    monkeypatch.setattr(module, "ENGINE_MIN_PYTHON", (99, 0))
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    assert "needs Python 99.0 or later" in widget.ui.statusLabel.text
    assert "Slicer 5.10" in widget.ui.statusLabel.text
    p = widget._parameterNode
    assert p.useExternalPython  # the only way to run here
    p.useExternalPython = False
    p.caseFolder = tmp_path
    widget.onApplyButton()
    assert widget._job is None
    assert "needs Python 99.0" in module._record.named("errorDisplay")[0][1][0]
    assert "remote DRGS4D server" in widget.ui.statusLabel.text
    p.engine = "remote server"  # the remote engine needs no local engine: the panel goes on to the server settings
    widget.onApplyButton()
    assert "URL and token" in module._record.named("errorDisplay")[1][1][0]
    widget.cleanup()


# ---- mutations: the stand-ins reject what Slicer rejects, per version -------------------------------------------

def _mutated_module_dir(tmp_path, py=None, ui=None):
    target = tmp_path / "mutated" / "DRGS4DSlicer"
    shutil.copytree(MODULE_DIR / "Resources", target / "Resources")
    text = (MODULE_DIR / "DRGS4DSlicer.py").read_text()
    if py:
        assert py[0] in text
        text = text.replace(py[0], py[1], 1)
    (target / "DRGS4DSlicer.py").write_text(text)
    if ui:
        ui_text = UI.read_text()
        assert ui[0] in ui_text
        (target / "Resources" / "UI" / "DRGS4DSlicer.ui").write_text(ui_text.replace(ui[0], ui[1], 1))
    return target


MUTATIONS = [
    # the annotation before this fix: a slider needs both bounds
    ("threshold: Minimum(0.0)", dict(py=("threshold: Annotated[float, WithinRange(0.0, THRESHOLD_LIMIT)]",
                                         "threshold: Annotated[float, Minimum(0.0)]")),
     {"5.6": "unbounded", "5.8": "unbounded", "5.10": "unbounded", "5.12": "unbounded"}),
    ("ctkCheckBox before 5.8", dict(ui=('class="QCheckBox" name="staticFieldCheckBox"',
                                        'class="ctkCheckBox" name="staticFieldCheckBox"')),
     {"5.6": "Unable to create GUI connector"}),
    ("int on a ctkSliderWidget before 5.10", dict(ui=('class="QSpinBox" name="seedSpinBox"',
                                                      'class="ctkSliderWidget" name="seedSpinBox"')),
     {"5.6": "Unable to create", "5.8": "Unable to create", "5.10": "unbounded", "5.12": "unbounded"}),
    ("QComboBox without Choice", dict(py=("    schedule: Annotated[str, Choice([\"fast\", \"full\"])] = \"fast\"",
                                          "    schedule: str = \"fast\"")),
     {v: "requires the Choice" for v in si.SUPPORTED_VERSIONS}),
]


@pytest.mark.parametrize("label, mutation, failures", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_the_rules_reject_what_slicer_rejects(monkeypatch, scene, tmp_path, version, label, mutation, failures):
    module_dir = _mutated_module_dir(tmp_path, **mutation)
    module = load_module(monkeypatch, scene, tmp_path, version, module_dir=module_dir)
    widget = module.DRGS4DSlicerWidget()
    if version in failures:
        with pytest.raises(RuntimeError, match=failures[version]):
            widget.setup()
        widget.removeObservers()  # setup stopped half-way: the scene must not call back into this widget
    else:
        widget.setup()
        widget.cleanup()
    sys.modules.pop("DRGS4DSlicer", None)


# ---- background checks and main-thread time ----------------------------------------------------------------------

WAIT_LIMIT_S = 2.0  # wall-clock bound of one call: catches a handler that waits (for a process, a thread) idly


def _tick_until(widget, done, timeout=120.0):
    """`tick_until` with the wall-clock bound of one tick: no handler may wait either."""
    return tick_until(widget, done, timeout, wait_limit=WAIT_LIMIT_S)


def test_check_inputs_runs_in_the_background(monkeypatch, scene, tmp_path, tiny_case, worker_env):
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    module = load_module(monkeypatch, scene, tmp_path, "5.10")
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    widget.enter()
    widget._task[1].cancel()  # the probe started by enter()
    widget._task = None
    p = widget._parameterNode
    p.caseFolder = pathlib.Path(tiny_case)
    t0 = time.perf_counter()
    widget.onCheckInputs()
    assert time.perf_counter() - t0 < 0.5  # starting a process, not reading the case
    assert "background" in widget.ui.inputSummaryLabel.text
    assert not widget.ui.checkInputsButton.enabled and widget._timer.isActive()
    ticks = _tick_until(widget, lambda: widget._task is None)
    assert "16 frames" in widget.ui.inputSummaryLabel.text, widget.ui.inputSummaryLabel.text
    assert p.nFrames == 16 and widget.ui.viewsSlider.maximum == 16 and widget.ui.checkInputsButton.enabled
    assert max(ticks) < 0.1
    p.caseFolder = tmp_path / "missing"
    widget.onCheckInputs()
    assert "does not exist" in widget.ui.inputSummaryLabel.text and widget._task is None
    widget.cleanup()


class ScriptedWorker:
    """Hands out prepared worker events, a few per poll, like a worker process would."""

    def __init__(self, events):
        self.pending = list(events) + [{"event": "exit", "returncode": 0}]
        self.returncode = None

    def poll_events(self):
        out, self.pending = self.pending[:2], self.pending[2:]
        return out

    def finished(self):
        return not self.pending


@pytest.fixture(scope="module")
def big_result(tmp_path_factory):
    """A 256^3 result as the engine writes it, and one training preview."""
    from drgs_core.geometry import VolumeGrid
    from drgs_core.io import write_mesh, write_sequence_nrrd, write_stack, write_volume
    from drgs_core.preview import write_preview

    folder = tmp_path_factory.mktemp("big")
    grid = VolumeGrid((256, 256, 256), (0.5, 0.5, 0.5))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 256, dtype=np.float32)] * 3, indexing="ij")
    vol = (0.04 * np.exp(-((x - 0.1) ** 2 + y ** 2 + (z + 0.2) ** 2) / 0.05)).astype(np.float32)
    snap = write_preview(folder / "snapshots", 10, vol, grid, level=0.008)
    verts = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], float)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    outputs = {"volume": str(write_volume(folder / "volume.nrrd", vol, grid)),
               "mesh_vtk": str(write_mesh(folder / "mesh.vtk", verts, faces)),
               "volume_4d": str(write_sequence_nrrd(folder / "volume_4d.seq.nrrd", np.stack([vol, 0.5 * vol]), grid,
                                                    [0.0, 0.5])),
               "renders": str(write_stack(folder / "renders.nrrd", np.random.default_rng(0).random(
                   (8, 128, 128), dtype=np.float32), (0.6, 0.6)))}
    return snap, outputs, vol


def test_no_timer_tick_takes_longer_than_100_ms_on_a_256_cubed_result(monkeypatch, scene, tmp_path, big_result):
    from DRGS4DSlicerLib.job import ReconstructionJob

    snap, outputs, vol = big_result
    assert snap["factor"] == 2  # the worker shrank the preview to 128^3
    module = load_module(monkeypatch, scene, tmp_path, "5.12")
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    job = ReconstructionJob(scene, {"case": "x"}, tmp_path / "run", name="big",
                            load_options={"load_sequence": True, "load_renders": True})
    job.worker = ScriptedWorker([
        {"event": "started", "run_dir": str(tmp_path / "run"), "n_frames": 133, "views": 30, "iterations": 20,
         "device": "cuda:0"},
        {"event": "snapshot", "iteration": 10, "volume": snap["volume"], "mesh": snap["mesh"]},
        {"event": "progress", "stage": "train", "iteration": 15, "iterations": 20},
        {"event": "snapshot", "iteration": 20, "volume": snap["volume"], "mesh": snap["mesh"]},
        {"event": "done", "outputs": outputs, "metrics": {"iso_level": 0.008, "total_s": 31.0}}])
    job.state.status = "running"
    job.on_event = widget._onJobEvent
    job.updater.on_preview_volume = widget._onPreviewVolume
    _ = job.updater.sequences_logic, job.updater.segmentations_logic  # Slicer made these at start-up
    widget._job = job
    widget._timer.start()
    ticks = _tick_until(widget, lambda: widget._job is None)
    assert job.state.status == "done", job.state.error
    p = widget._parameterNode
    np.testing.assert_allclose(slicer.util.arrayFromVolume(p.resultVolume), np.transpose(vol, (2, 1, 0)))
    assert job.updater.node("sequence").GetNumberOfDataNodes() == 2
    assert job.updater.node("renders").GetNumberOfDataNodes() == 8
    assert p.threshold == pytest.approx(0.008) and "Finished in 31 s" in widget.ui.statusLabel.text
    assert len(ticks) > 12  # the result arrived in pieces
    assert max(ticks) < 0.1, sorted(ticks)[-5:]
    widget.cleanup()


# ---- DICOM mode and engine choice: the unbound widgets, under every version --------------------------------------

@pytest.fixture(scope="module")
def dicom_listing(tmp_path_factory):
    """A RunListing of a Siemens-style mask/fill pair written with pydicom (listed in this process)."""
    from drgs_core.io.dicom import listing
    from drgs_core.io.dicom_write import case_to_dicom
    from DRGS4DSlicerLib.dicom_runs import RunListing
    from test_dicom_runs import small_case

    written = case_to_dicom(small_case(), tmp_path_factory.mktemp("dicom") / "d", style="siemens")
    paths = [str(written["folder"])]
    return RunListing.from_event({"event": "dicom_runs", **listing(paths)}, paths)


def test_dicom_mode_fills_the_run_lists_and_keeps_them_across_exit_and_enter(panel, dicom_listing):
    module, widget = panel
    p = widget._parameterNode
    p.inputMode = "DICOM"
    assert widget.ui.dicomWidget.visible and not widget.ui.geometryWidget.visible
    assert not widget.ui.caseFolderWidget.visible and not widget.ui.applyButton.enabled
    widget._onDicomListed({"event": "dicom_listing", "listing": dicom_listing})
    mask_id, fill_id = dicom_listing.preselection()
    combos = widget.ui.dicomMaskComboBox, widget.ui.dicomFillComboBox
    assert [c.itemData(c.currentIndex) for c in combos] == [mask_id, fill_id]
    assert "20 frames of 8 x 10 pixels" in widget.ui.dicomSummaryLabel.text
    assert p.nFrames == 20 and widget.ui.applyButton.enabled
    widget.exit()
    widget.enter()
    assert [c.itemData(c.currentIndex) for c in combos] == [mask_id, fill_id] and widget.ui.applyButton.enabled
    request = widget.logic.inputRequest(p, None, widget._dicomChoice())
    assert request == {k: v for k, v in dicom_listing.request(mask_id, fill_id, "").items() if k != "out"}
    widget._onDicomListed({"event": "error", "message": "the DICOM folder does not exist"})
    assert combos[0].count == 0 and not widget.ui.applyButton.enabled
    assert "does not exist" in widget.ui.dicomSummaryLabel.text


def test_engine_choice_shows_the_server_settings_from_the_application_settings(monkeypatch, scene, tmp_path, version):
    module = load_module(monkeypatch, scene, tmp_path, version)
    sys.modules["qt"].settings.update({"DRGS4D/RemoteURL": "http://gpu:8765", "DRGS4D/RemoteToken": "s3cret"})
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    widget.enter()
    assert widget.ui.remoteUrlLineEdit.text == "http://gpu:8765" and widget.ui.remoteTokenLineEdit.text == "s3cret"
    p = widget._parameterNode
    assert not widget.ui.remoteWidget.visible and widget.ui.deviceComboBox.enabled
    widget.ui.engineComboBox.currentIndex = 1
    assert p.engine == "remote server" and widget.ui.remoteWidget.visible and not widget.ui.deviceComboBox.enabled
    widget.ui.remoteTokenLineEdit.text = "changed"
    widget.ui.remoteTokenLineEdit.emit("editingFinished")
    assert module.DRGS4DSlicerLogic.remoteSettings() == ("http://gpu:8765", "changed")
    assert "changed" not in [p.parameterNode.GetParameter(n) for n in p.parameterNode.GetParameterNames()]
    widget._task = ("connection", module.ThreadTask(time.sleep, 0.01))
    widget._updateButtons()  # something runs: no second background task can start
    assert not widget.ui.testConnectionButton.enabled and not widget.ui.listDicomButton.enabled
    widget.cleanup()
    sys.modules.pop("DRGS4DSlicer", None)


# ---- nothing slow in the main thread: scene-volume export, demo phantom -----------------------------------------

def _main_thread_time(call):
    """Main-thread CPU time of ``call()`` (s); it must not wait idly either."""
    t0, w0 = time.thread_time(), time.perf_counter()
    call()
    assert time.perf_counter() - w0 < WAIT_LIMIT_S, "the handler waited"
    return time.thread_time() - t0


def _scene_volumes(scene, fill, mask, spacing=(0.3, 0.3, 1.0)):
    nodes = []
    for name, array in (("fill", fill), ("mask", mask)):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        node.SetSpacing(*spacing)
        nodes.append(node)
    return nodes


def _record_threads(monkeypatch, owner, name):
    threads, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: threads.append(threading.current_thread()) or original(*a, **k))
    return threads


def test_scene_volumes_are_described_from_files_written_in_the_background(monkeypatch, scene, tmp_path, tiny_case,
                                                                         worker_env):
    """Check inputs in the scene-volumes mode: the tiny phantom's runs as scene volumes are written by a background
    thread, then described by the worker, with every handler and tick short."""
    from drgs_core.io import read_stack

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    module = load_module(monkeypatch, scene, tmp_path, "5.12")
    threads = _record_threads(monkeypatch, module.inputs, "write_volume_snapshots")
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    p = widget._parameterNode
    p.inputMode = "scene volumes"
    p.fillVolume, p.maskVolume = _scene_volumes(scene, read_stack(pathlib.Path(tiny_case) / "fill_run.nii.gz"),
                                                read_stack(pathlib.Path(tiny_case) / "mask_run.nii.gz"))
    p.geometryFile = pathlib.Path(tiny_case) / "transforms.json"
    assert _main_thread_time(widget.onCheckInputs) < 0.1
    assert widget._task[0] == "export" and "background" in widget.ui.inputSummaryLabel.text
    assert not widget.ui.inputsCollapsibleButton.enabled and not widget.ui.applyButton.enabled
    ticks = _tick_until(widget, lambda: widget._task is None)
    assert max(ticks) < 0.1
    assert threads and threading.main_thread() not in threads
    assert "16 frames" in widget.ui.inputSummaryLabel.text, widget.ui.inputSummaryLabel.text
    assert widget.ui.inputsCollapsibleButton.enabled and p.nFrames == 16
    widget.cleanup()


def test_export_and_start_of_a_256_cubed_scene_volume_run_keep_the_main_thread_free(monkeypatch, scene, tmp_path):
    """Reconstruct with two 256^3 scene volumes: the click and every tick stay under 100 ms of main-thread time;
    the volumes land in the run's inputs folder and the request points at them."""
    module = load_module(monkeypatch, scene, tmp_path, "5.12")
    threads = _record_threads(monkeypatch, module.inputs, "write_volume_snapshots")
    from DRGS4DSlicerLib.job import ReconstructionJob

    started = []  # the request the panel would run, as an unstarted job (nothing to train here)
    monkeypatch.setattr(module.DRGS4DSlicerLogic, "startRequest", lambda self, request, runDir, name, p,
                        onPreviewVolume=None: started.append(request) or ReconstructionJob(scene, request, runDir))
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    p = widget._parameterNode
    big = np.random.default_rng(1).random((256, 256, 256), dtype=np.float32)
    p.inputMode, p.useExternalPython, p.outputFolder = "scene volumes", True, tmp_path / "out"
    p.pythonExecutable = pathlib.Path(sys.executable)
    p.fillVolume, p.maskVolume = _scene_volumes(scene, big, 0.5 * big)
    p.geometryFile = tmp_path / "transforms.json"
    p.geometryFile.write_text("{}")
    assert _main_thread_time(widget.onApplyButton) < 0.1
    assert widget._task[0] == "export" and not widget.ui.applyButton.enabled
    ticks = _tick_until(widget, lambda: widget._task is None)
    assert max(ticks) < 0.1, sorted(ticks)[-3:]
    assert threads and threading.main_thread() not in threads
    (request,) = started
    folder = pathlib.Path(request["out"]) / "inputs"
    assert (request["fill"], request["mask"]) == (str(folder / "fill_run.nrrd"), str(folder / "mask_run.nrrd"))
    import SimpleITK as sitk

    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(request["mask"]))[100], 0.5 * big[100])
    assert widget._job is not None and not module._record.named("errorDisplay")
    widget.cleanup()


def test_sample_data_makes_the_demo_phantom_in_the_background(monkeypatch, scene, tmp_path, worker_env):
    """The SampleData entry returns at once; the worker writes the phantom; the panel then points at it."""
    import types

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    module = load_module(monkeypatch, scene, tmp_path, "5.10")
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    representation = types.SimpleNamespace(self=lambda: widget)  # qSlicerScriptedLoadableModuleWidget.self()
    monkeypatch.setattr(slicer.modules, "drgs4dslicer",
                        types.SimpleNamespace(widgetRepresentation=lambda: representation), raising=False)
    selected = []
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: selected.append(name) or widget.enter())
    nodes = []
    assert _main_thread_time(lambda: nodes.append(module.makeDemoPhantom(None))) < 0.1
    assert nodes == [[]] and selected == ["DRGS4DSlicer"]  # entering the module started the probe: it gave way
    assert widget._task[0] == "phantom" and "background" in widget.ui.statusLabel.text
    assert not widget.ui.inputsCollapsibleButton.enabled and not widget.ui.applyButton.enabled
    module.makeDemoPhantom(None)  # a second request while the first runs is refused, not stacked
    assert "busy" in widget.ui.statusLabel.text
    ticks = _tick_until(widget, lambda: widget._task is None, timeout=300)
    assert max(ticks) < 0.1
    p = widget._parameterNode
    assert p.inputMode == "case folder" and p.preset == "tiny", widget.ui.statusLabel.text
    assert (pathlib.Path(p.caseFolder) / "transforms.json").is_file() and "ready" in widget.ui.statusLabel.text
    assert widget.ui.applyButton.enabled and widget.ui.inputsCollapsibleButton.enabled
    assert widget._probe is not None and widget._probe["event"] == "probe"  # the device list was filled after all
    widget.cleanup()


# ---- nothing slow in the main thread: Apply threshold, Export to labelmap, Export files on a 256^3 result ---------

VESSEL_PEAK, VESSEL_RADIUS_MM, VOXEL_MM, RESULT_THRESHOLD = 0.04, 4.0, 0.5, 0.01
VESSEL_EDGE_MM = VESSEL_RADIUS_MM * np.sqrt(1 - RESULT_THRESHOLD / VESSEL_PEAK)  # where the profile crosses it
GAP_MM = 3.0  # drgs_core.specks' default: smaller components within it of the vessel stay


@pytest.fixture(scope="module")
def vessel_result():
    """A 256^3 result of 0.5 mm voxels ([k, j, i]): an oblique straight vessel with a parabolic profile across the
    whole volume, its distance to the axis (mm), and a noisy copy with 20000 one-voxel specks outside it."""
    n = 256
    c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * VOXEL_MM
    axis = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])  # (i, j, k)
    k, j, i = c[:, None, None], c[None, :, None], c[None, None, :]
    along = axis[0] * i + axis[1] * j + axis[2] * k
    distance = np.sqrt(np.maximum(i * i + j * j + k * k - along * along, 0.0))
    vessel = (VESSEL_PEAK * np.clip(1 - (distance / VESSEL_RADIUS_MM) ** 2, 0, None)).astype(np.float32)
    rng = np.random.default_rng(7)
    specks = np.unravel_index(rng.choice(vessel.size, 20000, replace=False), vessel.shape)
    outside = distance[specks] > VESSEL_RADIUS_MM + VOXEL_MM  # not touching the vessel
    specks = tuple(a[outside] for a in specks)
    noisy = vessel.copy()
    noisy[specks] = 0.03
    return vessel, noisy, distance, specks


def _expected_mask(kind, vessel_result):
    """The segmentation at RESULT_THRESHOLD from the analytic vessel: (must be in it, may be in it)."""
    vessel, _, distance, specks = vessel_result
    sure = vessel >= RESULT_THRESHOLD
    if kind == "vessel":
        return sure, sure
    gap = distance[specks] - VESSEL_EDGE_MM  # a speck's distance to the nearest vessel voxel is this + up to 0.9 mm
    may = sure.copy()
    may[tuple(a[gap <= GAP_MM] for a in specks)] = True
    sure = sure.copy()
    sure[tuple(a[gap + VOXEL_MM * np.sqrt(3) <= GAP_MM] for a in specks)] = True
    return sure, may


def _segment_mask(scene, segmentation, volume):
    """The vessel segment on the volume's grid, as Slicer's own segmentation logic exports it."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "reference export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue("vessels")
    assert logic.ExportSegmentsToLabelmapNode(segmentation, ids, label, volume)
    mask = slicer.util.arrayFromVolume(label) > 0
    scene.RemoveNode(label)
    return mask


@pytest.mark.parametrize("kind", ["vessel", "noisy"])
def test_threshold_and_exports_of_a_256_cubed_result_keep_the_main_thread_free(monkeypatch, scene, tmp_path,
                                                                               vessel_result, kind):
    """Apply threshold, Export to labelmap and Export files: every click and tick stays under 100 ms of main-thread
    time, the work runs in a background thread, the segment gets the precomputed surface (no conversion), and the
    results match the analytic vessel (specks far from it left out, as the engine does)."""
    module = load_module(monkeypatch, scene, tmp_path, "5.12")
    threads = {name: _record_threads(monkeypatch, module.vessels, name)
               for name in ("segment_volume", "labelmap_from_snapshot", "write_export_files")}
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    p = widget._parameterNode
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vessel run")
    slicer.util.updateVolumeFromArray(volume, vessel_result[0 if kind == "vessel" else 1])
    volume.SetSpacing(VOXEL_MM, VOXEL_MM, VOXEL_MM)
    p.resultVolume, p.threshold, p.lastRunFolder = volume, RESULT_THRESHOLD, str(tmp_path / "run")
    sure, may = _expected_mask(kind, vessel_result)
    buttons = (widget.ui.applyThresholdButton, widget.ui.exportLabelmapButton, widget.ui.exportFilesButton,
               widget.ui.applyButton)

    def run(handler, task):
        assert _main_thread_time(handler) < 0.1
        assert widget._task[0] == task and "background" in widget.ui.statusLabel.text
        assert not any(b.enabled for b in buttons) and not widget.ui.inputsCollapsibleButton.enabled
        ticks = _tick_until(widget, lambda: widget._task is None)
        assert max(ticks) < 0.1, sorted(ticks)[-3:]
        assert widget.ui.applyThresholdButton.enabled and not module._record.named("errorDisplay")

    run(widget.onApplyThreshold, "threshold")
    segmentation = p.resultSegmentation
    mask = _segment_mask(scene, segmentation, volume)
    assert not np.any(sure & ~mask) and not np.any(mask & ~may)
    assert "vessel voxels at threshold 0.01" in widget.ui.statusLabel.text
    assert ("isolated specks" in widget.ui.statusLabel.text) == (kind == "noisy")
    surface = segmentation.GetSegmentation().GetSegment("vessels").GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPolys() > 1000
    bounds = np.array(surface.GetBounds()).reshape(3, 2)
    volume_bounds = np.zeros(6)
    volume.GetRASBounds(volume_bounds)
    np.testing.assert_allclose(bounds[0], volume_bounds[:2], atol=1.0)  # the vessel crosses the volume along i

    run(widget.onExportLabelmap, "labelmap")
    labelmap = scene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap) > 0, mask)
    from DRGS4DSlicerLib.scene import ijk_to_ras_of

    np.testing.assert_array_equal(ijk_to_ras_of(labelmap), ijk_to_ras_of(volume))

    run(widget.onExportFiles, "files")
    written = sorted((tmp_path / "run" / "export").iterdir())
    assert [f.name for f in written] == ["vessel_run_vessels.seg.nrrd", "vessel_run_vessels.stl",
                                         "vessel_run_vessels_label.nrrd"]
    assert module._record.named("infoDisplay") and str(written[0]) in module._record.named("infoDisplay")[0][1][0]
    import SimpleITK as sitk

    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written[2]))) > 0, mask)
    for name, seen in threads.items():
        assert seen and threading.main_thread() not in seen, name
    widget.cleanup()


def test_a_failed_result_task_says_what_to_do_and_frees_the_panel(monkeypatch, scene, tmp_path):
    """The volume removed while the threshold is worked out, and an export folder that cannot be written."""
    module = load_module(monkeypatch, scene, tmp_path, "5.12")
    widget = module.DRGS4DSlicerWidget()
    widget.setup()
    p = widget._parameterNode
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small run")
    slicer.util.updateVolumeFromArray(volume, np.pad(np.full((6, 6, 6), 0.05, np.float32), 5))
    p.resultVolume, p.threshold = volume, RESULT_THRESHOLD
    widget.onApplyThreshold()
    scene.RemoveNode(volume)
    _tick_until(widget, lambda: widget._task is None)
    (call,) = module._record.named("errorDisplay")
    assert "could not be segmented" in call[1][0] and "removed" in call[1][0] and "What to do" in call[1][0]
    assert widget._task is None and widget.ui.checkInputsButton.enabled
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small run")
    slicer.util.updateVolumeFromArray(volume, np.pad(np.full((6, 6, 6), 0.05, np.float32), 5))
    p.resultVolume, p.resultSegmentation = volume, None
    widget.onApplyThreshold()
    _tick_until(widget, lambda: widget._task is None)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the run folder should be")
    p.lastRunFolder = str(blocked)
    widget.onExportFiles()
    _tick_until(widget, lambda: widget._task is None)
    message = module._record.named("errorDisplay")[-1][1][0]
    assert "could not be written" in message and "No file was changed" in message
    assert blocked.read_text() == "a file where the run folder should be"
    widget.cleanup()
