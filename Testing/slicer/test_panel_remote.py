"""The panel's "remote server" engine against a real `drgs4d serve` process on loopback: the URL and token live in
the application settings (never in the parameter node or the saved scene), "Test connection" asks the server in a
background thread, and Reconstruct runs the tiny phantom on the server through the same job runner and timer as a
local run: previews stream in, and the results are downloaded and loaded into the scene."""

import hashlib
import pathlib
import sys
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("fastapi")
SERVE_TESTS = pathlib.Path(__file__).resolve().parents[1] / "serve"
if str(SERVE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVE_TESTS))
from server_proc import Server  # noqa: E402
from slicer_standins import load_module, tick_until  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("panel-remote") / "data", workers=1).start()
    yield srv
    srv.stop()


@pytest.fixture
def widget(monkeypatch, scene, tmp_path, worker_env):
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    module = load_module(monkeypatch, scene, tmp_path, "5.6")
    w = module.DRGS4DSlicerWidget()
    w.setup()
    w._parameterNode.engine = "remote server"
    w.enter()
    assert w._task is None  # no local probe for a remote engine
    yield w
    w.cleanup()
    sys.modules.pop("DRGS4DSlicer", None)


def _enter_server(widget, url, token):
    widget.ui.remoteUrlLineEdit.text = url
    widget.ui.remoteTokenLineEdit.text = token
    widget.ui.remoteTokenLineEdit.emit("editingFinished")


def test_settings_hold_the_token_and_test_connection_asks_the_server(widget, server, scene):
    settings = sys.modules["qt"].settings
    assert widget.ui.remoteWidget.visible and not widget.ui.deviceComboBox.enabled
    widget.onTestConnection()
    assert widget._task is None and "URL and the token first" in widget.ui.remoteInfoLabel.text

    _enter_server(widget, server.url, "not-the-token")
    assert settings == {"DRGS4D/RemoteURL": server.url, "DRGS4D/RemoteToken": "not-the-token"}
    widget.onTestConnection()
    assert not widget.ui.testConnectionButton.enabled and "Connecting" in widget.ui.remoteInfoLabel.text
    tick_until(widget, lambda: widget._task is None, timeout=60)
    assert "No connection" in widget.ui.remoteInfoLabel.text and "token" in widget.ui.remoteInfoLabel.text

    _enter_server(widget, server.url, server.token)
    widget.onTestConnection()
    ticks = tick_until(widget, lambda: widget._task is None, timeout=60)
    assert "Connected: drgs4d server" in widget.ui.remoteInfoLabel.text and "1 worker slot" in \
        widget.ui.remoteInfoLabel.text
    assert max(ticks) < 0.05 and widget.ui.testConnectionButton.enabled

    node = widget._parameterNode.parameterNode  # the scene keeps neither the token nor the address
    values = [node.GetParameter(name) for name in node.GetParameterNames()]
    assert not any(server.token in v or server.url in v for v in values)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    assert "DRGS4D" in xml and server.token not in xml and server.url not in xml


def _digest(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_reconstruct_on_the_server_lands_in_the_scene_like_a_local_run(widget, server, tiny_case, tmp_path):
    from drgs_core.io.volumes import read_volume
    from DRGS4DSlicerLib import remote

    _enter_server(widget, server.url, server.token)
    p = widget._parameterNode
    p.caseFolder = pathlib.Path(tiny_case)
    p.outputFolder = tmp_path / "out"
    p.preset, p.views, p.iterations, p.previewInterval = "tiny", 8, 100, 50
    p.loadRenderedDSA, p.showVolumeRendering = False, False
    widget.onApplyButton()
    job = widget._job
    assert job is not None, widget.ui.statusLabel.text
    assert isinstance(job.worker, remote.RemoteJob) and "remote server" in job.state.text
    assert widget.ui.applyButton.text == "Cancel" and not widget.ui.engineCollapsibleButton.enabled
    ticks = tick_until(widget, lambda: widget._job is None)
    assert job.state.status == "done", (job.state.error, job.log_lines[-10:])
    assert max(ticks) < 0.1, sorted(ticks)[-5:]
    assert job.state.snapshots == [50]  # the server's preview was downloaded and shown
    assert "submitted as job" in widget.ui.logTextEdit.text

    # the server's results, byte for byte in the local run folder, and in the scene
    server_out = server.data / "jobs" / job.worker.job_id / "out"
    assert _digest(job.run_dir / "volume.nii.gz") == _digest(server_out / "volume.nii.gz")
    volume, _info = read_volume(server_out / "volume.nii.gz")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(p.resultVolume), np.transpose(volume, (2, 1, 0)))
    assert p.resultSegmentation is not None and job.updater.node("sequence") is not None
    assert "Finished" in widget.ui.statusLabel.text and widget.ui.engineCollapsibleButton.enabled


def test_what_the_remote_engine_cannot_do_is_said_plainly(widget, tmp_path):
    logic, p = widget.logic, widget._parameterNode
    p.inputMode = "DICOM"
    with pytest.raises(sys.modules["DRGS4DSlicer"].inputs.InputProblem, match="import-dicom"):
        logic.startReconstruction(p)
    p.inputMode, p.lastRunFolder = "case folder", str(tmp_path)
    with pytest.raises(Exception, match="Engine: local"):
        logic.resumeReconstruction(p)
    _enter_server(widget, "ftp://server", "t")
    with pytest.raises(Exception, match="server URL is not valid"):
        logic.remoteClient()


def test_cancel_stops_the_server_job_without_blocking_and_keeps_its_checkpoint(widget, server, tiny_case, tmp_path):
    _enter_server(widget, server.url, server.token)
    p = widget._parameterNode
    p.caseFolder = pathlib.Path(tiny_case)
    p.outputFolder = tmp_path / "out"
    p.preset, p.views, p.iterations, p.previewInterval = "tiny", 8, 5000, 0
    widget.onApplyButton()
    job = widget._job
    tick_until(widget, lambda: job.state.stage == "train" and (job.state.iteration or 0) >= 3)
    threads, request_cancel = [], job.worker.request_cancel
    job.worker.request_cancel = lambda *a: (threads.append(threading.current_thread()), request_cancel(*a))
    widget.onApplyButton()  # Cancel: the HTTP request goes out from a background thread
    assert job.state.status == "cancelling"
    tick_until(widget, lambda: widget._job is None)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert job.state.status == "cancelled" and job.state.checkpoint == str(job.run_dir / "checkpoint.pt")
    assert (job.run_dir / "checkpoint.pt").is_file() and "Press Resume" in widget.ui.statusLabel.text
    assert server.call("GET", f"/jobs/{job.worker.job_id}")[1]["state"] == "cancelled"
