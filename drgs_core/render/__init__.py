"""X-ray rasterisation and voxelisation of 3D Gaussians (METHOD.md §5, §7; rules in `render.common`).

Public API (units: mm, 1/mm, pixels; images [H, W] = [detector row v, column u]; volumes [nx, ny, nz]):

    rasterize(means, scales, rotations, rho, camera, means2d=None, backend="auto", pair_capacity=None)
        -> RasterResult
    voxelize(means, scales, rotations, rho, grid, backend="auto", chunk=None) -> [nx, ny, nz]
    rasterize_dense(...)  all-pixel reference evaluation (tiny problems / tests; torch only)
    active_backend(device) -> "cuda-ext" | "triton" | "torch"

Backends
--------
Chosen by `drgs_core.cuda` (one selection mechanism for the renderer and the hash grid; see its docstring):
"torch" is `render.torch_ref` (any device); "cuda-ext" (compiled extension) and "triton" (Triton kernels) are
GPU backends with the same numerical rules (`render.common`).  backend="auto" takes `active_backend` of the
inputs' device; "cuda" is accepted as the old name of "cuda-ext".
"""

from __future__ import annotations

import torch

from .. import cuda as _cuda
from ..errors import DRGSInputError
from . import common, torch_ref  # noqa: F401  (common: the shared rules, for other backends)
from .common import RasterResult

__all__ = ["RasterResult", "rasterize", "rasterize_dense", "voxelize", "active_backend", "cuda_available"]

_BACKENDS = ("auto", "torch", "cuda-ext", "triton", "cuda")


def cuda_available() -> bool:
    """True when a GPU backend ("cuda-ext" or "triton") can run on this machine."""
    return torch.cuda.is_available() and any(_cuda.is_available(n) for n in ("cuda-ext", "triton"))


def active_backend(device) -> str:
    """The backend `backend="auto"` picks for tensors on `device`: "cuda-ext", "triton" or "torch"."""
    return _cuda.active_backend(device)


def _resolve(backend: str, device):
    """(name, module or None for torch) of the backend that runs for `backend` on `device`."""
    if backend not in _BACKENDS:
        raise DRGSInputError("unknown render backend", repr(backend),
                             "one of 'auto', 'torch', 'cuda-ext', 'triton'")
    name = "cuda-ext" if backend == "cuda" else backend
    if name == "auto":
        name = active_backend(device)
    if name == "torch":
        return name, None
    if torch.device(device).type != "cuda":
        raise DRGSInputError(f"the {name} render backend needs CUDA tensors", str(device), "a cuda device",
                             "move the inputs to the GPU or use backend='torch'")
    if not _cuda.is_available(name):
        raise DRGSInputError(f"the {name} render backend is not available", str(_cuda._reason(name)),
                             "a backend that can run on this machine",
                             "use backend='auto' (or 'torch'); for cuda-ext build the extension "
                             "(a CUDA toolkit), for triton install triton")
    return name, _cuda.backend_module(name)


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

    pair_capacity ("cuda-ext" only; "torch" and "triton" keep no pair list): None sizes the kernels' (tile, Gaussian) pair list
    exactly, which waits once for the GPU; a number fixes its size so that the call never waits (required
    inside a CUDA graph).  Then `result.n_pairs > pair_capacity` (on the device) flags an image that lost
    contributions; the trainer skips such an update and re-captures with room to spare.
    """
    _check(means, scales, rotations, rho, means2d)
    _, module = _resolve(backend, means.device)
    if module is not None:
        return module.rasterize(means, scales, rotations, rho, camera, means2d, pair_capacity)
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
    _, module = _resolve(backend, means.device)
    if module is not None:
        return module.voxelize(means, scales, rotations, rho, grid, chunk)
    return torch_ref.voxelize(means, scales, rotations, rho, grid, chunk=chunk)
