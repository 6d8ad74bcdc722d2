"""Run folders as transactions: locks, staging, commit, foreign contents, stale temporary files; and the
stage boundaries: a stop after training is honoured with a checkpoint and no partial result."""

import json
import os
import signal
import subprocess
import sys

import pytest

from drgs_core import worker
from drgs_core.errors import DRGSInputError
from drgs_core.io.run_folder import JOURNAL, LOCK, RunFolder, finish_commit
from drgs_core.pipeline import ReconstructConfig, run_reconstruction

from .conftest import events_until, request, result_files, start_worker


@pytest.fixture
def good_run(finished_run):
    return finished_run, result_files(finished_run)


def test_a_finished_run_holds_exactly_its_results(good_run):
    out, files = good_run
    assert set(files) == {"volume.nii.gz", "mesh.stl", "mesh.vtk", "segmentation.nii.gz", "volume_4d.seq.nrrd",
                          "renders.nii.gz", "cine.nii.gz", "gaussians.ply", "model.pt", "config.json",
                          "metrics.json"}
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*files, "checkpoint.pt"]), left  # no lock, staging or temporary files


def test_a_second_run_into_a_locked_folder_is_refused(tiny_case, tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, {"case": "x"}):
        with pytest.raises(DRGSInputError, match="another run is writing"):
            run_reconstruction(ReconstructConfig(**request(tiny_case, out)))
    assert not (out / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    import socket

    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunFolder(out, {"case": "x"}) as folder:
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid() and folder.staging.is_dir()


def test_stale_temporary_files_and_staging_are_cleaned(tmp_path):
    out = tmp_path / "run"
    (out / ".staging-deadbeef").mkdir(parents=True)
    (out / ".staging-deadbeef" / "volume.nii.gz").write_bytes(b"half")
    (out / ".tmp-0123456789ab-metrics.json").write_text("{")
    with RunFolder(out, {"case": "x"}):
        names = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith((".tmp-", ".staging-deadbeef")) for n in names), names


def test_a_commit_cut_by_a_kill_is_finished_by_the_next_run(tmp_path):
    """The journal lists the moves: a run killed between two of them leaves a folder the next run completes."""
    out = tmp_path / "run"
    staging = out / ".staging-cafe"
    staging.mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (out / name).write_text("old")
        (staging / name).write_text("new")
    (out / JOURNAL).write_text(json.dumps({"staging": staging.name, "names": ["a.txt", "b.txt"], "remove": []}))
    os.replace(staging / "a.txt", out / "a.txt")  # the kill came after the first move
    finish_commit(out)
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text() == "new"
    assert not (out / JOURNAL).exists() and not staging.exists()


def test_a_folder_of_another_case_or_foreign_files_needs_overwrite(good_run, tiny_case, tmp_path):
    out, _ = good_run
    other = tmp_path / "other_case"
    import shutil

    shutil.copytree(tiny_case, other)
    with pytest.raises(DRGSInputError, match="results of a run on other inputs") as exc:
        run_reconstruction(ReconstructConfig(**request(other, out)))
    assert "--overwrite" in str(exc.value)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(DRGSInputError, match="files that no run of this case wrote"):
        run_reconstruction(ReconstructConfig(**request(tiny_case, foreign)))
    assert (foreign / "thesis.docx").read_text() == "precious"


def test_inputs_exported_into_the_run_folder_are_not_foreign(tiny_case, tmp_path):
    """The Slicer panel exports the runs to OUT/inputs and writes OUT/drgs4d_request.json before starting."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_case, out / "inputs", ignore=shutil.ignore_patterns("truth"))
    (out / "drgs4d_request.json").write_text("{}")
    ident = {k: str((out / "inputs" / f).resolve()) for k, f in
             (("fill", "fill_run.nii.gz"), ("mask", "mask_run.nii.gz"), ("geometry", "transforms.json"))}
    with RunFolder(out, ident, overwrite=True) as folder:
        (folder.staging / "metrics.json").write_text("{}")
        folder.commit(["metrics.json"])
    assert sorted(p.name for p in out.iterdir()) == ["drgs4d_request.json", "inputs", "metrics.json"]
    with pytest.raises(DRGSInputError, match="no run of this case"):
        with RunFolder(out, {"case": str(tmp_path / "elsewhere")}):
            pass


def test_stop_after_training_is_honoured_with_a_checkpoint_and_no_result(tiny_case, tmp_path):
    out = tmp_path / "run"
    seen = []
    stop_at = {"voxelize"}
    result = run_reconstruction(ReconstructConfig(**request(tiny_case, out)), on_event=seen.append,
                                should_stop=lambda: any(e.get("stage") in stop_at for e in seen))
    assert result["status"] == "cancelled"
    assert seen[-1]["event"] == "cancelled" and seen[-1]["stage"] == "voxelize"
    assert os.path.samefile(seen[-1]["checkpoint"], out / "checkpoint.pt")
    assert result_files(out) == {}  # nothing half-done
    again = run_reconstruction(ReconstructConfig(**request(tiny_case, out, resume=True)))
    assert again["status"] == "done" and again["metrics"]["iterations"] == 30


def test_two_concurrent_runs_one_is_refused(tiny_case, tmp_path, env):
    out = tmp_path / "run"
    first = start_worker(request(tiny_case, out), tmp_path, env, "a.json")
    try:
        events_until(first, lambda e: e["event"] == "started")
        second = []
        assert worker.run(request(tiny_case, out), second.append, lambda: False) == worker.EXIT_INPUT
        assert [e["event"] for e in second] == ["error"] and "another run is writing" in second[0]["message"]
        assert f"process {first.pid}" in second[0]["message"]
        first.send_signal(signal.SIGTERM)  # the first run was not disturbed: it still stops cleanly
        rest, _ = first.communicate(timeout=300)
        assert first.returncode == worker.EXIT_CANCELLED
        assert json.loads(rest.decode().splitlines()[-1])["event"] == "cancelled"
    finally:
        first.kill()
    assert result_files(out) == {} and not (out / LOCK).exists()


def test_cpu_without_a_preset_uses_the_demo_sizes(tiny_case, tmp_path):
    seen = []
    req = request(tiny_case, tmp_path / "run")
    del req["preset"], req["n_gaussians"]
    result = run_reconstruction(ReconstructConfig(**req), on_event=seen.append,
                                should_stop=lambda: any(e["event"] == "started" for e in seen))
    started = next(e for e in seen if e["event"] == "started")
    assert started["preset"] == "demo" and "--preset demo" in started["note"]
    assert started["iterations"] == 30  # the explicit value wins over the preset's
    assert result["status"] == "cancelled"
