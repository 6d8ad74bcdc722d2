"""ReconstructionJob: the real worker process running the real engine on the tiny phantom (Testing/conftest.py),
streamed into a real MRML scene: snapshot order, the in-place preview, the final nodes and their geometry, and the
other ways a run ends - an input error, an internal error, a crash (the worker killed), a hung worker killed after the
grace period, and a cancel before training.  Cancel during training and resume: test_e2e_worker.py."""

import json
from pathlib import Path
import os
import shutil
import signal
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")

from procutil import group_members, pid_alive  # noqa: E402
from DRGS4DSlicerLib import job as job_mod  # noqa: E402
from DRGS4DSlicerLib import selftest  # noqa: E402
from DRGS4DSlicerLib.job import ReconstructionJob, find_checkpoint, make_request  # noqa: E402
from DRGS4DSlicerLib.scene import ras_of_voxel  # noqa: E402


def _job(scene, case, run_dir, worker_env, **overrides):
    request = selftest.tiny_request(str(case), str(run_dir), **overrides)
    return ReconstructionJob(scene, request, run_dir, name=run_dir.name, extra_env=worker_env, cancel_grace_s=60)


def _poll_until(job, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        job.poll()
        assert not job.worker.finished(), (job.state, job.log_lines[-20:])
        assert time.monotonic() < deadline, job.log_lines[-20:]
        time.sleep(0.01)


def test_make_request_and_run_dir(tmp_path):
    assert make_request(case="/c", views=30, iterations=None) == {"case": "/c", "views": 30}
    with pytest.raises(ValueError):
        make_request(bogus=1)
    a = job_mod.new_run_dir(tmp_path, "my case")
    a.mkdir()
    b = job_mod.new_run_dir(tmp_path, "my case")
    assert a.name.startswith("my_case_") and a != b


def test_find_checkpoint_is_the_engine_checkpoint_only(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"a result")
    (tmp_path / ".tmp-0123456789ab-checkpoint.pt").write_bytes(b"an interrupted write")
    assert find_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path) == str(tmp_path / "checkpoint.pt")
    assert find_checkpoint(tmp_path / "missing") is None


# ---- a run to the end ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_job(tiny_case, tmp_path_factory, worker_env):
    scene = slicer.vtkMRMLScene()
    job = _job(scene, tiny_case, tmp_path_factory.mktemp("job_done") / "run", worker_env, iterations=40)
    previews = []

    def on_event(event):
        if event["event"] == "preview_applied":
            node = job.updater.node("preview_volume")
            previews.append((event["iteration"], node.GetID(), slicer.util.arrayFromVolume(node).copy()))

    job.on_event = on_event
    job.start().wait(timeout=300, interval=0.001)  # poll fast so that (nearly) every snapshot is applied
    yield job, previews
    scene.Clear(1)


def test_snapshots_stream_into_one_preview_node(done_job):
    job, previews = done_job
    assert job.state.status == "done", (job.state.error, job.log_lines[-20:])
    iterations = [it for it, _, _ in previews]
    # snapshots at 10, 20, 30; a poll that finds two applies only the newer one
    assert len(iterations) >= 2 and set(iterations) <= {10, 20, 30} and iterations[-1] == 30
    assert iterations == sorted(iterations) == job.state.snapshots
    assert len({node_id for _, node_id, _ in previews}) == 1  # one preview node, updated in place
    assert not np.array_equal(previews[0][2], previews[-1][2])  # training changed it


def test_final_nodes_have_the_engine_geometry(done_job, tiny_case):
    from drgs_core.io import read_case, read_mesh, read_volume
    from vtk.util.numpy_support import vtk_to_numpy

    job = done_job[0]
    st = job.state
    assert st.status == "done" and st.returncode == 0 and st.fraction == 1.0
    for key in ("volume", "mesh_vtk", "segmentation", "volume_4d", "renders", "metrics", "checkpoint"):
        assert os.path.isfile(st.outputs[key]), key
    grid = read_case(tiny_case).grid
    volume = job.updater.node("volume")
    assert volume.GetImageData().GetDimensions() == tuple(grid.resolution)
    array, _ = read_volume(st.outputs["volume"])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(volume), np.transpose(array, (2, 1, 0)), rtol=1e-6)
    for ijk in [(0, 0, 0), tuple(np.array(grid.resolution) - 1), (3, 17, 9)]:
        lps = grid.index_to_world(np.array(ijk, float))
        np.testing.assert_allclose(ras_of_voxel(volume, ijk), [-lps[0], -lps[1], lps[2]], atol=1e-4)
    verts, _ = read_mesh(st.outputs["mesh_vtk"])
    points = vtk_to_numpy(job.updater.node("model").GetPolyData().GetPoints().GetData())
    np.testing.assert_allclose(points, verts * np.array([-1.0, -1.0, 1.0]), atol=1e-3)
    # the segmentation is at the level the engine meshed at (the done event's metrics carry it)
    assert st.metrics["iso_level"] > 0 and job.updater.threshold == pytest.approx(st.metrics["iso_level"])
    # ... and it is the engine's labelmap: the threshold less the isolated specks the engine dropped
    label = slicer.util.arrayFromVolume(job.updater.export_labelmap())
    engine_seg, _ = read_volume(st.outputs["segmentation"])
    np.testing.assert_array_equal(label > 0, np.transpose(engine_seg > 0, (2, 1, 0)))
    above = array >= st.metrics["iso_level"]
    assert not np.any((engine_seg > 0) & ~above)
    specks = json.loads(Path(st.outputs["metrics"]).read_text())["specks"]
    assert int(above.sum() - (engine_seg > 0).sum()) == specks["dropped_voxels"]
    assert job.updater.node("sequence").GetNumberOfDataNodes() == 2  # times_4d
    assert job.updater.node("sequence_browser") is not None and job.updater.node("renders") is not None
    assert job.updater.node("preview_volume") is None
    assert json.loads(job.request_path.read_text())["out"] == str(job.run_dir)


