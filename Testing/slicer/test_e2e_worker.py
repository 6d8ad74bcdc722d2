"""End to end: the real drgs_core worker process runs a CPU reconstruction of the tiny phantom (Testing/conftest.py)
and the panel's job/scene code streams it into a real MRML scene.

One scenario is run once and checked by several tests: a run is cancelled during training after its first preview
snapshot, then resumed from its checkpoint to the end (about 10 s with one thread per worker)."""

import os
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")

from procutil import group_members, pid_alive  # noqa: E402
from DRGS4DSlicerLib import selftest  # noqa: E402
from DRGS4DSlicerLib.job import ReconstructionJob  # noqa: E402


class Recorder:
    """Keeps what the panel would have shown after each snapshot, and the training iterations and stop reported."""

    def __init__(self, job):
        self.job, self.previews, self.train_iterations, self.cancelled = job, [], [], None
        job.on_event = self

    def __call__(self, event):
        if event["event"] == "preview_applied":  # the snapshot's files are in the scene now
            node = self.job.updater.node("preview_volume")
            self.previews.append((event["iteration"], node.GetID(), node.GetImageData(),
                                  slicer.util.arrayFromVolume(node).copy()))
        elif event["event"] == "progress" and event.get("stage") == "train":
            self.train_iterations.append(event["iteration"])
        elif event["event"] == "cancelled":
            self.cancelled = event


@pytest.fixture(scope="module")
def scenario(tiny_case, tmp_path_factory, worker_env):
    scene = slicer.vtkMRMLScene()
    out = tmp_path_factory.mktemp("e2e") / "run"
    request = selftest.tiny_request(tiny_case, str(out), iterations=150, snapshot_every=10)
    first = ReconstructionJob(scene, request, out, name="tiny", extra_env=worker_env, cancel_grace_s=120)
    rec1 = Recorder(first)
    first.start()
    deadline = time.time() + 300
    # cancel once the first preview is in the scene and training went on a little
    while not (rec1.previews and (first.state.iteration or 0) >= rec1.previews[0][0] + 2) \
            and not first.worker.finished():
        first.poll()
        assert time.time() < deadline, first.log_lines[-20:]
        time.sleep(0.01)
    first.cancel()
    first.wait(timeout=200, interval=0.02)

    second = ReconstructionJob.resume(scene, out, name="tiny (resumed)", extra_env=worker_env, cancel_grace_s=120)
    rec2 = Recorder(second)
    second.start().wait(timeout=300, interval=0.01)
    yield {"scene": scene, "first": first, "second": second, "rec1": rec1, "rec2": rec2}
    scene.Clear(1)


def test_cancel_keeps_a_checkpoint_and_leaves_no_process(scenario):
    first, rec1 = scenario["first"], scenario["rec1"]
    st = first.state
    assert st.status == "cancelled", (st.error, first.log_lines[-20:])
    assert st.returncode == 3
    assert st.checkpoint and os.path.isfile(st.checkpoint) and st.checkpoint == rec1.cancelled["checkpoint"]
    assert rec1.cancelled["iteration"] > rec1.previews[0][0]
    assert st.text.endswith("can be resumed")
    assert not pid_alive(first.worker.pid) and not group_members(first.worker.pgid)
    assert first.updater.node("preview_volume") is not None  # the preview stays after a cancel
    assert first.updater.node("volume") is None


def test_resumed_run_continues_from_the_checkpoint(scenario):
    rec1, rec2, second = scenario["rec1"], scenario["rec2"], scenario["second"]
    assert second.state.status == "done", (second.state.error, second.log_lines[-20:])
    assert second.request["resume"] is True
    stopped = rec1.cancelled["iteration"]
    assert rec2.train_iterations == list(range(stopped + 1, 151))  # it did not start from scratch
    assert not pid_alive(second.worker.pid) and not group_members(second.worker.pgid)


def test_snapshots_arrive_in_order_and_the_preview_changes(scenario):
    rec1, rec2 = scenario["rec1"], scenario["rec2"]
    iterations = [p[0] for p in rec1.previews + rec2.previews]
    assert iterations == sorted(iterations) and len(set(iterations)) == len(iterations)
    assert iterations[-1] == 140
    previews = rec2.previews
    assert len(previews) >= 2
    assert len({p[1] for p in previews}) == 1 and len({id(p[2]) for p in previews}) == 1  # one node, in place
    assert any(not np.array_equal(previews[i][3], previews[i + 1][3]) for i in range(len(previews) - 1))


def test_the_resumed_run_ends_with_the_final_nodes(scenario):
    job = scenario["second"]
    for role in ("volume", "model", "segmentation", "sequence", "sequence_browser", "renders"):
        assert job.updater.node(role) is not None, role
    assert job.updater.node("preview_volume") is None
    assert job.updater.threshold == pytest.approx(job.state.metrics["iso_level"])
