"""CUDA backend of `drgs_core.render`: autograd wrappers around the kernels of `drgs_core._C` (csrc/).

Same public signatures and numerical rules as `render.torch_ref` (see `render.common`):

    available() -> bool
    rasterize(means, scales, rotations, rho, camera, means2d=None) -> RasterResult(image, radii, visible, centres)
    voxelize(means, scales, rotations, rho, grid, chunk=None) -> [nx, ny, nz]

Inputs: CUDA tensors, means [P, 3] mm, scales [P, 3] mm (activated std devs), rotations [P, 4] (w, x, y, z),
rho [P] 1/mm; camera a `drgs_core.geometry.Camera`; means2d an optional zero leaf [P, 2] whose gradient becomes
dLoss/d(projected centre) in pixels.  The kernels work in float32 (per-Gaussian projection and its chain rule in
float64); other dtypes fall back to the torch reference.  `voxelize` is forward-only: when a gradient is needed
(grad mode on and an input requires grad) it falls back to the differentiable torch reference.

Hooking into the dispatch of `drgs_core/render/__init__.py` (it imports `drgs_core.render._cuda_backend`):
either import this module under that name there, or add `_cuda_backend.py` containing
`from .cuda_backend import available, rasterize, voxelize  # noqa: F401`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._ext import load_extension, poison_enabled, unavailable_reason
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


def camera_tensor(camera, device) -> torch.Tensor:
    """R (row-major) and T of `camera` as one contiguous float64 [12] tensor on `device`."""
    R = torch.as_tensor(camera.R).reshape(-1)
    T = torch.as_tensor(camera.T).reshape(-1)
    return torch.cat([R.to(device=device, dtype=torch.float64), T.to(device=device, dtype=torch.float64)])


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, scales, rotations, rho, means2d, cam_rt, cam):
        fx, fy, cx, cy, W, H = cam
        uv = means2d.detach() if means2d is not None else _empty(means.device)
        poison = poison_enabled()
        image, radii, visible, centres, geom0, geom1, box, _ = _ext().raster_forward(
            means, scales, rotations, rho, uv, cam_rt, fx, fy, cx, cy, W, H, poison)
        ctx.save_for_backward(means, scales, rotations, rho, uv, cam_rt, geom0, geom1, box)
        ctx.cam = cam
        ctx.has_means2d = means2d is not None
        ctx.mark_non_differentiable(radii, visible, centres)
        return image, radii, visible, centres

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, _g_radii=None, _g_visible=None, _g_centres=None):
        means, scales, rotations, rho, uv, cam_rt, geom0, geom1, box = ctx.saved_tensors
        fx, fy, cx, cy, W, H = ctx.cam
        g = grad_image.contiguous()
        if g.dtype != torch.float32:
            g = g.float()
        gm, gs, gq, grho, guv = _ext().raster_backward(
            g, means, scales, rotations, rho, uv, cam_rt, fx, fy, cx, cy, W, H, geom0, geom1, box, poison_enabled())
        return gm, gs, gq, grho, (guv if ctx.has_means2d else None), None, None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _all_float32(*ts) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in ts)


def rasterize(means, scales, rotations, rho, camera, means2d=None) -> RasterResult:
    """Cone-beam X-ray rasterisation on the GPU; see the module docstring and `render.rasterize`."""
    if not _all_float32(means, scales, rotations, rho, means2d):
        from . import torch_ref

        return torch_ref.rasterize(means, scales, rotations, rho, camera, means2d)
    dev = means.device
    cam_rt = camera_tensor(camera, dev)
    cam = (float(camera.fx), float(camera.fy), float(camera.cx), float(camera.cy), int(camera.width),
           int(camera.height))
    image, radii, visible, centres = _Rasterize.apply(
        _f32(means), _f32(scales), _f32(rotations), _f32(rho), None if means2d is None else _f32(means2d), cam_rt, cam)
    return RasterResult(image, radii, visible, centres)


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
