"""CUDA backend of `drgs_core.render`: autograd wrappers around the kernels of `drgs_core._C` (csrc/).

Same public signatures and numerical rules as `render.torch_ref` (see `render.common`):

    available() -> bool
    rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None)
        -> RasterResult(image, radii, visible, centres, n_pairs)
    voxelize(means, scales, rotations, rho, grid, chunk=None) -> [nx, ny, nz]

Inputs: CUDA tensors, means [P, 3] mm, scales [P, 3] mm (activated std devs), rotations [P, 4] (w, x, y, z),
rho [P] 1/mm; camera a `geometry.Camera` or `geometry.PackedCamera`; means2d an optional zero leaf [P, 2]
whose gradient becomes dLoss/d(projected centre) in pixels.  The kernels work in float32 (per-Gaussian
projection and its chain rule in float64); other dtypes fall back to the torch reference.  pair_capacity: see
`render.rasterize`.  `voxelize` is forward-only: when a gradient is needed (grad mode on and an input requires
grad) it falls back to the differentiable torch reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._ext import load_extension, poison_enabled, unavailable_reason
from ..geometry import PackedCamera
from .common import RasterResult

__all__ = ["available", "unavailable_reason", "rasterize", "voxelize"]

_EMPTY: dict = {}


def available() -> bool:
    """True when the compiled kernels load on this machine (CUDA device + extension)."""
    return load_extension() is not None


def _ext():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the CUDA kernels are unavailable: {unavailable_reason()}")
    return ext


def _empty(device) -> torch.Tensor:
    key = str(device)
    t = _EMPTY.get(key)
    if t is None:
        t = _EMPTY[key] = torch.empty(0, dtype=torch.float32, device=device)
    return t


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, scales, rotations, rho, means2d, params, size):
        W, H, capacity = size
        uv = means2d.detach() if means2d is not None else _empty(means.device)
        poison = poison_enabled()
        (image, radii, visible, centres, geom0, geom1, box, touched, offsets, keys, vals,
         n_pairs) = _ext().raster_forward(means, scales, rotations, rho, uv, params, W, H, capacity, poison)
        ctx.save_for_backward(means, scales, rotations, rho, uv, params, geom0, geom1, box, touched, offsets, keys,
                              vals, n_pairs)
        ctx.size = (W, H)
        ctx.has_means2d = means2d is not None
        ctx.mark_non_differentiable(radii, visible, centres, n_pairs)
        return image, radii, visible, centres, n_pairs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, *_unused):
        W, H = ctx.size
        g = grad_image.contiguous()
        if g.dtype != torch.float32:
            g = g.float()
        means, scales, rotations, rho, uv, params, *saved = ctx.saved_tensors
        gm, gs, gq, grho, guv = _ext().raster_backward(g, means, scales, rotations, rho, uv, params, W, H, *saved,
                                                       poison_enabled())
        return gm, gs, gq, grho, (guv if ctx.has_means2d else None), None, None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _all_float32(*ts) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in ts)


def rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None) -> RasterResult:
    """Cone-beam X-ray rasterisation on the GPU; see the module docstring and `render.rasterize`."""
    if not _all_float32(means, scales, rotations, rho, means2d):
        from . import torch_ref

        return torch_ref.rasterize(means, scales, rotations, rho, camera, means2d)
    packed = camera if isinstance(camera, PackedCamera) else camera.pack(means.device)
    params = packed.params
    if params.device != means.device or params.dtype != torch.float64:
        params = params.to(device=means.device, dtype=torch.float64)
    size = (int(packed.width), int(packed.height), int(pair_capacity or 0))
    image, radii, visible, centres, n_pairs = _Rasterize.apply(
        _f32(means), _f32(scales), _f32(rotations), _f32(rho), None if means2d is None else _f32(means2d),
        params.contiguous(), size)
    return RasterResult(image, radii, visible, centres, n_pairs)


def voxelize(means, scales, rotations, rho, grid, chunk=None) -> torch.Tensor:
    """Volume [nx, ny, nz] (1/mm) of the Gaussians on `grid` (METHOD §7); forward only (see module docstring)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, scales, rotations, rho))
    if needs_grad or not _all_float32(means, scales, rotations, rho):
        from . import torch_ref

        kwargs = {} if chunk is None else {"chunk": chunk}
        return torch_ref.voxelize(means, scales, rotations, rho, grid, **kwargs)
    origin = [float(v) for v in grid.first_voxel_centre]
    spacing = [float(v) for v in grid.spacing]
    shape = [int(v) for v in grid.resolution]
    with torch.no_grad():
        return _ext().voxelize_forward(_f32(means.detach()), _f32(scales.detach()), _f32(rotations.detach()),
                                       _f32(rho.detach()), origin, spacing, shape, poison_enabled())
