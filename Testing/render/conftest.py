"""Render tests: make `_render_testlib` importable (pytest runs with --import-mode=importlib) and run each
test with one torch thread (on a small shared CPU a second OpenMP thread mostly waits; results are the same)."""

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
