"""Backend "cuda-ext": autograd wrappers around the compiled kernels of `drgs_core._C` (csrc/).

Every backend module of `drgs_core.cuda` offers the same functions (see `drgs_core.cuda` for the contract):

    available() -> bool, unavailable_reason() -> str | None
    rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None) -> RasterResult
    voxelize(means, scales, rotations, rho, grid, chunk=None) -> [nx, ny, nz]
    hashgrid_supports(encoding, x) -> bool;  hashgrid_encode(encoding, x) -> [P, L*F]

Inputs: CUDA tensors, means [P, 3] mm, scales [P, 3] mm (activated std devs), rotations [P, 4] (w, x, y, z),
rho [P] 1/mm; camera a `geometry.Camera` or `geometry.PackedCamera`; means2d an optional zero leaf [P, 2]
whose gradient becomes dLoss/d(projected centre) in pixels.  The kernels work in float32 (per-Gaussian
projection and its chain rule in float64); other dtypes fall back to the torch reference.  `voxelize` is
forward-only: when a gradient is needed it falls back to the differentiable torch reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..geometry import PackedCamera
from ..render.common import RasterResult
from ._backend import load_extension, poison_enabled, unavailable_reason

__all__ = ["available", "unavailable_reason", "rasterize", "voxelize", "hashgrid_supports", "hashgrid_encode"]

_EMPTY: dict = {}
_HASH_MAX_LEVELS = 32          # kHashMaxLevels in csrc/kernels.h
_HASH_FEATURES = (1, 2, 4, 8)  # feature counts the hash kernels are instantiated for


class RasterForward(NamedTuple):
    """What `_C.raster_forward` returns (the order of csrc/ops.cpp).

    image [H, W]; radii [P] int32; visible [P] bool; centres [P, 2] pixels; geom0 [P, 4] (u, v, A, r) and
    geom1 [P, 2] (D, w) per Gaussian; box [P, 4] int32 clipped pixel box (x0, y0, x1, y1); touched [P] int32
    tiles per Gaussian; offsets [P] int64 inclusive prefix sum of touched; keys / vals [capacity] int32 the
    unsorted (tile, Gaussian) pair list; n_pairs 0-d int64, the pairs the image needed.
    """

    image: torch.Tensor
    radii: torch.Tensor
    visible: torch.Tensor
    centres: torch.Tensor
    geom0: torch.Tensor
    geom1: torch.Tensor
    box: torch.Tensor
    touched: torch.Tensor
    offsets: torch.Tensor
    keys: torch.Tensor
    vals: torch.Tensor
    n_pairs: torch.Tensor

    def for_backward(self) -> tuple:
        """The buffers `_C.raster_backward` needs after the camera, in its argument order."""
        return (self.geom0, self.geom1, self.box, self.touched, self.offsets, self.keys, self.vals, self.n_pairs)


class RasterGrads(NamedTuple):
    """What `_C.raster_backward` returns: gradients of means, scales, rotations, rho, means2d (float32)."""

    means: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    rho: torch.Tensor
    means2d: torch.Tensor


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


def _all_float32(*ts) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in ts)


# ---------------------------------------------------------------------------------------------- raster
class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, scales, rotations, rho, means2d, params, size):
        W, H, capacity = size
        uv = means2d.detach() if means2d is not None else _empty(means.device)
        fw = RasterForward(*_ext().raster_forward(means, scales, rotations, rho, uv, params, W, H, capacity,
                                                  poison_enabled()))
        ctx.save_for_backward(means, scales, rotations, rho, uv, params, *fw.for_backward())
        ctx.size = (W, H)
        ctx.has_means2d = means2d is not None
        ctx.mark_non_differentiable(fw.radii, fw.visible, fw.centres, fw.n_pairs)
        return fw.image, fw.radii, fw.visible, fw.centres, fw.n_pairs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, *_unused):
        W, H = ctx.size
        g = grad_image.contiguous().float()
        means, scales, rotations, rho, uv, params, *saved = ctx.saved_tensors
        gr = RasterGrads(*_ext().raster_backward(g, means, scales, rotations, rho, uv, params, W, H, *saved,
                                                 poison_enabled()))
        return (gr.means, gr.scales, gr.rotations, gr.rho, (gr.means2d if ctx.has_means2d else None), None, None)


def camera_buffer(camera, device) -> tuple[torch.Tensor, int, int]:
    """(params [16] float64 on `device`, width, height) of a `Camera` or `PackedCamera` (no host sync)."""
    packed = camera if isinstance(camera, PackedCamera) else camera.pack(device)
    params = packed.params
    if params.device != device or params.dtype != torch.float64:
        params = params.to(device=device, dtype=torch.float64)
    return params.contiguous(), int(packed.width), int(packed.height)


def rasterize(means, scales, rotations, rho, camera, means2d=None, pair_capacity=None) -> RasterResult:
    """Cone-beam X-ray rasterisation on the GPU; see the module docstring and `render.rasterize`."""
    if not _all_float32(means, scales, rotations, rho, means2d):
        from ..render import torch_ref

        return torch_ref.rasterize(means, scales, rotations, rho, camera, means2d)
    params, W, H = camera_buffer(camera, means.device)
    image, radii, visible, centres, n_pairs = _Rasterize.apply(
        means.contiguous(), scales.contiguous(), rotations.contiguous(), rho.contiguous(),
        None if means2d is None else means2d.contiguous(), params, (W, H, int(pair_capacity or 0)))
    return RasterResult(image, radii, visible, centres, n_pairs)


# ---------------------------------------------------------------------------------------------- voxel
def voxelize(means, scales, rotations, rho, grid, chunk=None) -> torch.Tensor:
    """Volume [nx, ny, nz] (1/mm) of the Gaussians on `grid` (METHOD §7); forward only (see module docstring)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, scales, rotations, rho))
    if needs_grad or not _all_float32(means, scales, rotations, rho):
        from ..render import torch_ref

        kwargs = {} if chunk is None else {"chunk": chunk}
        return torch_ref.voxelize(means, scales, rotations, rho, grid, **kwargs)
    origin = [float(v) for v in grid.first_voxel_centre]
    spacing = [float(v) for v in grid.spacing]
    shape = [int(v) for v in grid.resolution]
    with torch.no_grad():
        return _ext().voxelize_forward(means.detach().contiguous(), scales.detach().contiguous(),
                                       rotations.detach().contiguous(), rho.detach().contiguous(),
                                       origin, spacing, shape, poison_enabled())


