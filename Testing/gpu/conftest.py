"""GPU kernel tests: every test here is marked `gpu` and is skipped cleanly without CUDA.

Kernel tests run once per GPU backend through the `impl` fixture ("cuda-ext": the compiled extension,
"triton": the Triton kernels; both modules of `drgs_core.cuda` with the same functions).  A backend that
cannot run is skipped with the reason, unless DRGS4D_REQUIRE_CUDA_EXT=1 / DRGS4D_REQUIRE_TRITON=1 (set by
bench/device_run.sh) turn that into a failure.  DRGS4D_TEST_BACKENDS=triton (comma list) limits the runs,
e.g. in the toolkit-free device test.  Kernels run in poison mode (DRGS4D_POISON=1): outputs of the compiled
kernels are pre-filled with NaN so that any element a kernel forgets to write shows up in the finiteness checks.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_REQUIRE = {"cuda-ext": "DRGS4D_REQUIRE_CUDA_EXT", "triton": "DRGS4D_REQUIRE_TRITON"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _backend(name: str):
    """The module of GPU backend `name` (skip without CUDA; skip or fail when it cannot run)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    wanted = os.environ.get("DRGS4D_TEST_BACKENDS", "")
    if wanted and name not in [w.strip() for w in wanted.split(",")]:
        pytest.skip(f"{name} not in DRGS4D_TEST_BACKENDS={wanted}")
    os.environ["DRGS4D_POISON"] = "1"
    from drgs_core import cuda

    if not cuda.is_available(name):
        msg = f"backend {name} unavailable: {cuda._reason(name)}"
        if _flag(_REQUIRE[name]):
            pytest.fail(msg)
        pytest.skip(msg)
    return cuda.backend_module(name)


@pytest.fixture(scope="session")
def ext():
    """The "cuda-ext" backend module (tests of things only the compiled extension has, e.g. the pair list)."""
    return _backend("cuda-ext")


@pytest.fixture(scope="session", params=["cuda-ext", "triton"])
def impl(request):
    """Each GPU backend module in turn."""
    return _backend(request.param)


@pytest.fixture(scope="session")
def any_gpu_backend():
    """Name of the backend the automatic choice runs (skip when it is the torch reference)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    from drgs_core import cuda

    name = cuda.active_backend("cuda")
    if name == "torch":
        pytest.skip(f"no GPU backend: {cuda.backend_report('cuda')}")
    return name


@pytest.fixture
def use_backend(impl, monkeypatch):
    """Each GPU backend in turn, forced for everything the test runs (pipeline, trainer) via DRGS4D_BACKEND."""
    name = "cuda-ext" if impl.__name__.endswith("_wrapper") else "triton"
    monkeypatch.setenv("DRGS4D_BACKEND", name)
    return name
