"""GPU kernel tests: every test here is marked `gpu` and is skipped cleanly without CUDA.

When CUDA is available but the extension cannot be loaded the tests are skipped too, with the reason, unless
DRGS4D_REQUIRE_CUDA_EXT=1 (set by bench/device_run.sh), which turns that into a failure.  Kernels run in
poison mode (DRGS4D_POISON=1): outputs are pre-filled with NaN so that any element a kernel forgets to write
shows up in the finiteness checks.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def ext():
    """The compiled extension (skip without CUDA; skip or fail when it does not load)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    os.environ["DRGS4D_POISON"] = "1"
    from drgs_core._ext import load_extension, unavailable_reason

    mod = load_extension()
    if mod is None:
        msg = f"CUDA extension unavailable: {unavailable_reason()}"
        if os.environ.get("DRGS4D_REQUIRE_CUDA_EXT", "0") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    return mod