# ---- other endings -------------------------------------------------------------------------------------------------

def test_input_error_is_reported_readably(scene, tiny_case, tmp_path, worker_env):
    case = tmp_path / "no_mask"
    shutil.copytree(tiny_case, case, ignore=shutil.ignore_patterns("mask_run*", "truth"))
    state = _job(scene, case, tmp_path / "run", worker_env).start().wait(timeout=120)
    assert state.status == "failed" and state.returncode == 2
    assert state.error["kind"] == "input"
    assert "mask_run" in state.error["message"] and "Traceback" not in state.error["message"]
    assert state.text.startswith("Error: ")


def _inconsistent_checkpoint(request: dict, path) -> None:
    """A checkpoint of the right run (fingerprint and schedule match) whose model state is not a model's: what
    a buggy writer would leave. Unlike a damaged file (an input error), loading it is an internal error."""
    import torch
    from dataclasses import asdict

    from drgs_core.fingerprint import fingerprint
    from drgs_core.pipeline import ReconstructConfig, _cpu_sized, load_case

    cfg, _ = _cpu_sized(ReconstructConfig(**request), torch.device("cpu"))
    torch.save({"fingerprint": fingerprint(load_case(cfg), cfg), "train_config": asdict(cfg.train_config()),
                "n_train": cfg.views, "model": {"not": "a model"}, "state": {}}, path)


def test_internal_error_keeps_the_traceback(scene, tiny_case, tmp_path, worker_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = _job(scene, tiny_case, run_dir, worker_env, resume=True)
    _inconsistent_checkpoint(job.request, run_dir / "checkpoint.pt")
    state = job.start().wait(timeout=120)
    assert state.status == "failed" and state.returncode == 1
    assert state.error["kind"] == "internal" and "load_checkpoint" in state.error["traceback"]
    assert state.text.startswith("Error: ")


def test_a_killed_worker_is_reported_with_its_last_log_lines(scene, tiny_case, tmp_path, worker_env):
    job = _job(scene, tiny_case, tmp_path / "run", worker_env, iterations=2000, snapshot_every=0)
    job.start()
    _poll_until(job, lambda: job.state.stage == "train" and (job.state.iteration or 0) >= 3)
    os.kill(job.worker.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    state = job.wait(timeout=60)
    assert state.status == "failed" and state.returncode == -signal.SIGKILL
    assert state.error["kind"] == "crashed" and "exit code -9" in state.error["message"]
    assert "worker pid" in state.error["message"]  # the worker's last log lines


def test_a_hung_worker_is_killed_after_the_grace_period(scene, tiny_case, tmp_path, worker_env):
    run_dir = tmp_path / "run"
    job = _job(scene, tiny_case, run_dir, worker_env, iterations=2000, snapshot_every=0, checkpoint_every=5)
    job.cancel_grace_s = 1.0
    job.start()
    _poll_until(job, lambda: (job.state.iteration or 0) >= 8)
    os.kill(job.worker.pid, signal.SIGSTOP)  # frozen: it cannot react to the cancel request any more
    t0 = time.monotonic()
    job.cancel()
    state = job.wait(timeout=60, interval=0.02)
    assert time.monotonic() - t0 < 15
    assert state.status == "cancelled" and state.returncode == -signal.SIGKILL
    assert state.checkpoint == str(run_dir / "checkpoint.pt")  # the last periodic save can still be resumed
    assert not pid_alive(job.worker.pid) and not group_members(job.worker.pgid)


def test_cancel_before_training_offers_no_resume(scene, tiny_case, tmp_path, worker_env):
    run_dir = tmp_path / "run"
    job = _job(scene, tiny_case, run_dir, worker_env)
    job.start()
    # the worker logs its pid once its stop handlers are installed; loading the engine takes a while longer
    _poll_until(job, lambda: any("worker pid" in line for line in job.log_lines))
    job.cancel()
    state = job.wait(timeout=120, interval=0.02)
    assert state.status == "cancelled" and state.returncode == 3, (state.error, job.log_lines[-20:])
    assert state.checkpoint is None and find_checkpoint(run_dir) is None
    assert state.text.startswith("Cancelled before training")
    assert state.snapshots == [] and job.updater.node("volume") is None
    assert not group_members(job.worker.pgid)
