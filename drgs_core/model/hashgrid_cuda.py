"""CUDA multiresolution hash-grid encoding (kernels in csrc/hashgrid.cu), same indexing as `model.hashgrid`.

Interface
---------
    available() -> bool
        True when the compiled kernels load (CUDA device + extension `drgs_core._C`).
    supports(encoding, x) -> bool
        True when `encode_module(encoding, x)` can run: x and the table are float32 CUDA tensors,
        n_features in {1, 2, 4, 8}, 1 <= n_dims <= 4, at most 32 levels, and the kernels are available.
    encode(x, table, level_resolutions, level_offsets, level_hashed, table_size) -> [P, L*F]
        x [P, D] float32 CUDA, positions in [0, 1]^D (values outside are clamped, and get zero gradient, as in
        the reference); table [R, F] float32 CUDA (the flat parameter of all levels); level_resolutions[l] = N_l
        (cells per axis), level_offsets[l] = first row of level l in `table`, level_hashed[l] = True for a
        spatially hashed level (rows = table_size) and False for a directly indexed one (rows = (N_l + 1)^D),
        table_size = T = 2**log2_table_size.  Output [P, L*F] float32, level-major (columns l*F .. l*F+F-1 are
        level l).  Differentiable w.r.t. table (dense gradient, accumulated with atomics, so the summation order
        of colliding rows is not deterministic) and x (piecewise-linear, zero outside [0, 1]).
    encode_module(encoding, x) -> [P, L*F]
        `encode` with the metadata of a `model.hashgrid.HashGridEncoding`:
        (encoding.table, encoding.level_resolutions, encoding.level_offsets, encoding._hashed,
        encoding.table_size).

Hook for `HashGridEncoding.forward` (model/hashgrid.py), placed after the input-shape check:

    if x.is_cuda and self.table.is_cuda and self.table.dtype == torch.float32:
        from . import hashgrid_cuda
        if hashgrid_cuda.supports(self, x):
            return hashgrid_cuda.encode_module(self, x)
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._ext import load_extension, poison_enabled, unavailable_reason

__all__ = ["available", "supports", "encode", "encode_module", "unavailable_reason"]

_MAX_LEVELS = 32
_FEATURES = (1, 2, 4, 8)


def available() -> bool:
    return load_extension() is not None


def supports(encoding, x: torch.Tensor) -> bool:
    table = encoding.table
    return (x.is_cuda and table.is_cuda and table.dtype == torch.float32 and x.dim() == 2
            and 1 <= x.shape[1] <= 4 and x.shape[1] == encoding.n_dims and table.shape[1] in _FEATURES
            and 1 <= encoding.n_levels <= _MAX_LEVELS and table.is_contiguous() and available())


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, meta):
        res, offsets, hashed, table_size = meta
        ext = load_extension()
        out = ext.hashgrid_forward(x, table, res, offsets, hashed, table_size, poison_enabled())
        ctx.save_for_backward(x, table)
        ctx.meta = meta
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        res, offsets, hashed, table_size = ctx.meta
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.contiguous()
        if g.dtype != torch.float32:
            g = g.float()
        gt, gx = load_extension().hashgrid_backward(g, x, table, res, offsets, hashed, table_size, need_table, need_x)
        return (gx if need_x else None), (gt if need_table else None), None


def encode(x: torch.Tensor, table: torch.Tensor, level_resolutions, level_offsets, level_hashed,
           table_size: int) -> torch.Tensor:
    """See the module docstring."""
    if load_extension() is None:
        raise RuntimeError(f"the CUDA hash-grid kernels are unavailable: {unavailable_reason()}")
    meta = ([int(n) for n in level_resolutions], [int(o) for o in level_offsets],
            [1 if h else 0 for h in level_hashed], int(table_size))
    xx = x if x.dtype == torch.float32 else x.float()
    return _HashEncode.apply(xx.contiguous(), table, meta)


def encode_module(encoding, x: torch.Tensor) -> torch.Tensor:
    """`encode` with the metadata of a `HashGridEncoding` (see the module docstring)."""
    meta = getattr(encoding, "_drgs_cuda_meta", None)
    if meta is None:
        meta = ([int(n) for n in encoding.level_resolutions], [int(o) for o in encoding.level_offsets],
                [1 if h else 0 for h in encoding._hashed], int(encoding.table_size))
        try:
            encoding._drgs_cuda_meta = meta
        except AttributeError:
            pass
    xx = x if x.dtype == torch.float32 else x.float()
    return _HashEncode.apply(xx.contiguous(), encoding.table, meta)
