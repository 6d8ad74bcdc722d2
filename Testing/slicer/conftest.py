"""Fixtures for the Slicer-module tests: they run with plain pytest, the real MRML classes of slicer-core and real
worker subprocesses running the real engine (on the tiny phantom of Testing/conftest.py), but without the Slicer
application (no Qt).  Every test module must leave no process and no temporary file of the panel behind
(``nothing_left_behind``)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULE_DIR = REPO / "DRGS4DSlicer"

for p in (str(MODULE_DIR), str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer")
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def _live_children() -> dict:
    """{pid: command line} of the live (non-zombie) child processes of this test process."""
    from procutil import _stat_fields

    found = {}
    for name in os.listdir("/proc"):
        fields = _stat_fields(int(name)) if name.isdigit() else None
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[1]) == os.getpid():
            try:
                found[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind(tmp_path_factory):
    """The module's tests run with their own system temp folder, which must hold no ``drgs4d-*`` file at the end,
    and no worker (or other child process) may outlive the module (a few seconds' grace for exits under way)."""
    private = tmp_path_factory.mktemp("system-tmp")
    before, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        yield
    finally:
        tempfile.tempdir = before
    left = sorted(p.name for p in private.glob("drgs4d-*"))
    deadline = time.monotonic() + 5.0
    while _live_children() and time.monotonic() < deadline and os.name == "posix":
        time.sleep(0.1)
    children = _live_children() if os.path.isdir("/proc") else {}
    assert not left, f"temporary files left behind: {left}"
    assert not children, f"processes left behind: {children}"
