"""GPU kernels of drgs_core and the one place that decides which of them run.

Backends (names as reported by `active_backend`):

    "cuda-ext"  the compiled extension `drgs_core._C` (csrc/; prebuilt by setup.py or JIT-built with nvcc):
                `_backend.py` loads it, `_wrapper.py` holds its autograd wrappers.  Fastest; needs a CUDA
                toolkit once.
    "triton"    Triton kernels compiled at run time (`_triton.py`): needs only a CUDA build of PyTorch with
                triton (Linux wheels bring it; `pip install drgs4d[triton]` otherwise).
    "torch"     the PyTorch reference (`render.torch_ref`, `model.hashgrid`): any device, slowest.

Selection for CUDA tensors: "cuda-ext" when the extension loads, else "triton" when it imports and a probe
kernel runs, else "torch".  CPU tensors always use "torch".  `DRGS4D_BACKEND=cuda-ext|triton|torch` forces
one (an unavailable forced backend is an error, never a silent fallback); `DRGS4D_BACKEND=auto` or unset is
the order above.  `DRGS4D_DISABLE_CUDA=1` still keeps the extension from loading.

Every GPU backend module provides
    available() -> bool, unavailable_reason() -> str | None
    rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None) -> render.RasterResult
    voxelize(means, scales, rotations, rho, grid, chunk=None) -> Tensor [nx, ny, nz]
    hashgrid_supports(encoding, x) -> bool, hashgrid_encode(encoding, x) -> Tensor [P, L*F]
with the units and numerical rules of `drgs_core.render` and `drgs_core.model.hashgrid`.
"""

from __future__ import annotations

import importlib
import os

import torch

from ..errors import DRGSInputError

__all__ = ["BACKENDS", "active_backend", "backend_module", "backend_report", "forced_backend", "is_available"]

#: Backend names, fastest first.
BACKENDS = ("cuda-ext", "triton", "torch")
_MODULES = {"cuda-ext": "._wrapper", "triton": "._triton"}
#: Expected speed class (measured figures: bench/RESULTS.md, README "Performance").
_SPEED_CLASS = {"cuda-ext": "fast: ~540 it/s, ~30 s end to end on a paper-size case (H200)",
                "triton": "GPU without a CUDA toolkit: ~97 % of cuda-ext, ~30 s on a paper-size case (H200; the "
                          "first use compiles kernels, ~10 s)",
                "torch": "slow: GPU rasteriser 55-80x slower than cuda-ext; CPU for demo sizes only"}


def forced_backend() -> str | None:
    """The backend forced by $DRGS4D_BACKEND, or None for the automatic order."""
    name = os.environ.get("DRGS4D_BACKEND", "").strip().lower()
    if name in ("", "auto"):
        return None
    if name == "cuda":  # the name used before the Triton backend existed
        name = "cuda-ext"
    if name not in BACKENDS:
        raise DRGSInputError("DRGS4D_BACKEND", repr(name), "one of auto, cuda-ext, triton, torch",
                             "unset it or pick one of those names")
    return name


_modules: dict = {}    # name -> imported backend module (or None)
_usable: dict = {}     # name -> bool: each backend's loader / probe runs once per process, so its answer holds


def backend_module(name: str):
    """The module of GPU backend `name` ("cuda-ext" or "triton"), imported lazily; None if it cannot import
    (e.g. triton missing)."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(_MODULES[name], __name__)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def is_available(name: str) -> bool:
    """True when backend `name` can run kernels here ("torch" always can).  Resolved once per backend and
    process (the kernels call `active_backend` on every launch); $DRGS4D_BACKEND is still read on every call."""
    if name == "torch":
        return True
    if name not in _usable:
        module = backend_module(name)
        _usable[name] = module is not None and module.available()
    return _usable[name]


def _reason(name: str) -> str | None:
    if name == "torch":
        return None
    module = backend_module(name)
    if module is None:
        return "triton is not installed" if name == "triton" else "the extension wrapper does not import"
    return module.unavailable_reason()


def active_backend(device="cuda") -> str:
    """The backend that runs for tensors on `device`: "cuda-ext", "triton" or "torch" (see module docstring).

    Raises DRGSInputError when $DRGS4D_BACKEND forces a backend that cannot run here.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = forced_backend()
    if device.type != "cuda":
        return "torch"
    if forced is not None:
        if not is_available(forced):
            raise DRGSInputError(f"the forced backend DRGS4D_BACKEND={forced} is not available",
                                 _reason(forced) or "unavailable", "a backend that can run on this machine",
                                 "unset DRGS4D_BACKEND (automatic choice) or install what is missing")
        return forced
    for name in BACKENDS:
        if is_available(name):
            return name
    return "torch"  # pragma: no cover - "torch" is always available


def backend_report(device="cuda") -> dict:
    """What will run, for a panel or `--probe`: {"name", "reason", "speed", "forced", "tried"}.

    name: `active_backend(device)` (or "torch" with the error as reason when a forced backend is missing);
    reason: why that one (why the faster ones were skipped); speed: expected speed class; tried: {backend:
    None if usable else why not} for the GPU backends (empty without a CUDA device).
    """
    device = torch.device(device)
    tried = {}
    if device.type == "cuda" and torch.cuda.is_available():
        for name in BACKENDS[:-1]:
            tried[name] = None if is_available(name) else _reason(name)
    try:
        forced = forced_backend()
        name = active_backend(device)
    except DRGSInputError as exc:
        return {"name": "torch", "reason": str(exc), "speed": _SPEED_CLASS["torch"], "forced": None,
                "tried": tried}
    if device.type != "cuda":
        reason = "CPU tensors always use the PyTorch reference"
    elif not torch.cuda.is_available():
        reason = "no CUDA device is available to PyTorch"
    elif forced is not None:
        reason = f"forced by DRGS4D_BACKEND={forced}"
    else:
        skipped = [f"{n}: {tried[n]}" for n in BACKENDS[:BACKENDS.index(name)]]
        reason = "fastest available" + (f" ({'; '.join(skipped)})" if skipped else "")
    return {"name": name, "reason": reason, "speed": _SPEED_CLASS[name], "forced": forced, "tried": tried}
