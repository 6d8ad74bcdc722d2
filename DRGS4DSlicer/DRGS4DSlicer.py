"""DRGS4D: sparse-view 4D vessel reconstruction from rotational DSA (4D radiative Gaussian splatting) in 3D Slicer.

The panel (Widget) collects inputs and settings in a parameter node, the Logic starts the ``drgs_core`` engine in a
background process and streams its results into the scene.  Process control, protocol parsing and scene updates live
in ``DRGS4DSlicerLib`` (no Qt), so they are tested outside Slicer as well.

This file and ``DRGS4DSlicerLib`` import under Python 3.9 (Slicer 5.6/5.8), where the panel explains that the engine
needs Slicer 5.10+ (Python 3.12) or an external Python >= 3.10; ``Testing/slicer/test_packaging.py`` checks it.
"""

import json
import logging
import os
import pathlib
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

from DRGS4DSlicerLib import deps, dicom_runs, inputs, process, protocol, remote, vessels

protocol.translate = _  # the library's status texts go through Slicer's translation too
from DRGS4DSlicerLib.job import ReconstructionJob, find_checkpoint, make_request, new_run_dir
from DRGS4DSlicerLib.scene import SEGMENT_ID, SceneUpdater

log = logging.getLogger("DRGS4D")

DOCUMENTATION_URL = "https://github.com/drgs4d/DRGS4D#3d-slicer-extension-drgs4d-panel"
ENGINE_MIN_PYTHON = (3, 10)  # drgs_core's python_requires (setup.py)
INPUT_MODES = ["case folder", "files", "scene volumes", "DICOM"]
ENGINES = ["local", "remote server"]
# The remote server's address and token live in Slicer's application settings, never in the scene.
SETTINGS_REMOTE_URL = "DRGS4D/RemoteURL"
SETTINGS_REMOTE_TOKEN = "DRGS4D/RemoteToken"
PRESETS = ["none", "demo", "tiny"]
DETECTOR_BINNING = ["auto", "1", "2", "3", "4"]
SCHEDULE_ITERATIONS = {"fast": 10000, "full": 30000}
PRESET_ITERATIONS = {"demo": 1200, "tiny": 150}
THRESHOLD_LIMIT = 100.0  # 1/mm, far above any attenuation; the slider's range follows the result volume below it


def engineRunsInThisPython() -> bool:
    """Can Slicer's own Python run the engine?  Not on Slicer 5.6/5.8 (Python 3.9): use an external Python there."""
    return sys.version_info[:2] >= ENGINE_MIN_PYTHON


def pythonTooOldMessage() -> str:
    return _("This Slicer runs Python {version}; the DRGS4D engine needs Python {required} or later. Use Slicer 5.10 "
             "or later, choose an external Python environment (Python {required}+, with drgs_core installed) under "
             "Advanced, or run on a remote DRGS4D server (Engine: remote server).").format(
        version=sys.version.split()[0], required=".".join(str(v) for v in ENGINE_MIN_PYTHON))


#
# DRGS4DSlicer
#


