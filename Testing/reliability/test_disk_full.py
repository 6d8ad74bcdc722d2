"""A full disk never leaves a corrupt file under a final name: every writer fails loudly (or writes a complete
file), the previous file survives and no temporary file is left.  Two ways to fill a disk: a file-size limit
(RLIMIT_FSIZE, runs everywhere on POSIX) and a real 64 KiB tmpfs (where a user namespace lets us mount one)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drgs_core import worker
from drgs_core.errors import DRGSInputError
from drgs_core.io import read_mesh, read_volume
from drgs_core.pipeline import ReconstructConfig, run_reconstruction

from .conftest import REPO, copy_run, request, result_files

HERE = Path(__file__).parent
pytest.importorskip("resource")  # POSIX only: the file-size limit


def _check_report(folder: Path, report: dict) -> None:
    for name, outcome in report.items():
        path = folder / name
        if outcome == "no error":  # small enough to fit: it must be complete
            if name.endswith((".nii.gz", ".nrrd")):
                read_volume(path) if "stack" not in name and "seq" not in name else None
            elif name.endswith((".stl", ".vtk")):
                read_mesh(path)
            elif name.endswith(".json"):
                json.loads(path.read_text())
        else:
            assert path.read_bytes() == b"old", f"{name}: {outcome}"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    # the SimpleITK writer is the one that used to report success on a full disk
    assert report["stack.nii.gz"] != "no error" and report["model.pt"] != "no error"


def test_every_writer_with_a_file_size_limit(tmp_path, worker_env):
    env = {**os.environ, **worker_env, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(HERE / "_fill_disk.py"), str(tmp_path), "20000"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_report(tmp_path, json.loads(done.stdout))


def test_every_writer_on_a_full_tmpfs(tmp_path, worker_env):
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, **worker_env, "PYTHONPATH": str(REPO)}
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} || exit 77; "
              f"{sys.executable} {HERE / '_fill_disk.py'} {mnt} 100000000000 > {tmp_path / 'report.json'}; "
              f"cp -a {mnt} {tmp_path / 'copy'}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 77 or "unshare failed" in done.stderr or "Operation not permitted" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    _check_report(tmp_path / "copy", json.loads((tmp_path / "report.json").read_text()))


def test_a_run_on_a_full_disk_fails_cleanly_and_keeps_the_previous_result(tiny_case, finished_run, tmp_path,
                                                                        worker_env):
    """The whole run: the first checkpoint hits the limit -> an input error (exit 2), previous results intact."""
    out = copy_run(finished_run, tmp_path / "run")
    before = result_files(out)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(request(tiny_case, out, seed=1)))
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, resource.RLIM_INFINITY))\n"
            "from drgs_core import worker\n"
            f"sys.exit(worker.main(['--config', {str(req)!r}]))")
    env = {**os.environ, **worker_env, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    last = json.loads(done.stdout.splitlines()[-1])
    assert done.returncode == worker.EXIT_INPUT and last["kind"] == "input", done.stderr[-2000:]
    assert "disk is full" in last["message"] and "previous results" in last["message"]
    assert result_files(out) == before
    assert not [p.name for p in out.rglob(".tmp-*")] and not [p.name for p in out.glob(".staging-*")]


def test_too_little_free_space_is_refused_before_training(tiny_case, tmp_path, monkeypatch):
    from drgs_core.io import atomic

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    seen = []
    with pytest.raises(DRGSInputError, match="not enough free disk space") as exc:
        run_reconstruction(ReconstructConfig(**request(tiny_case, tmp_path / "run")), on_event=seen.append)
    assert "MiB" in str(exc.value)
    assert not any(e.get("stage") == "fdk" for e in seen)
