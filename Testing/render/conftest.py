"""Render tests: make `_render_testlib` importable (pytest runs with --import-mode=importlib)."""

import sys
from pathlib import Path


_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Without a GPU, Triton kernels can still run: its interpreter executes them on CPU tensors.  It must be
# chosen before triton is first imported (test_render_backends.py checks that it was).
import os  # noqa: E402

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
