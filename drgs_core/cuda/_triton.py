"""Backend "triton": kernels compiled at run time by Triton (ships with CUDA builds of PyTorch on Linux; the
`triton-windows` package on Windows), so no CUDA toolkit and no C++ compiler toolchain for PyTorch extensions
are needed.  Same functions as the "cuda-ext" backend (`_wrapper.py`); see `drgs_core.cuda`.

Coverage: rasteriser forward/backward (`_triton_raster`, projection fused into the kernels) and hash-grid
encoding forward/backward (`_triton_hashgrid`) are Triton kernels, free of host synchronisation (the training
step is captured in a CUDA graph as with "cuda-ext"); so is the voxeliser (`_triton_voxel`, forward only).
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from ..render.common import RasterResult
from ._wrapper import camera_buffer, hashgrid_shape_ok

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": "not probed yet"}


def _probe() -> None:
    """Import triton and compile + run the rasteriser's forward kernel once on one Gaussian, checked against
    the PyTorch reference (Triton needs a working host C compiler for its launcher and a driver that accepts
    its PTX; a failure here sends us to the PyTorch reference)."""
    import triton  # noqa: F401

    from ..geometry import PackedCamera
    from ..render import torch_ref
    from ._triton_raster import rasterize as triton_rasterize

    dev = torch.device("cuda")
    eye = torch.eye(3, dtype=torch.float64).flatten().tolist()
    cam = PackedCamera(torch.tensor(eye + [0.0, 0.0, 100.0, 50.0, 50.0, 4.0, 4.0], dtype=torch.float64,
                                    device=dev), 9, 9)
    gauss = (torch.zeros(1, 3, device=dev), torch.full((1, 3), 2.0, device=dev),
             torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=dev), torch.ones(1, device=dev))
    got = triton_rasterize(*gauss, cam.params, 9, 9).image
    want = torch_ref.rasterize(*gauss, cam).image
    err = float((got - want).abs().max() / want.abs().max())
    if not err <= 1e-4:
        raise RuntimeError(f"probe kernel disagrees with the reference (relative error {err:.3g})")


def on_device(t: torch.Tensor):
    """Context in which Triton kernels launch on `t`'s GPU (Triton launches on the current device, torch ops
    on their tensors' device: a model on cuda:1 needs this); a no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def available() -> bool:
    """True when a CUDA device is present, triton imports and a probe kernel runs (checked once)."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        if not torch.cuda.is_available():
            _state.update(ok=False, reason="no CUDA device is available to PyTorch")
        else:
            try:
                _probe()
                _state.update(ok=True, reason=None)
            except Exception as exc:  # ImportError, no compiler, driver too old, ...
                _state.update(ok=False, reason=f"Triton unusable: {type(exc).__name__}: {exc}")
                log.warning("Triton kernels unavailable: %s", _state["reason"])
        _state["tried"] = True
    return _state["ok"]


def unavailable_reason() -> str | None:
    return _state["reason"]


def _float32(*ts) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in ts)


def rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None) -> RasterResult:
    """See `render.rasterize`; float32 inputs (others take the torch reference).  pair_capacity is ignored:
    this rasteriser keeps no pair list (n_pairs is None)."""
    if not _float32(means, scales, rotations, rho, means2d):
        from ..render import torch_ref

        return torch_ref.rasterize(means, scales, rotations, rho, camera, means2d)
    from . import _triton_raster

    params, W, H = camera_buffer(camera, means.device)
    return _triton_raster.rasterize(means, scales, rotations, rho, params, W, H, means2d)


def voxelize(means, scales, rotations, rho, grid, chunk=None) -> torch.Tensor:
    """Volume [nx, ny, nz] (1/mm) of the Gaussians on `grid` (METHOD §7) by the Triton kernel; forward only:
    when a gradient is needed, or for non-float32 inputs, the differentiable torch reference runs.  chunk only
    applies to that reference."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, scales, rotations, rho))
    if needs_grad or not _float32(means, scales, rotations, rho):
        from ..render import torch_ref

        kwargs = {} if chunk is None else {"chunk": chunk}
        return torch_ref.voxelize(means, scales, rotations, rho, grid, **kwargs)
    from . import _triton_voxel

    return _triton_voxel.voxelize(means, scales, rotations, rho, grid.first_voxel_centre, grid.spacing,
                                  grid.resolution)


def hashgrid_supports(encoding, x: torch.Tensor) -> bool:
    return hashgrid_shape_ok(encoding, x) and available()


def hashgrid_encode(encoding, x: torch.Tensor) -> torch.Tensor:
    from ._triton_hashgrid import hashgrid_encode as encode

    return encode(encoding, x)
