"""Suite-wide fixtures.

- Every test runs with one torch thread: the tests run many small tensor operations, and on a 2-core machine
  a second OpenMP thread mostly waits at barriers (measured 4-50x slower under load); one thread also makes CPU
  results bit-reproducible.  Worker subprocesses get the same through `worker_env`.
- `tiny_case`: the reduced demo phantom of DRGS4DSlicerLib.selftest, written once per session (the same case
  the module's in-Slicer self-test uses).
- `degrees_case(folder)`: writes a broken copy of it (angles in degrees) into `folder`.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO / "DRGS4DSlicer"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def worker_env():
    """Environment additions for worker subprocesses: one thread each, like the in-process tests."""
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_case(tmp_path_factory):
    from DRGS4DSlicerLib.selftest import write_tiny_phantom

    return write_tiny_phantom(tmp_path_factory.mktemp("tiny") / "case")


@pytest.fixture(scope="session")
def degrees_case(tiny_case):
    """degrees_case(folder) -> folder: a copy of the tiny case whose transforms.json gives the angles in degrees
    (a common export mistake that the input checks must refuse)."""

    def make(folder: Path) -> Path:
        shutil.copytree(tiny_case, folder, ignore=shutil.ignore_patterns("truth"))
        path = folder / "transforms.json"
        data = json.loads(path.read_text())
        for frame in data["frames"]:
            frame["PrimaryAngle"] = math.degrees(frame["PrimaryAngle"])
        path.write_text(json.dumps(data))
        return folder

    return make
