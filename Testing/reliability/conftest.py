"""Helpers for the reliability suite: copies of the tiny case with one thing broken, worker requests, processes.

The suite keeps the catalogue of issue 13 (hostile or faulty inputs, options, disks, kills, concurrent runs and
readers) as regression tests on the real engine and the tiny phantom of Testing/conftest.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def request(case, out, **kw) -> dict:
    """A worker request for a fast tiny run (30 iterations, checkpoints every 10)."""
    req = {"case": str(case), "out": str(out), "preset": "tiny", "device": "cpu", "views": 8, "iterations": 30,
           "n_gaussians": 400, "times_4d": 2, "checkpoint_every": 10, "progress_every": 1}
    req.update(kw)
    return req


def copy_case(tiny_case, folder: Path) -> Path:
    shutil.copytree(tiny_case, folder, ignore=shutil.ignore_patterns("truth"))
    return folder


def edit_transforms(folder: Path, change) -> Path:
    path = folder / "transforms.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture
def env(worker_env):
    e = dict(os.environ)
    e.update(worker_env)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return e


def start_worker(req: dict, tmp_path: Path, env, name: str = "req.json", **kw) -> subprocess.Popen:
    path = tmp_path / name
    path.write_text(json.dumps(req))
    return subprocess.Popen([sys.executable, "-m", "drgs_core.worker", "--config", str(path)], env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def events_until(proc, accept, limit: int = 10_000) -> list:
    """Read events until accept(event) is true; the list read so far (the accepted event last)."""
    seen = []
    for _, line in zip(range(limit), proc.stdout):
        seen.append(json.loads(line))
        if accept(seen[-1]):
            return seen
    raise AssertionError(f"the awaited event never came; saw {[e.get('event') for e in seen]}")


@pytest.fixture(scope="session")
def finished_run(tiny_case, tmp_path_factory):
    """One finished tiny run (seed 0), shared: tests that change it work on a copy (`copy_run`)."""
    from drgs_core import worker

    out = tmp_path_factory.mktemp("finished") / "run"
    assert worker.run(request(tiny_case, out), lambda e: None, lambda: False) == worker.EXIT_DONE
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def result_files(out: Path) -> dict:
    """name -> bytes of the result files (not checkpoint, snapshots or bookkeeping)."""
    keep = {"volume.nii.gz", "mesh.stl", "mesh.vtk", "segmentation.nii.gz", "volume_4d.seq.nrrd", "renders.nii.gz",
            "cine.nii.gz", "gaussians.ply", "model.pt", "config.json", "metrics.json"}
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name in keep}
