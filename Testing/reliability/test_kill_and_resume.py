"""kill -9 at the stages of a real run leaves the previous result intact; resume then works and checks what it
resumes; a reader that closes the event pipe stops the worker like a cancel."""

import json
import os
import shutil
import signal

import pytest
import torch

from drgs_core import worker
from drgs_core.errors import DRGSInputError
from drgs_core.pipeline import ReconstructConfig, run_reconstruction

from .conftest import copy_case, copy_run, edit_transforms, events_until, request, result_files, start_worker


def _train_iterations(events):
    return [e["iteration"] for e in events if e["event"] == "progress" and e.get("stage") == "train"]


@pytest.mark.parametrize("stage", ["fdk", "train", "write"])
def test_kill_9_keeps_the_previous_result_then_the_next_run_works(stage, finished_run, tiny_case, tmp_path, env):
    out = copy_run(finished_run, tmp_path / "run")
    before = result_files(out)
    short = {"seed": 1, "iterations": 12, "checkpoint_every": 5}
    proc = start_worker(request(tiny_case, out, **short), tmp_path, env)
    try:
        if stage == "train":  # after the first periodic checkpoint (iteration 5)
            events_until(proc, lambda e: e.get("stage") == "train" and e.get("iteration", 0) >= 7)
        else:
            events_until(proc, lambda e: e.get("event") == "progress" and e.get("stage") == stage)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    after = result_files(out)
    changed = {name for name in before if after.get(name) != before[name]}
    # all of the previous result, or (a kill after the commit) all of the new one - never a mix
    assert not changed or changed == set(before), sorted(changed)

    if stage == "fdk":  # the checkpoint is still the finished seed-0 run's: resuming it as seed 1 is refused
        with pytest.raises(DRGSInputError, match="seed"):
            run_reconstruction(ReconstructConfig(**request(tiny_case, out, resume=True, **short)))
        assert result_files(out) == after
    events = []
    resume = stage == "train"
    assert worker.run(request(tiny_case, out, resume=resume, **short), events.append, lambda: False) == 0
    if resume:
        assert _train_iterations(events)[0] > 5  # continued from the checkpoint at iteration 5
    assert json.loads((out / "config.json").read_text())["reconstruct"]["seed"] == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".staging-", ".drgs4d", ".commit"))]


def test_resume_with_another_case_is_refused_naming_the_difference(finished_run, tiny_case, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    checkpoint = (out / "checkpoint.pt").read_bytes()

    def turn(data):
        for frame in data["frames"]:
            frame["PrimaryAngle"] += 0.01
    other = edit_transforms(copy_case(tiny_case, tmp_path / "other"), turn)
    with pytest.raises(DRGSInputError, match="different run") as exc:
        run_reconstruction(ReconstructConfig(**request(other, out, resume=True)))
    assert "case geometry" in str(exc.value)
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


def test_resume_with_the_static_field_toggled_is_refused(finished_run, tiny_case, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(DRGSInputError, match="static_field"):
        run_reconstruction(ReconstructConfig(**request(tiny_case, out, resume=True, static_field=True)))


def test_a_checkpoint_records_the_fingerprint(finished_run):
    payload = torch.load(finished_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    fp = payload["fingerprint"]
    assert fp["settings"]["seed"] == 0 and fp["settings"]["views"] == 8 and fp["case"]["n_frames"] == 16
    assert "out" not in fp["settings"] and "device" not in fp["settings"]


def test_a_reader_closing_the_pipe_stops_the_worker_like_a_cancel(tiny_case, tmp_path, env):
    out = tmp_path / "run"
    proc = start_worker(request(tiny_case, out, iterations=400, checkpoint_every=1000), tmp_path, env)
    try:
        events_until(proc, lambda e: e.get("stage") == "train" and e.get("iteration", 0) >= 3)
        proc.stdout.close()  # the panel went away
        code = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert code == worker.EXIT_CANCELLED, err[-2000:]
    assert "Traceback" not in err and "closed stdout" in err
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    assert 3 <= state["iteration"] < 400


def test_snapshot_files_exist_until_the_next_snapshot_event(tiny_case, tmp_path):
    missing = []
    snaps = []

    def on_event(e):
        if e["event"] == "snapshot":
            snaps.append(e)
            for s in snaps[-2:]:  # this event's files and the previous event's
                missing.extend(p for p in (s["volume"], s["mesh"]) if p and not os.path.exists(p))

    req = request(tiny_case, tmp_path / "run", snapshot_every=5, iterations=25)
    assert run_reconstruction(ReconstructConfig(**req), on_event=on_event)["status"] == "done"
    assert [s["iteration"] for s in snaps] == [5, 10, 15, 20] and not missing
    left = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert left and all(("000015" in n or "000020" in n) for n in left), left
    shutil.rmtree(tmp_path / "run")