class DRGS4DSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DRGS4D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Reconstruction")]
        self.parent.dependencies = []
        self.parent.contributors = ["DRGS4D project contributors (DRGS4D open-source project)"]
        self.parent.helpText = _("""
Reconstructs cerebral vessels from a rotational DSA acquisition (fill and mask runs) using only a sparse subset of
the frames, with 4D radiative Gaussian splatting.<br><br>
Choose a case folder (fill_run, mask_run, transforms.json), two run files plus a geometry JSON, two volumes
already in the scene plus a geometry JSON, or the mask and fill rotational XA runs from DICOM (the DICOM database or a
folder); check the inputs; pick the number of training views and press <b>Reconstruct</b>. Training runs in a
background process (GPU when available), or on a remote DRGS4D GPU server (Engine), and a preview volume and surface
are updated in the scene while it trains. At the end the vessel volume, surface model, segmentation, a 4D
(time-resolved) sequence and the rendered DSA appear under one folder in the Data module.<br><br>
<b>Cancel</b> saves a checkpoint; <b>Resume</b> continues from it.<br><br>
See the <a href="{url}">documentation</a> for inputs, settings and supported Slicer versions.
""").format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("""
DRGS4D is an independent, open-source (Apache-2.0) implementation of the method of Liu et al., "4DRGS: 4D Radiative
Gaussian Splatting for Efficient 3D Vessel Reconstruction from Sparse-View Dynamic DSA Images" (IPMI 2025). It uses
3D Slicer, PyTorch (through the PyTorch extension) and the Python scientific stack.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """SampleData entry: the small demo phantom, made on demand by the engine (nothing is downloaded)."""
    try:
        import SampleData
    except ImportError:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DRGS4D", sampleName="DRGS4DDemoPhantom",
        uris=None, fileNames=None, nodeNames=None, loadFiles=False,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "DRGS4DSlicer.png"),
        customDownloader=makeDemoPhantom)


def makeDemoPhantom(source=None):
    """SampleData downloader: shows the DRGS4D panel, whose worker writes the tiny demo phantom into Slicer's
    temporary folder in the background (a few seconds, like a small download); the panel then points at it.
    Returns no nodes: the phantom is a case folder for the panel, not a scene volume."""
    slicer.util.selectModule("DRGS4DSlicer")
    slicer.modules.drgs4dslicer.widgetRepresentation().self().onMakeDemoPhantom()
    return []


#
# Parameter node
#


@parameterNodeWrapper
class DRGS4DSlicerParameterNode:
    """Everything the panel remembers; saved with the scene.

    Inputs: inputMode, caseFolder | fillFile + maskFile | fillVolume + maskVolume, and geometryFile | DICOM runs found
    in dicomFolder and/or the DICOM database (dicomUseDatabase; the mask/fill choice lists come from the listing, so
    they are not bound).  engine: "local" or "remote server" (whose URL and token are in the application settings).
    Settings: views (training frames), schedule, iterations, device ("auto", "cpu" or "cuda:N"; the panel fills its
    list from the worker's --probe, so it is not bound through the .ui), previewInterval (iterations between
    snapshots, 0 = off), outputFolder, load options, seed, preset, detectorBinning, staticField, external Python.
    Results: resultVolume, resultSegmentation, threshold (1/mm; the slider's range follows the result volume's
    values, the annotation only bounds it as Slicer's slider connector requires); nFrames and lastRunFolder are
    bookkeeping.
    """

    inputMode: Annotated[str, Choice(INPUT_MODES)] = "case folder"
    caseFolder: pathlib.Path
    fillFile: pathlib.Path
    maskFile: pathlib.Path
    geometryFile: pathlib.Path
    dicomUseDatabase: bool = True
    dicomFolder: pathlib.Path
    engine: Annotated[str, Choice(ENGINES)] = "local"
    fillVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    views: Annotated[int, WithinRange(1, 2000)] = 30
    schedule: Annotated[str, Choice(["fast", "full"])] = "fast"
    iterations: Annotated[int, WithinRange(100, 60000)] = 10000
    device: str = "auto"
    previewInterval: Annotated[int, WithinRange(0, 100000)] = 500
    outputFolder: pathlib.Path
    loadSequence: bool = True
    loadRenderedDSA: bool = True
    showVolumeRendering: bool = True
    seed: Annotated[int, Minimum(0)] = 0
    preset: Annotated[str, Choice(PRESETS)] = "none"
    detectorBinning: Annotated[str, Choice(DETECTOR_BINNING)] = "auto"
    staticField: bool = False
    useExternalPython: bool = False
    pythonExecutable: pathlib.Path
    resultVolume: vtkMRMLScalarVolumeNode
    resultSegmentation: vtkMRMLSegmentationNode
    threshold: Annotated[float, WithinRange(0.0, THRESHOLD_LIMIT)] = 0.008
    nFrames: int = 0
    lastRunFolder: str = ""


def _path(value) -> Optional[str]:
    """A parameter-node path, or None when it is unset (the wrapper stores an empty path as '.')."""
    if value is None:
        return None
    text = str(value)
    return None if text in ("", ".") else text


# Background tasks during which the inputs and results must not change (their result is applied to them).
BLOCKING_TASKS = ("export", "phantom", "threshold", "labelmap", "files")
# Background tasks whose result goes into the scene's nodes: a closing scene drops them.
SCENE_TASKS = ("export", "threshold", "labelmap")


class ListingTask:
    """A ``dicom_runs.DicomRunLister`` (a worker process) as a background task of the panel: ``poll()`` gives None
    while it runs, then ``{"event": "dicom_listing", "listing"}`` or an ``error`` event."""

    def __init__(self, lister):
        self.lister = lister

    def poll(self) -> Optional[dict]:
        try:
            listing = self.lister.poll()
        except RuntimeError as exc:
            return {"event": "error", "message": str(exc)}
        return None if listing is None else {"event": "dicom_listing", "listing": listing}

    def cancel(self) -> None:
        self.lister.cancel()


class ThreadTask:
    """A slow call (network or file I/O, voxel and mesh work) in a background thread: ``poll()`` gives None while it
    runs, then ``{"event": "result", "result"}`` or an ``error`` event.  ``finish(result)``, if given, runs in the
    thread that polls (Slicer's main thread: the quick scene changes) and its return value is the result."""

    def __init__(self, function, *args, finish=None):
        self._finish = finish
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drgs-panel")
        self._future = executor.submit(function, *args)
        executor.shutdown(wait=False)

    def poll(self) -> Optional[dict]:
        if not self._future.done():
            return None
        try:
            result = self._future.result()
            return {"event": "result", "result": self._finish(result) if self._finish else result}
        except Exception as exc:  # noqa: BLE001 - shown to the user
            log.info("background task failed", exc_info=True)
            return {"event": "error", "message": str(exc) or type(exc).__name__}

    def cancel(self) -> None:
        self._future.cancel()  # a call already running ends in its thread (network calls by their timeout); its
        # result is dropped, and ``finish`` does not run


#
# DRGS4DSlicerWidget
#


class DRGS4DSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel.  Nothing slow runs in Slicer's main thread: the worker reads inputs (``--describe``) and probes the
    interpreter (``--probe``) in background processes, and results are loaded one piece per timer tick."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._task = None  # (kind, task with poll()/cancel()): --describe, --probe, DICOM listing, connection test,
        # scene-volume export, demo phantom
        self._afterExport = None  # what to do with the written files once an "export" task ends
        self._dicomListing = None  # dicom_runs.RunListing of the last listing
        self._installing = False
        self._probe = None  # the last probe event
        self._probeGaveWay = False  # a probe was stopped for another task: run it again when the slot is free
        self._lastSchedule = None
        self._lastPreset = None
        self._thresholdRangeFor = None  # the volume (ID, modified time) the threshold range was taken from
        self._timer = None

    # -- setup --
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DRGS4DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DRGS4DSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.checkInputsButton.connect("clicked(bool)", self.onCheckInputs)
        self.ui.checkPythonButton.connect("clicked(bool)", self.onCheckPython)
        self.ui.applyThresholdButton.connect("clicked(bool)", self.onApplyThreshold)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.exportFilesButton.connect("clicked(bool)", self.onExportFiles)
        self.ui.viewsSlider.connect("valueChanged(int)", self._updateSliderLabels)
        self.ui.iterationsSlider.connect("valueChanged(int)", self._updateSliderLabels)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._onDeviceChosen)
        self.ui.listDicomButton.connect("clicked(bool)", self.onListDicom)
        self.ui.dicomMaskComboBox.connect("currentIndexChanged(int)", self._onDicomRunChosen)
        self.ui.dicomFillComboBox.connect("currentIndexChanged(int)", self._onDicomRunChosen)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.remoteUrlLineEdit.connect("editingFinished()", self._saveRemoteSettings)
        self.ui.remoteTokenLineEdit.connect("editingFinished()", self._saveRemoteSettings)
        url, token = self.logic.remoteSettings()
        self.ui.remoteUrlLineEdit.text = url
        self.ui.remoteTokenLineEdit.text = token
        self._setDeviceChoices([("auto", _("auto")), ("cpu", _("CPU"))])

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollWorker)

        self.initializeParameterNode()
        if not engineRunsInThisPython():
            self.ui.statusLabel.text = pythonTooOldMessage()

    def cleanup(self) -> None:
        """Called when the application closes or the module is reloaded: never leave a worker behind."""
        self.setParameterNode(None)
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self._task is not None:
            self._task[1].cancel()
            self._task = None
        if self._job is not None and self._job.running:
            self._job.kill()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._probeOnce()

    def _probeOnce(self) -> None:
        """Fill the device list in the background, once (entering the module, or after a task that displaced it)."""
        if (self._probe is None and self._task is None and self._params().engine == "local"
                and self._canRunEngine(quiet=True)):
            self.onCheckPython()

    def exit(self) -> None:
        # disconnect and forget the node, so that the next enter() connects it once again (and removes nothing twice)
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None and self._task[0] in SCENE_TASKS:  # its nodes are going: drop what it would apply
            self._task[1].cancel()
            self._task, self._afterExport = None, None
        if self._job is not None and self._job.running:
            self._job.scene_updates = False
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not _path(p.outputFolder):
            p.outputFolder = pathlib.Path(self.logic.defaultOutputFolder())
        if not engineRunsInThisPython() and not p.useExternalPython:
            p.useExternalPython = True

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._lastSchedule = self._parameterNode.schedule
            self._lastPreset = self._parameterNode.preset
            self._thresholdRangeFor = None  # connecting set the slider to the annotation's range
            self._applyCaseLimits()
            self._onParameterNodeModified()

    def _params(self):
        """The parameter node, also while the module is not shown (a run may finish then)."""
        return self._parameterNode or self.logic.getParameterNode()

    # -- GUI state --
    def _applyCaseLimits(self) -> None:
        """Views slider range from the loaded run (1..number of frames)."""
        p = self._parameterNode
        nFrames = p.nFrames if p and p.nFrames > 0 else 200
        self.ui.viewsSlider.minimum = 1
        self.ui.viewsSlider.maximum = nFrames
        if p and p.views > nFrames:
            p.views = nFrames
        self._updateSliderLabels()

    def _applyThresholdRange(self) -> None:
        """Threshold slider range = 0 .. the result volume's largest value (cheap: VTK caches the scalar range)."""
        p = self._parameterNode
        volume = p.resultVolume if p else None
        image = volume.GetImageData() if volume is not None else None
        key = (volume.GetID(), image.GetMTime()) if image is not None else None
        if key == self._thresholdRangeFor:
            return
        self._thresholdRangeFor = key
        top = float(image.GetScalarRange()[1]) if image is not None else THRESHOLD_LIMIT
        top = min(max(top, 1e-6), THRESHOLD_LIMIT)
        slider = self.ui.thresholdSliderWidget
        slider.singleStep = top / 500.0
        slider.maximum = top

    def _updateSliderLabels(self, *args) -> None:
        p = self._parameterNode
        nFrames = p.nFrames if p and p.nFrames > 0 else None
        views = self.ui.viewsSlider.value
        self.ui.viewsValueLabel.text = (_("{views} of {frames}").format(views=views, frames=nFrames) if nFrames
                                        else str(views))
        self.ui.iterationsValueLabel.text = f"{self.ui.iterationsSlider.value:,}"

    def _setDeviceChoices(self, devices) -> None:
        """Fill the device list with (value, label) pairs; the parameter's value stays selected."""
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for value, label in devices:
            combo.addItem(label, value)
        combo.blockSignals(wasBlocked)
        self._showDevice()

    def _showDevice(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        combo = self.ui.deviceComboBox
        index = combo.findData(p.device)
        wasBlocked = combo.blockSignals(True)
        if index < 0:  # a device saved with the scene that this machine has not (yet) reported
            combo.addItem(p.device, p.device)
            index = combo.count - 1
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)

    def _onDeviceChosen(self, index) -> None:
        value = self.ui.deviceComboBox.itemData(index)
        if self._parameterNode is not None and value and self._parameterNode.device != value:
            self._parameterNode.device = value

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.schedule != self._lastSchedule:
            self._lastSchedule = p.schedule
            p.iterations = SCHEDULE_ITERATIONS[p.schedule]
        if p.preset != self._lastPreset:
            self._lastPreset = p.preset
            if p.preset in PRESET_ITERATIONS:
                p.iterations = PRESET_ITERATIONS[p.preset]
        mode = p.inputMode
        self.ui.caseFolderWidget.setVisible(mode == "case folder")
        self.ui.filesWidget.setVisible(mode == "files")
        self.ui.volumesWidget.setVisible(mode == "scene volumes")
        self.ui.dicomWidget.setVisible(mode == "DICOM")
        self.ui.geometryWidget.setVisible(mode in ("files", "scene volumes"))
        self.ui.pythonExecutablePathLineEdit.setEnabled(p.useExternalPython)
        self.ui.remoteWidget.setVisible(p.engine == "remote server")
        self.ui.deviceComboBox.setEnabled(p.engine == "local")  # the server chooses its own GPU
        self._applyThresholdRange()
        self._showDevice()
        self._updateButtons()

    def _inputsComplete(self) -> bool:
        p = self._parameterNode
        if p.inputMode == "case folder":
            return _path(p.caseFolder) is not None
        if p.inputMode == "files":
            return all(_path(x) for x in (p.fillFile, p.maskFile, p.geometryFile))
        if p.inputMode == "DICOM":
            return self._dicomChoice() is not None
        return p.fillVolume is not None and p.maskVolume is not None and _path(p.geometryFile) is not None

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self._job is not None and self._job.running
        blocking = self._task is not None and self._task[0] in BLOCKING_TASKS
        busy = running or self._installing or blocking or (self._job is not None and self._job.loading)
        checking = self._task is not None
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the reconstruction; a checkpoint is saved so that it can resume")
            self.ui.applyButton.enabled = self._job.state.status != "cancelling"
        else:
            self.ui.applyButton.text = _("Reconstruct")
            self.ui.applyButton.toolTip = _("Start the reconstruction in a background process")
            self.ui.applyButton.enabled = bool(p) and self._inputsComplete() and not busy
        resumable = bool(p and p.lastRunFolder and find_checkpoint(p.lastRunFolder)
                         and os.path.isfile(os.path.join(p.lastRunFolder, "drgs4d_request.json")))
        self.ui.resumeButton.enabled = (not busy) and resumable
        self.ui.checkInputsButton.enabled = not busy and not checking
        self.ui.checkPythonButton.enabled = not busy and not checking
        self.ui.listDicomButton.enabled = not busy and not checking
        self.ui.testConnectionButton.enabled = not busy and not checking
        hasResult = bool(p and p.resultVolume is not None)
        for button in (self.ui.applyThresholdButton, self.ui.exportLabelmapButton, self.ui.exportFilesButton):
            button.enabled = hasResult and not busy
        for widget in (self.ui.inputsCollapsibleButton, self.ui.engineCollapsibleButton,
                       self.ui.settingsCollapsibleButton):
            widget.enabled = not busy

    def _askUser(self, title: str, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, title)

    def _canRunEngine(self, quiet: bool = False) -> bool:
        """Slicer's own Python can run the engine, or an external one is chosen."""
        p = self._parameterNode
        if engineRunsInThisPython() or (p is not None and p.useExternalPython):
            return True
        if not quiet:
            slicer.util.errorDisplay(pythonTooOldMessage(), windowTitle=_("DRGS4D"))
        return False

    # -- background checks --
    def _startTask(self, kind: str, command) -> None:
        if self._task is not None:  # a check still running (e.g. the probe) when Reconstruct needs the slot
            log.info("stopping the background %s to start %s", self._task[0], kind)
            self._task[1].cancel()
            self._probeGaveWay = self._probeGaveWay or self._task[0] == "probe"
        self._task = (kind, command)
        self._timer.start()
        self._updateButtons()

    def onCheckInputs(self) -> None:
        p = self._parameterNode
        if self._task is not None or not self._canRunEngine():
            return
        if p.inputMode == "scene volumes":  # the worker reads files: write the volumes first, in the background
            self._exportThen(self.logic.inputsFolder(), self._describe, self.ui.inputSummaryLabel)
        else:
            self._describe()

    def _describe(self, exported=None) -> None:
        try:
            command = self.logic.startDescribe(self._params(), self._dicomChoice(), exported)
        except inputs.InputProblem as exc:
            self.ui.inputSummaryLabel.text = str(exc)
            return
        except Exception as exc:  # noqa: BLE001
            self.ui.inputSummaryLabel.text = inputs.readable_error(exc)
            logging.error(traceback.format_exc())
            return
        self.ui.inputSummaryLabel.text = _("Reading the inputs in the background...")
        self._startTask("describe", command)

    def _exportThen(self, folder, after, label) -> None:
        """Write the chosen scene volumes into ``folder`` in a background thread, then call ``after(paths)``."""
        try:
            task = self.logic.startVolumeExport(self._parameterNode, folder)
        except inputs.InputProblem as exc:
            label.text = str(exc)
            return
        self._afterExport = (after, label)
        label.text = _("Writing the scene volumes for the worker in the background...")
        self._startTask("export", task)

    def _onExported(self, event: dict) -> None:
        (after, label), self._afterExport = self._afterExport, None
        if event.get("event") != "result":
            label.text = _("The scene volumes could not be written for the worker: {reason}. What to do: check that "
                           "the output folder has free space and can be written, or save the volumes to files and "
                           "choose them under 'files'.").format(reason=event.get("message"))
            return
        after(event["result"])

    # -- demo phantom (SampleData) --
    def onMakeDemoPhantom(self) -> None:
        """The worker writes the tiny demo phantom in the background; the panel then points at it."""
        busy = self._job is not None and (self._job.running or self._job.loading)
        if busy or (self._task is not None and self._task[0] in BLOCKING_TASKS):  # a check (the probe) gives way
            self.ui.statusLabel.text = _("The DRGS4D panel is busy: load the demo phantom again when it is done.")
            return
        if not self._canRunEngine():
            return
        try:
            command = self.logic.startDemoPhantom(self._params())  # also before the panel was entered
        except inputs.InputProblem as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self.ui.statusLabel.text = _("Making the demo phantom in the background (a few seconds)...")
        self._startTask("phantom", command)

    def _onPhantomMade(self, event: dict) -> None:
        if event.get("event") != "phantom":
            self.ui.statusLabel.text = _("The demo phantom could not be made: {reason}").format(
                reason=event.get("message") or _("no answer from the worker"))
            return
        p = self._params()
        p.inputMode = "case folder"
        p.caseFolder = pathlib.Path(event["case"])
        p.preset = "tiny"
        self.ui.statusLabel.text = _("The demo phantom is ready in {folder}: press Reconstruct.").format(
            folder=event["case"])
        self._probeOnce()  # the probe that entering the module started gave way to the phantom

    def onCheckPython(self) -> None:
        if self._task is not None or not self._canRunEngine():
            return
        try:
            command = self.logic.startProbe(self._parameterNode)
        except inputs.InputProblem as exc:  # e.g. the external Python is not chosen yet (always so on 5.6/5.8)
            self.ui.deviceInfoLabel.text = str(exc)
            return
        self.ui.deviceInfoLabel.text = _("Checking the Python environment and the GPUs in the background...")
        self._startTask("probe", command)

    def _onTaskDone(self, kind: str, event: dict) -> None:
        handlers = {"describe": self._onDescribed, "probe": self._onProbed, "dicom": self._onDicomListed,
                    "connection": self._onConnectionChecked, "export": self._onExported, "phantom": self._onPhantomMade,
                    "threshold": self._onThresholdApplied, "labelmap": self._onLabelmapExported,
                    "files": self._onFilesExported}
        handlers[kind](event)

    # -- DICOM input --
    def onListDicom(self) -> None:
        """List the rotational runs of the DICOM database and/or the chosen folder in a worker process."""
        p = self._parameterNode
        if self._task is not None or not self._canRunEngine():
            return
        try:
            if not p.useExternalPython:
                self._ensureDependencies()  # the worker reads DICOM with pydicom
            lister = self.logic.startDicomListing(p, getattr(slicer, "dicomDatabase", None))
        except (inputs.InputProblem, deps.DependencyError) as exc:
            self.ui.dicomSummaryLabel.text = str(exc)
            return
        except Exception as exc:  # noqa: BLE001
            self.ui.dicomSummaryLabel.text = inputs.readable_error(exc)
            logging.error(traceback.format_exc())
            return
        self.ui.dicomSummaryLabel.text = _("Listing the rotational runs in the background...")
        self._startTask("dicom", ListingTask(lister))

    def _onDicomListed(self, event: dict) -> None:
        self._dicomListing = event.get("listing")
        choices = self._dicomListing.choices() if self._dicomListing is not None else []
        for combo in (self.ui.dicomMaskComboBox, self.ui.dicomFillComboBox):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for runId, label in choices:
                combo.addItem(label, runId)
            combo.blockSignals(wasBlocked)
        if self._dicomListing is None:
            self.ui.dicomSummaryLabel.text = _("The DICOM runs could not be listed: {reason}").format(
                reason=event.get("message") or _("no answer from the worker"))
        elif not choices:
            reasons = "\n".join("{run}: {why}".format(run=run, why=why) for run, why in self._dicomListing.problems())
            self.ui.dicomSummaryLabel.text = _("No usable rotational run was found.\n{reasons}").format(reasons=reasons)
        else:
            pair = self._dicomListing.preselection()
            if pair is not None:
                self.ui.dicomMaskComboBox.currentIndex = self.ui.dicomMaskComboBox.findData(pair[0])
                self.ui.dicomFillComboBox.currentIndex = self.ui.dicomFillComboBox.findData(pair[1])
            elif len(choices) > 1:
                self.ui.dicomFillComboBox.currentIndex = 1
        self._onDicomRunChosen()

    def _dicomChoice(self):
        """(listing, mask id, fill id) of the chosen runs when they form a pair, else None."""
        listing = self._dicomListing
        if listing is None:
            return None
        maskId = self.ui.dicomMaskComboBox.itemData(self.ui.dicomMaskComboBox.currentIndex)
        fillId = self.ui.dicomFillComboBox.itemData(self.ui.dicomFillComboBox.currentIndex)
        if not maskId or not fillId or listing.pair(maskId, fillId) is None:
            return None
        return listing, maskId, fillId

    def _onDicomRunChosen(self, *args) -> None:
        """Show what the import derives for the chosen pair (geometry, warnings) or why the runs do not pair."""
        listing = self._dicomListing
        maskId = self.ui.dicomMaskComboBox.itemData(self.ui.dicomMaskComboBox.currentIndex)
        fillId = self.ui.dicomFillComboBox.itemData(self.ui.dicomFillComboBox.currentIndex)
        if listing is not None and maskId and fillId:
            self.ui.dicomSummaryLabel.text = "\n".join(listing.summary_lines(maskId, fillId))
            pair = listing.pair(maskId, fillId)
            if pair is not None:
                self._params().nFrames = int(pair["geometry"]["n_frames"])
                if self._parameterNode is not None:
                    self._applyCaseLimits()
        if self._parameterNode is not None:
            self._updateButtons()

    # -- remote engine --
    def _saveRemoteSettings(self) -> None:
        self.logic.saveRemoteSettings(self.ui.remoteUrlLineEdit.text, self.ui.remoteTokenLineEdit.text)

    def onTestConnection(self) -> None:
        """Ask the server for /health in a background thread."""
        if self._task is not None:
            return
        self._saveRemoteSettings()
        url, token = self.logic.remoteSettings()
        if not url or not token:
            self.ui.remoteInfoLabel.text = _("Enter the server URL and the token first.")
            return
        self.ui.remoteInfoLabel.text = _("Connecting to {url}...").format(url=url)
        self._startTask("connection", ThreadTask(remote.check_connection, url, token))

    def _onConnectionChecked(self, event: dict) -> None:
        if event.get("event") != "result":
            self.ui.remoteInfoLabel.text = _("No connection: {reason}").format(reason=event.get("message"))
            return
        health = event["result"]
        self.ui.remoteInfoLabel.text = _("Connected: drgs4d server {version}, {slots} worker slot(s).").format(
            version=health.get("version"), slots=health.get("slots"))

    def _onDescribed(self, event: dict) -> None:
        if event.get("event") != "described":
            self.ui.inputSummaryLabel.text = event.get("message") or _("The inputs could not be read.")
            return
        summary = event["case"]
        self.ui.inputSummaryLabel.text = inputs.format_summary(summary)
        p = self._params()
        p.nFrames = int(summary["n_frames"])
        if self._parameterNode is not None:
            self._applyCaseLimits()

    def _onProbed(self, event: dict) -> None:
        if event.get("event") != "probe":
            self.ui.deviceInfoLabel.text = event.get("message") or _("The Python environment could not be checked.")
            return
        self._probe = event
        gpus = event.get("cuda") or []
        self._setDeviceChoices([("auto", _("auto")), ("cpu", _("CPU"))] + [
            ("cuda:{index}".format(index=g["index"]),
             _("GPU {index}: {name} ({memory} GB)").format(index=g["index"], name=g["name"], memory=g["memory_gb"]))
            for g in gpus])
        self.ui.deviceInfoLabel.text = describeProbe(event)

    # -- actions --
    def onApplyButton(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.ui.statusLabel.text = self._job.state.text
            self._updateButtons()
            return
        self._start(resume=False)

    def onResumeButton(self) -> None:
        self._start(resume=True)

    def _confirmDevice(self) -> bool:
        """No CUDA GPU found: say so and let the user choose to run on the CPU (slow) or not at all."""
        p = self._parameterNode
        if self._probe is None or self._probe.get("cuda") or p.device == "cpu":
            return True
        if not self._askUser(_("DRGS4D: no CUDA GPU found"), _(
                "No CUDA GPU was found in this Python environment, so the reconstruction would run on the CPU. That "
                "is practical only for the 'demo' and 'tiny' problem sizes (Advanced); a full case takes hours.\n\n"
                "Run on the CPU anyway?")):
            return False
        p.device = "cpu"
        return True

    def _ensureDependencies(self) -> None:
        """Install the engine's packages into Slicer's Python after asking; every button is off meanwhile."""
        self._installing = True
        self._updateButtons()
        slicer.app.processEvents()
        try:
            self.logic.ensureDependencies(self._askUser)
        finally:
            self._installing = False
            self._updateButtons()

    def _start(self, resume: bool) -> None:
        p = self._parameterNode
        local = p.engine == "local"
        if local and (not self._canRunEngine() or not self._confirmDevice()):
            return
        try:
            if local and not p.useExternalPython:
                self._ensureDependencies()
            if not local:
                self._saveRemoteSettings()
            if not resume and p.inputMode == "scene volumes":  # the worker reads files: write the volumes first
                runDir = self.logic.newRunDir(p)
                self._exportThen(runDir / "inputs", lambda paths: self._launch(False, runDir, paths),
                                 self.ui.statusLabel)
                return
        except Exception as exc:  # noqa: BLE001
            self._showStartError(exc)
            return
        self._launch(resume)

    @staticmethod
    def _showStartError(exc) -> None:
        if isinstance(exc, (inputs.InputProblem, deps.DependencyError)):
            slicer.util.errorDisplay(str(exc), windowTitle=_("DRGS4D"))
        else:
            slicer.util.errorDisplay(_("The reconstruction could not be started: {reason}").format(
                reason=inputs.readable_error(exc)), windowTitle=_("DRGS4D"), detailedText=traceback.format_exc())

    def _launch(self, resume: bool, runDir=None, exported=None) -> None:
        p = self._params()
        try:
            if resume:
                job = self.logic.resumeReconstruction(p)
            else:
                job = self.logic.startReconstruction(p, dicomChoice=self._dicomChoice(), runDir=runDir,
                                                     exported=exported)
        except Exception as exc:  # noqa: BLE001
            self._showStartError(exc)
            return
        job.updater.on_preview_volume = self._onPreviewVolume
        job.on_event = self._onJobEvent
        self._job = job
        p.lastRunFolder = str(job.run_dir)
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.state.text
        self._timer.start()
        self._updateButtons()

    def _onPreviewVolume(self, node) -> None:
        """The preview volume was created: show it once; later previews update it in place and keep the user's
        window/level, slice layers and volume-rendering settings."""
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        if self._params().showVolumeRendering:
            self.logic.showVolumeRendering(node)

    def _onJobEvent(self, event: dict) -> None:
        name = event.get("event")
        if name in ("log", "output"):
            self.ui.logTextEdit.appendPlainText(event.get("line", ""))

    def onPollWorker(self) -> None:
        """Timer tick: apply what the worker reported, load at most one piece of the results, finish background
        checks.  Each tick stays short (see Testing/slicer/test_widget.py)."""
        if self._task is not None:
            kind, command = self._task
            event = command.poll()
            if event is not None:
                self._task = None
                try:
                    self._onTaskDone(kind, event)
                except Exception:  # noqa: BLE001 - a bad answer must not leave the buttons disabled
                    logging.error(traceback.format_exc())
                finally:
                    self._updateButtons()
        job = self._job
        if job is not None:
            try:
                job.poll()
            except Exception:  # noqa: BLE001 - the timer must keep running
                logging.error(traceback.format_exc())
            self.ui.progressBar.value = int(round(100 * job.state.fraction))
            self.ui.statusLabel.text = job.state.text
            if job.finished:
                self._job = None
                self._onJobFinished(job)
            self._updateButtons()
        if self._task is None and self._job is None:
            self._timer.stop()

    def _onJobFinished(self, job) -> None:
        p = self._params()
        st = job.state
        if st.status == "done":
            volume = job.updater.node("volume")
            if volume is not None:
                p.resultVolume = volume
                p.resultSegmentation = job.updater.node("segmentation")
                if job.updater.threshold is not None:
                    p.threshold = job.updater.threshold
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
                if p.showVolumeRendering:
                    self.logic.showVolumeRendering(volume)
            renders = job.updater.node("renders_proxy")
            if renders is not None:
                self.logic.showImageInSliceView(renders, "Yellow")
            elapsed = st.metrics.get("total_s")
            self.ui.statusLabel.text = (
                _("Finished in {seconds} s. Results: {folder}").format(seconds=f"{elapsed:.0f}", folder=st.run_dir)
                if elapsed else _("Finished. Results: {folder}").format(folder=st.run_dir))
        elif st.status == "cancelled":
            self.ui.statusLabel.text = (_("Cancelled. Press Resume to continue from the checkpoint.")
                                        if st.checkpoint else _("Cancelled."))
        else:
            error = st.error or {}
            message = error.get("message") or _("The reconstruction process stopped unexpectedly.")
            self.ui.statusLabel.text = _("Failed: {reason}").format(reason=message.splitlines()[0])
            details = error.get("traceback") or "\n".join(job.log_lines[-40:])
            if error.get("kind") == "input":
                slicer.util.errorDisplay(message, windowTitle=_("DRGS4D: please check the inputs"))
            else:
                slicer.util.errorDisplay(message, windowTitle=_("DRGS4D"), detailedText=details)

    # -- results: the work runs in a background thread, the scene changes in the timer tick (ThreadTask.finish) --
    def _startResultTask(self, kind: str, start, text: str) -> None:
        if self._task is not None and self._task[0] in BLOCKING_TASKS:
            return
        try:
            task = start()
        except Exception as exc:  # noqa: BLE001 - e.g. no result volume, no segmentation yet
            slicer.util.errorDisplay(inputs.readable_error(exc), windowTitle=_("DRGS4D"))
            return
        self.ui.statusLabel.text = text
        self._startTask(kind, task)

    def _resultTaskFailed(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.errorDisplay(text, windowTitle=_("DRGS4D"))
        self._probeAgain()

    def _probeAgain(self) -> None:
        """Run the probe that gave way to a task once more, now that the task is over."""
        if self._probeGaveWay:
            self._probeGaveWay = False
            self._probeOnce()

    def onApplyThreshold(self) -> None:
        p = self._parameterNode
        threshold = float(p.threshold)
        self._startResultTask(
            "threshold", lambda: self.logic.startThreshold(p.resultVolume, p.resultSegmentation, threshold),
            _("Segmenting the vessels at {threshold} 1/mm in the background...").format(threshold=f"{threshold:g}"))

    def _onThresholdApplied(self, event: dict) -> None:
        if event.get("event") != "result":
            self._resultTaskFailed(_("The vessels could not be segmented: {reason}. What to do: check that the result "
                                     "volume is still loaded and try another threshold.").format(
                reason=event.get("message")))
            return
        segmentation, segment = event["result"]
        self._params().resultSegmentation = segmentation
        text = _("{count} vessel voxels at threshold {threshold} 1/mm").format(
            count=f"{segment.voxels:,}", threshold=f"{segment.threshold:g}")
        if segment.speck_voxels:
            text = _("{count} vessel voxels at threshold {threshold} 1/mm ({specks} voxels of isolated specks "
                     "left out)").format(count=f"{segment.voxels:,}", threshold=f"{segment.threshold:g}",
                                         specks=f"{segment.speck_voxels:,}")
        self.ui.statusLabel.text = text
        self._probeAgain()

    def onExportLabelmap(self) -> None:
        p = self._parameterNode
        self._startResultTask("labelmap", lambda: self.logic.startLabelmapExport(p.resultVolume, p.resultSegmentation),
                              _("Exporting the segmentation to a labelmap in the background..."))

    def _onLabelmapExported(self, event: dict) -> None:
        if event.get("event") != "result":
            self._resultTaskFailed(_("The segmentation could not be exported to a labelmap: {reason}").format(
                reason=event.get("message")))
            return
        self.ui.statusLabel.text = _("Exported to {name}").format(name=event["result"].GetName())
        self._probeAgain()

    def onExportFiles(self) -> None:
        p = self._parameterNode
        self._startResultTask(
            "files", lambda: self.logic.startFileExport(p.resultVolume, p.resultSegmentation, p.lastRunFolder or None),
            _("Writing the segmentation files in the background..."))

    def _onFilesExported(self, event: dict) -> None:
        if event.get("event") != "result":
            self._resultTaskFailed(_("The segmentation files could not be written: {reason}. What to do: check that "
                                     "the run's folder has free space and can be written. No file was changed.").format(
                reason=event.get("message")))
            return
        files = event["result"]
        self.ui.statusLabel.text = _("Written: {folder}").format(folder=os.path.dirname(files[0]))
        slicer.util.infoDisplay(_("Written:\n{files}").format(files="\n".join(files)), windowTitle=_("DRGS4D"))
        self._probeAgain()


def describeProbe(event: dict) -> str:
    """The panel's text for a probe event: versions, GPUs, which render backend runs and how long a run takes."""
    lines = [_("Python {python}, drgs_core {engine}, PyTorch {torch}.").format(
        python=event.get("python"), engine=event.get("drgs_core"), torch=event.get("torch") or _("not installed"))]
    if event.get("problem"):
        lines.append(event["problem"])
    gpus = event.get("cuda") or []
    if not gpus and event.get("torch"):
        lines.append(_("No CUDA GPU found: the reconstruction can run on the CPU, which suits only the 'demo' and "
                       "'tiny' problem sizes. For full cases install a CUDA build of PyTorch (PyTorch Utils module) "
                       "on a machine with an NVIDIA GPU."))
    backend = event.get("backend")
    if backend:
        names = {"cuda": _("DRGS4D CUDA kernels"), "torch": _("PyTorch reference renderer (slower)")}
        if event.get("fast_run_s"):
            lines.append(_("Renderer: {backend} on {device}; a 'fast' run of a full-size case takes about "
                           "{duration}.").format(backend=names.get(backend, backend),
                                                 device=event.get("backend_device"),
                                                 duration=protocol.format_duration(event["fast_run_s"])))
        else:
            lines.append(_("Renderer: {backend} on {device}.").format(backend=names.get(backend, backend),
                                                                      device=event.get("backend_device")))
    return "\n".join(lines)


#
# DRGS4DSlicerLogic
#


class DRGS4DSlicerLogic(ScriptedLoadableModuleLogic):
    """Starts reconstructions and works on their results; usable without the widget (e.g. from the Python console).

    >>> logic = DRGS4DSlicerLogic()
    >>> job = logic.startRequest(make_request(case="/data/case1", out="/tmp/run1", views=30))
    >>> job.wait()  # blocking; the panel polls instead
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        process.ensure_engine_importable()  # a source checkout: make drgs_core importable here too

    def getParameterNode(self):
        return DRGS4DSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def defaultOutputFolder() -> str:
        base = getattr(slicer.app, "defaultScenePath", "") or slicer.app.temporaryPath
        return os.path.join(base, "DRGS4D")

    # -- environment --
    @staticmethod
    def ensureDependencies(ask) -> None:
        """Install the engine's Python packages into Slicer's Python after asking (raises DependencyError)."""
        deps.Installer(ask, status=lambda text: slicer.util.showStatusMessage(text, 3000)).ensure()

    @staticmethod
    def _python(p):
        return (_path(p.pythonExecutable) if p.useExternalPython else None), bool(p.useExternalPython)

    def _chosenPython(self, p):
        """Like _python, for the checks that run the engine locally: an external environment needs its interpreter."""
        python, external = self._python(p)
        if external and not python:
            raise inputs.InputProblem(_("Choose the python executable of the external environment."))
        return python, external

    def startProbe(self, p) -> process.WorkerCommand:
        """``--probe`` in the background: Python, torch, CUDA devices, render backend (poll the result)."""
        python, external = self._chosenPython(p) if p is not None else (None, False)
        return process.WorkerCommand(["--probe"], python=python, external=external, timeout=300)

    # -- remote server --
    @staticmethod
    def remoteSettings():
        """(URL, token) of the remote server from Slicer's application settings ("" when unset)."""
        settings = qt.QSettings()
        return (str(settings.value(SETTINGS_REMOTE_URL, "") or "").strip(),
                str(settings.value(SETTINGS_REMOTE_TOKEN, "") or "").strip())

    @staticmethod
    def saveRemoteSettings(url: str, token: str) -> None:
        settings = qt.QSettings()
        settings.setValue(SETTINGS_REMOTE_URL, str(url or "").strip())
        settings.setValue(SETTINGS_REMOTE_TOKEN, str(token or "").strip())

    def remoteClient(self) -> remote.RemoteClient:
        url, token = self.remoteSettings()
        if not url or not token:
            raise inputs.InputProblem(_("Enter the remote server's URL and token under Engine (the token is in the "
                                        "server's token file)."))
        try:
            return remote.RemoteClient(url, token)
        except ValueError as exc:
            raise inputs.InputProblem(_("The server URL is not valid: {reason}").format(reason=exc)) from None

    # -- DICOM --
    def inputsFolder(self) -> pathlib.Path:
        """Where the checks write what the worker reads (request files, exported volumes, path lists)."""
        folder = pathlib.Path(slicer.app.temporaryPath) / "DRGS4D-inputs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def startDicomListing(self, p, database=None) -> dicom_runs.DicomRunLister:
        """``--list-dicom`` of the chosen folder and/or the XA series of ``database`` (Slicer's ctkDICOMDatabase)
        in the background: the database's file is queried in a thread, the files are read by a worker."""
        python, external = self._chosenPython(p)
        location = dicom_runs.database_location(database) if p.dicomUseDatabase else None
        folder = _path(p.dicomFolder)
        if p.dicomUseDatabase and location is None and not folder:
            raise inputs.InputProblem(_("No DICOM database is open: import the angiography runs with the DICOM "
                                        "module, or choose a folder of DICOM files."))
        if location is None and not folder:
            raise inputs.InputProblem(_("Choose a folder of DICOM files, or search the Slicer DICOM database."))
        return dicom_runs.DicomRunLister([folder] if folder else [], database=location, python=python,
                                         external=external, folder=str(self.inputsFolder())).start()

    # -- scene volumes, demo phantom --
    @staticmethod
    def startVolumeExport(p, folder) -> "ThreadTask":
        """The chosen fill and mask volumes -> ``folder/{fill,mask}_run.nrrd``, written in a background thread (only
        their voxel arrays are taken here, without copying); the result is ``{"fill": path, "mask": path}``."""
        if p.fillVolume is None or p.maskVolume is None:
            raise inputs.InputProblem(_("Choose the fill and the mask volume."))
        folder = pathlib.Path(folder)
        targets = {"fill": (inputs.snapshot_volume_node(p.fillVolume, _("fill run")), folder / "fill_run.nrrd"),
                   "mask": (inputs.snapshot_volume_node(p.maskVolume, _("mask run")), folder / "mask_run.nrrd")}
        return ThreadTask(inputs.write_volume_snapshots, targets)

    def startDemoPhantom(self, p) -> process.WorkerCommand:
        """The worker writes the tiny demo phantom into Slicer's temporary folder (poll for a ``phantom`` event)."""
        from DRGS4DSlicerLib import selftest

        python, external = self._chosenPython(p)
        folder = os.path.join(slicer.app.temporaryPath, "DRGS4D-demo-phantom")
        return process.WorkerCommand(selftest.phantom_command(folder), python=python, external=external, timeout=300)

    # -- inputs --
    @staticmethod
    def caseName(p, dicomChoice=None) -> str:
        if p.inputMode == "DICOM" and dicomChoice is not None:
            listing, _maskId, fillId = dicomChoice
            return listing.run(fillId).get("series_description") or "dicom"
        if p.inputMode == "case folder" and _path(p.caseFolder):
            return pathlib.Path(_path(p.caseFolder)).name
        if p.inputMode == "files" and _path(p.fillFile):
            return pathlib.Path(_path(p.fillFile)).name.split(".")[0]
        if p.inputMode == "scene volumes" and p.fillVolume is not None:
            return p.fillVolume.GetName()
        return "case"

    @staticmethod
    def inputRequest(p, folder, dicomChoice=None, exported=None) -> dict:
        """The input fields of a request.  ``dicomChoice``: (RunListing, mask run id, fill run id) in the DICOM mode
        (several DICOM sources are listed in a file in ``folder``); ``exported``: the files of the scene volumes
        (``startVolumeExport``) in the scene-volumes mode."""
        if p.inputMode == "DICOM":
            if dicomChoice is None:
                raise inputs.InputProblem(_("List the rotational runs and choose a mask and a fill run that pair."))
            listing, maskId, fillId = dicomChoice
            request = listing.request(maskId, fillId, out="", folder=folder)
            return {key: request[key] for key in ("dicom", "fill_uid", "mask_uid")}
        if p.inputMode == "case folder":
            return inputs.input_request(case=_path(p.caseFolder))
        if p.inputMode == "files":
            return inputs.input_request(fill=_path(p.fillFile), mask=_path(p.maskFile), geometry=_path(p.geometryFile))
        if exported is None:
            raise inputs.InputProblem(_("Choose the fill and the mask volume."))
        return inputs.input_request(fill=exported["fill"], mask=exported["mask"], geometry=_path(p.geometryFile))

    def startDescribe(self, p, dicomChoice=None, exported=None) -> process.WorkerCommand:
        """``--describe`` of the chosen inputs in the background (scene volumes: of their ``exported`` files)."""
        python, external = self._chosenPython(p)
        folder = self.inputsFolder()
        request = self.inputRequest(p, folder, dicomChoice, exported)
        path = folder / "describe_request.json"
        path.write_text(json.dumps(request), encoding="utf-8")
        return process.WorkerCommand(["--describe", str(path)], python=python, external=external, timeout=300)

    # -- runs --
    def newRunDir(self, p, dicomChoice=None) -> pathlib.Path:
        """A new run folder under the output folder, named for the case."""
        return new_run_dir(_path(p.outputFolder) or self.defaultOutputFolder(), self.caseName(p, dicomChoice))

    def startReconstruction(self, p, onPreviewVolume=None, dicomChoice=None, runDir=None,
                            exported=None) -> ReconstructionJob:
        """Start a run of the panel's inputs and settings, locally or on the remote server (``p.engine``).
        Scene volumes must be written first (``startVolumeExport`` into ``runDir/inputs``; ``exported``)."""
        if p.engine == "remote server" and p.inputMode == "DICOM":
            raise inputs.InputProblem(_("The remote server cannot read DICOM files from this computer. Import the runs "
                                        "into a case folder first (drgs4d import-dicom) and choose it as the input, or "
                                        "run with the local engine."))
        name = self.caseName(p, dicomChoice)
        runDir = pathlib.Path(runDir) if runDir is not None else self.newRunDir(p, dicomChoice)
        request = make_request(
            **self.inputRequest(p, runDir / "inputs", dicomChoice, exported),
            out=str(runDir), views=int(p.views), schedule=p.schedule, iterations=int(p.iterations), device=p.device,
            seed=int(p.seed), snapshot_every=int(p.previewInterval), static_field=bool(p.staticField),
            preset=None if p.preset == "none" else p.preset,
            detector_binning=None if p.detectorBinning == "auto" else int(p.detectorBinning))
        return self.startRequest(request, runDir, name, p, onPreviewVolume)

    def resumeReconstruction(self, p, onPreviewVolume=None) -> ReconstructionJob:
        if not p.lastRunFolder:
            raise inputs.InputProblem(_("There is no earlier run to resume."))
        if p.engine == "remote server":
            raise inputs.InputProblem(_("Resume continues a run with the local engine: choose Engine: local (the "
                                        "checkpoint of a remote run was downloaded with its results)."))
        python, external = self._python(p)
        name = pathlib.Path(p.lastRunFolder).name
        job = ReconstructionJob.resume(slicer.mrmlScene, p.lastRunFolder, name=f"DRGS4D {name} (resumed)",
                                       python=python, external=external, load_options=self._loadOptions(p),
                                       updater_kwargs=self._updaterKwargs(onPreviewVolume))
        return job.start()

    def startRequest(self, request: dict, runDir=None, name: str = "case", p=None,
                     onPreviewVolume=None) -> ReconstructionJob:
        runDir = pathlib.Path(runDir or request["out"])
        python, external = self._python(p) if p is not None else (None, False)
        client = self.remoteClient() if p is not None and p.engine == "remote server" else None
        job = ReconstructionJob(slicer.mrmlScene, request, runDir, name=f"DRGS4D {name} {time.strftime('%H:%M')}",
                                python=python, external=external, remote_client=client,
                                load_options=self._loadOptions(p) if p is not None else {},
                                updater_kwargs=self._updaterKwargs(onPreviewVolume))
        return job.start()

    @staticmethod
    def _loadOptions(p) -> dict:
        return {"load_sequence": bool(p.loadSequence), "load_renders": bool(p.loadRenderedDSA)}

    @staticmethod
    def _updaterKwargs(onPreviewVolume) -> dict:
        kwargs = {"on_preview_volume": onPreviewVolume}
        try:
            kwargs["segmentations_logic"] = slicer.modules.segmentations.logic()
            kwargs["sequences_logic"] = slicer.modules.sequences.logic()
        except AttributeError:
            pass
        return kwargs

    # -- results --
    @staticmethod
    def _updater(volumeNode, segmentationNode=None) -> SceneUpdater:
        if volumeNode is None:
            raise inputs.InputProblem(_("Choose the reconstructed vessel volume first."))
        return SceneUpdater.attach(volumeNode, segmentationNode)

    def applyThreshold(self, volumeNode, segmentationNode, threshold: float):
        """Re-segment ``volumeNode`` at ``threshold`` (1/mm) in this thread (scripts; the panel uses startThreshold);
        returns (segmentation node, vessel voxel count)."""
        updater = self._updater(volumeNode, segmentationNode)
        count = updater.set_threshold(threshold)
        return updater.node("segmentation"), count

    def startThreshold(self, volumeNode, segmentationNode, threshold: float) -> ThreadTask:
        """Segment ``volumeNode`` at ``threshold`` (1/mm), specks removed, with its closed surface, in a background
        thread; polling applies it to the segmentation: the result is (segmentation node, vessels.VesselSegment)."""
        updater = self._updater(volumeNode, segmentationNode)

        def apply(segment):
            updater.apply_segment(segment)
            return updater.node("segmentation"), segment

        return ThreadTask(vessels.segment_volume, *updater.threshold_input(), float(threshold), finish=apply)

    def _segmented(self, volumeNode, segmentationNode) -> SceneUpdater:
        updater = self._updater(volumeNode, segmentationNode)
        if updater.node("segmentation") is None:
            raise inputs.InputProblem(_("Apply a threshold first: there is no segmentation yet."))
        return updater

    def exportLabelmap(self, volumeNode, segmentationNode):
        return self._segmented(volumeNode, segmentationNode).export_labelmap()

    def startLabelmapExport(self, volumeNode, segmentationNode) -> ThreadTask:
        """The vessel segment on the volume's grid, made in a background thread; polling shows it as a labelmap
        volume node (the result)."""
        updater = self._segmented(volumeNode, segmentationNode)
        return ThreadTask(vessels.labelmap_from_snapshot, updater.labelmap_snapshot(), finish=updater.apply_labelmap)

    def _exportFolder(self, volumeNode, runFolder=None) -> str:
        return os.path.join(runFolder or volumeNode.GetAttribute("DRGS4D.run") or self.defaultOutputFolder(),
                            "export")

    def exportFiles(self, volumeNode, segmentationNode, runFolder=None) -> list:
        updater = self._segmented(volumeNode, segmentationNode)
        return updater.export_segmentation_files(self._exportFolder(volumeNode, runFolder))

    def startFileExport(self, volumeNode, segmentationNode, runFolder=None) -> ThreadTask:
        """Labelmap NRRD, .seg.nrrd and STL of the vessel segment into ``<run>/export``, written (atomically, read
        back) by a background thread; the result is the list of paths."""
        updater = self._segmented(volumeNode, segmentationNode)
        return ThreadTask(vessels.write_export_files, updater.labelmap_snapshot(),
                          self._exportFolder(volumeNode, runFolder), updater.file_stem, SEGMENT_ID)

    @staticmethod
    def showImageInSliceView(imageNode, viewName: str = "Yellow") -> None:
        """Show a 2D image sequence's frame (e.g. the rendered DSA) alone in one slice view, facing it."""
        layoutManager = getattr(slicer.app, "layoutManager", lambda: None)()
        sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager is not None else None
        if sliceWidget is None:
            return
        sliceWidget.mrmlSliceCompositeNode().SetBackgroundVolumeID(imageNode.GetID())
        sliceWidget.mrmlSliceCompositeNode().SetForegroundVolumeID(None)
        sliceWidget.mrmlSliceNode().SetOrientation("Axial")  # the frames lie in the IJ (axial) plane
        sliceWidget.sliceLogic().FitSliceToAll()

    @staticmethod
    def showVolumeRendering(volumeNode) -> None:
        """Show ``volumeNode`` with volume rendering.  The transfer function is chosen once, when the display node is
        created (scaled to the values then, attenuation in 1/mm); later calls only make it visible, so the user's
        own adjustments - and a preview that grows brighter while training - keep it."""
        vrLogic = slicer.modules.volumerendering.logic()
        displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
        if displayNode is not None:
            displayNode.SetVisibility(True)
            return
        displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
        displayNode.SetVisibility(True)
        image = volumeNode.GetImageData()
        top = float(image.GetScalarRange()[1]) if image is not None else 0.0
        if top <= 0:
            return
        volumeProperty = displayNode.GetVolumePropertyNode().GetVolumeProperty()
        opacity = volumeProperty.GetScalarOpacity()
        opacity.RemoveAllPoints()
        opacity.AddPoint(0.0, 0.0)
        opacity.AddPoint(0.15 * top, 0.0)
        opacity.AddPoint(0.5 * top, 0.4)
        opacity.AddPoint(top, 0.9)
        colors = volumeProperty.GetRGBTransferFunction()
        colors.RemoveAllPoints()
        colors.AddRGBPoint(0.0, 0.5, 0.0, 0.0)
        colors.AddRGBPoint(0.5 * top, 0.9, 0.2, 0.15)
        colors.AddRGBPoint(top, 1.0, 0.9, 0.8)


#
# DRGS4DSlicerTest
#


class DRGS4DSlicerTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a tiny CPU reconstruction of the demo phantom through the real worker process (the same
    path the pytest suite ``Testing/slicer/test_e2e_worker.py`` covers outside Slicer)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not engineRunsInThisPython():
            self.delayDisplay(_("Skipped: {reason}").format(reason=pythonTooOldMessage()))
            return
        self.setUp()
        self.test_BrokenInputIsReadable()
        self.setUp()
        self.test_TinyPhantomReconstruction()

    def _wait(self, job, timeout=600.0):
        deadline = time.time() + timeout
        while not job.finished:
            job.poll()
            slicer.app.processEvents()
            if time.time() > deadline:
                job.kill()
                self.fail("the reconstruction did not finish in time")
            time.sleep(0.05)
        return job.state

    def _engineAvailable(self) -> bool:
        try:
            import torch  # noqa: F401
            import drgs_core.pipeline  # noqa: F401
        except ImportError as exc:
            self.delayDisplay(_("Skipped the reconstruction: the engine cannot be imported in Slicer's Python "
                                "({reason}). Press Reconstruct in the DRGS4D panel once to install PyTorch and the "
                                "other dependencies.").format(reason=exc))
            return False
        return True

    def test_BrokenInputIsReadable(self):
        self.delayDisplay("A broken input gives a readable message")
        logic = DRGS4DSlicerLogic()
        folder = pathlib.Path(slicer.app.temporaryPath) / "DRGS4DTest" / "broken"
        folder.mkdir(parents=True, exist_ok=True)
        job = logic.startRequest(make_request(case=str(folder / "no-such-case"), out=str(folder / "run"),
                                              device="cpu", preset="tiny"))
        state = self._wait(job, timeout=300)
        self.assertEqual(state.status, "failed")
        self.assertEqual(state.error["kind"], "input")
        self.assertNotIn("Traceback", state.error["message"])
        self.delayDisplay("Test passed")

    def test_TinyPhantomReconstruction(self):
        if not self._engineAvailable():
            return
        from DRGS4DSlicerLib import selftest

        self.delayDisplay("Writing the tiny phantom")
        base = pathlib.Path(slicer.app.temporaryPath) / "DRGS4DTest"
        case = selftest.write_tiny_phantom(base / "tiny_case")
        out = new_run_dir(base, "tiny")
        logic = DRGS4DSlicerLogic()
        snapshots = []
        job = logic.startRequest(selftest.tiny_request(case, str(out)), out, "tiny")
        job.on_event = lambda e: snapshots.append(e["iteration"]) if e.get("event") == "preview_applied" else None
        self.delayDisplay("Reconstructing on the CPU")
        state = self._wait(job)
        self.assertEqual(state.status, "done", msg=str(state.error))
        self.assertEqual(snapshots, sorted(snapshots))
        self.assertGreater(len(snapshots), 0)
        for role in ("volume", "model", "segmentation", "sequence"):
            self.assertIsNotNone(job.updater.node(role), role)
        volume = job.updater.node("volume")
        self.assertEqual(volume.GetImageData().GetDimensions(), tuple(selftest.TINY_PHANTOM["volume_resolution"]))
        count = logic.applyThreshold(volume, job.updater.node("segmentation"), job.updater.threshold or 0.001)[1]
        self.assertGreater(count, 0)
        self.delayDisplay("Test passed")
