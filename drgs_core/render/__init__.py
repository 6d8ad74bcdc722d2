"""X-ray rasterisation and voxelisation of 3D Gaussians (METHOD.md §5, §7; rules in `render.common`).

Public API (units: mm, 1/mm, pixels; images [H, W] = [detector row v, column u]; volumes [nx, ny, nz]):

    rasterize(means, scales, rotations, rho, camera, means2d=None, backend="auto", pair_capacity=None)
        -> RasterResult
    voxelize(means, scales, rotations, rho, grid, backend="auto", chunk=None) -> [nx, ny, nz]
    rasterize_dense(...)  all-pixel reference evaluation (tiny problems / tests; torch only)
    active_backend(device) -> "cuda" | "torch"

Backends
--------
"torch": `render.torch_ref`, any device.  "cuda": the compiled kernels, reached through the optional module
`drgs_core.render.cuda_backend` (which wraps the extension `drgs_core._C`).  That module is imported lazily
on first use; if it (or the extension) is missing, or it defines `available()` returning False, only the torch
backend exists.  Contract for `cuda_backend`: it provides
    rasterize(means, scales, rotations, rho, camera, means2d, pair_capacity) -> RasterResult
    voxelize(means, scales, rotations, rho, grid, chunk) -> Tensor [nx, ny, nz]   (chunk may be None)
following the same numerical rules.  backend="auto" uses CUDA for CUDA tensors when it is available, else torch.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import DRGSInputError
from . import common, torch_ref  # noqa: F401  (common: the shared rules, for other backends)
from .common import RasterResult

__all__ = ["RasterResult", "rasterize", "rasterize_dense", "voxelize", "active_backend", "cuda_available"]

_BACKENDS = ("auto", "torch", "cuda")
_cuda_state: dict = {}


def _cuda_module():
    """The CUDA backend module, or None when it cannot be used (imported once, lazily)."""
    if "module" not in _cuda_state:
        module = None
        try:
            module = importlib.import_module(__name__ + ".cuda_backend")
            available = getattr(module, "available", None)
            if available is not None and not available():
                module = None
        except (ImportError, OSError):
            module = None
        _cuda_state["module"] = module
    return _cuda_state["module"]


def cuda_available() -> bool:
    """True when the compiled CUDA backend can be used on this machine."""
    return torch.cuda.is_available() and _cuda_module() is not None


def active_backend(device) -> str:
    """The backend `backend="auto"` picks for tensors on `device`: "cuda" or "torch"."""
    device = torch.device(device)
    if device.type == "cuda" and _cuda_module() is not None:
        return "cuda"
    return "torch"


def _resolve(backend: str, device) -> str:
    if backend not in _BACKENDS:
        raise DRGSInputError("unknown render backend", repr(backend), "one of 'auto', 'torch', 'cuda'")
    if backend == "auto":
        return active_backend(device)
    if backend == "cuda":
        if _cuda_module() is None:
            raise DRGSInputError("the CUDA render backend is not available",
                                 "no loadable drgs_core.render.cuda_backend / drgs_core._C",
                                 "the compiled extension built for this machine",
                                 "build it (pip install -e . with a CUDA toolkit) or use backend='torch'")
        if torch.device(device).type != "cuda":
            raise DRGSInputError("the CUDA render backend needs CUDA tensors", str(device), "a cuda device",
                                 "move the inputs to the GPU or use backend='torch'")
    return backend


def _check(means, scales, rotations, rho, means2d=None):
    P = means.shape[0] if means.dim() == 2 else -1
    shapes = {"means": (means, (P, 3)), "scales": (scales, (P, 3)), "rotations": (rotations, (P, 4)),
              "rho": (rho, (P,))}
    if means2d is not None:
        shapes["means2d"] = (means2d, (P, 2))
    for name, (t, expected) in shapes.items():
        if tuple(t.shape) != expected or P < 0:
            raise DRGSInputError(f"render input '{name}' has the wrong shape", str(tuple(t.shape)),
                                 f"{expected} (P = number of Gaussians, taken from means [P, 3])")


def rasterize(means, scales, rotations, rho, camera, means2d=None, backend: str = "auto",
              pair_capacity: int | None = None) -> RasterResult:
    """Render the X-ray line-integral image of Gaussians for one camera (METHOD §5).

    means [P, 3] world mm; scales [P, 3] mm (activated std devs); rotations [P, 4] quaternions (w, x, y, z),
    normalised inside; rho [P] 1/mm; camera: `geometry.Camera` or `geometry.PackedCamera`; means2d: optional
    zero leaf tensor [P, 2] with requires_grad, added to the projected centres so that after backward
    `means2d.grad` is dLoss/d(projected centre) in pixels.  Returns `RasterResult(image [H, W], radii [P] int32,
    visible [P] bool, centres [P, 2] pixels, n_pairs)`.  Differentiable w.r.t. means, scales, rotations, rho and
    means2d.

    pair_capacity (CUDA backend only, ignored by torch): None sizes the kernels' (tile, Gaussian) pair list
    exactly, which waits once for the GPU; a number fixes its size so that the call never waits (required
    inside a CUDA graph).  Then `result.n_pairs > pair_capacity` (on the device) flags an image that lost
    contributions; the trainer skips such an update and re-captures with room to spare.
    """
    _check(means, scales, rotations, rho, means2d)
    if _resolve(backend, means.device) == "cuda":
        return _cuda_module().rasterize(means, scales, rotations, rho, camera, means2d, pair_capacity)
    return torch_ref.rasterize(means, scales, rotations, rho, camera, means2d)


def rasterize_dense(means, scales, rotations, rho, camera, means2d=None) -> RasterResult:
    """`rasterize` evaluated on all pixels at once (torch; [P, H, W] memory): a reference for tiny problems."""
    _check(means, scales, rotations, rho, means2d)
    return torch_ref.rasterize_dense(means, scales, rotations, rho, camera, means2d)


def voxelize(means, scales, rotations, rho, grid, backend: str = "auto", chunk: int | None = None):
    """Voxelise Gaussians on `grid` (METHOD §7): V(x) = sum_i rho_i exp(-1/2 (x-mu_i)^T Sigma_i^-1 (x-mu_i)).

    Inputs as in `rasterize`; grid: `drgs_core.geometry.VolumeGrid`.  Returns [nx, ny, nz] in 1/mm (indexed
    [x, y, z], voxel centres from `grid.axes()`).  A voxel counts for Gaussian i iff |x_d - mu_d| <=
    3 sqrt(Sigma_dd) on every axis.  chunk: maximum number of (Gaussian, voxel) cells evaluated at once
    (bounds the working memory; None = the backend's default).  Differentiable w.r.t. means, scales, rotations, rho.
    """
    _check(means, scales, rotations, rho)
    if _resolve(backend, means.device) == "cuda":
        return _cuda_module().voxelize(means, scales, rotations, rho, grid, chunk)
    return torch_ref.voxelize(means, scales, rotations, rho, grid, chunk=chunk)
