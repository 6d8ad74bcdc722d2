"""Fixtures for the Slicer-module tests: they run with plain pytest, the real MRML classes of slicer-core and real
worker subprocesses running the real engine (on the tiny phantom of Testing/conftest.py), but without the Slicer
application (no Qt)."""

from __future__ import annotations

import sys
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