# ---------------------------------------------------------------------------------------------- hash grid
class HashMeta(NamedTuple):
    """Per-level metadata of a `model.hashgrid.HashGridEncoding`, as the kernels take it."""

    resolutions: list   # N_l, cells per axis
    offsets: list       # first row of level l in the flat table
    hashed: list        # 1 for a spatially hashed level, 0 for a directly indexed one
    table_size: int     # T rows per hashed level


def hash_meta(encoding) -> HashMeta:
    """The (cached) `HashMeta` of `encoding`."""
    meta = getattr(encoding, "_drgs_hash_meta", None)
    if meta is None:
        meta = HashMeta([int(n) for n in encoding.level_resolutions], [int(o) for o in encoding.level_offsets],
                        [1 if h else 0 for h in encoding._hashed], int(encoding.table_size))
        encoding._drgs_hash_meta = meta
    return meta


def hashgrid_shape_ok(encoding, x: torch.Tensor) -> bool:
    """The shapes / dtypes every GPU hash-grid kernel handles: float32 CUDA table, x [P, D] with D = n_dims
    <= 4, F in {1, 2, 4, 8}, at most 32 levels, contiguous table."""
    table = encoding.table
    return (x.is_cuda and table.is_cuda and table.dtype == torch.float32 and x.dim() == 2
            and 1 <= x.shape[1] <= 4 and x.shape[1] == encoding.n_dims and table.shape[1] in _HASH_FEATURES
            and 1 <= encoding.n_levels <= _HASH_MAX_LEVELS and table.is_contiguous())


def hashgrid_supports(encoding, x: torch.Tensor) -> bool:
    """True when `hashgrid_encode(encoding, x)` can run here."""
    return hashgrid_shape_ok(encoding, x) and available()


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, meta: HashMeta):
        out = _ext().hashgrid_forward(x, table, *meta, poison_enabled())
        ctx.save_for_backward(x, table)
        ctx.meta = meta
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gt, gx = _ext().hashgrid_backward(grad_out.contiguous().float(), x, table, *ctx.meta, need_table, need_x)
        return (gx if need_x else None), (gt if need_table else None), None


def hashgrid_encode(encoding, x: torch.Tensor) -> torch.Tensor:
    """The encoding of x [P, D] (positions in [0, 1]^D, clamped) by `encoding`: [P, L*F] float32, level-major.
    Differentiable w.r.t. the table (atomics: summation order of colliding rows not deterministic) and x."""
    return _HashEncode.apply(x.float().contiguous(), encoding.table, hash_meta(encoding))
