"""Triton multiresolution hash-grid encoding (backend "triton"), indexing bit for bit as `model.hashgrid`.

One program encodes BLOCK points on all L levels.  Per level l (N = N_l cells per axis):
    s = clamp(x, 0, 1) * N (float32),  c = clamp(floor(s), 0, N - 1),  f = s - c,
    out_l = sum over the 2^D corners b of w_b table[row_l(c + b)],  w_b = prod_d (f_d if b_d else 1 - f_d),
    row_l(v) = offset_l + (hashed_l ? XOR_d ((v_d pi_d) & 0xFFFFFFFF) & (T - 1) : sum_d v_d (N + 1)^d).
Backward: the table gradient by atomic adds (so the summation order of colliding rows is not deterministic,
as in csrc/hashgrid.cu); the x gradient N sum_b (g . table[row_b]) dw_b/df_d, zero where x_d is outside [0, 1].
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton import on_device
from ._wrapper import hash_meta

BLOCK = 128
# No fused multiply-add: f = x N - c must round x N first, exactly as the reference (and csrc/hashgrid.cu's
# __fmul_rn / __fsub_rn) do, or cells near a vertex get a different f.  The interpreter takes no such option.
_NO_FMA = {} if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else {"enable_fp_fusion": False}


@triton.jit
def _corner(b: tl.constexpr, d: tl.constexpr, f, ones):
    """Weight factor of axis d for corner b (bit d of b): f or 1 - f."""
    if (b >> d) & 1:
        return f
    else:
        return ones - f


@triton.jit
def _dweight(b: tl.constexpr, d: tl.constexpr, ones):
    """d(weight factor of axis d)/df_d for corner b: +1 or -1."""
    if (b >> d) & 1:
        return ones
    else:
        return -ones


@triton.jit
def _hash_kernel(x_ptr, table_ptr, res_ptr, off_ptr, hashed_ptr, out_ptr, gout_ptr, gtable_ptr, gx_ptr, P,
                 table_mask, D: tl.constexpr, F: tl.constexpr, L: tl.constexpr, BACKWARD: tl.constexpr,
                 NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pm = p < P
    feat = tl.arange(0, F)
    fm = pm[:, None] & (feat[None, :] < F)
    ones = tl.full([BLOCK], 1.0, tl.float32)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    # x, one variable per axis (axes >= D unused)
    xr0 = tl.load(x_ptr + p * D, mask=pm, other=0.0)
    xr1 = zero
    xr2 = zero
    xr3 = zero
    if D > 1:
        xr1 = tl.load(x_ptr + p * D + 1, mask=pm, other=0.0)
    if D > 2:
        xr2 = tl.load(x_ptr + p * D + 2, mask=pm, other=0.0)
    if D > 3:
        xr3 = tl.load(x_ptr + p * D + 3, mask=pm, other=0.0)
    x0 = tl.minimum(tl.maximum(xr0, 0.0), 1.0)
    x1 = tl.minimum(tl.maximum(xr1, 0.0), 1.0)
    x2 = tl.minimum(tl.maximum(xr2, 0.0), 1.0)
    x3 = tl.minimum(tl.maximum(xr3, 0.0), 1.0)
    gx0 = zero
    gx1 = zero
    gx2 = zero
    gx3 = zero
    for l in range(L):  # a loop, not unrolled: keeps compile time short (corners are unrolled)
        N = tl.load(res_ptr + l)
        Nf = N.to(tl.float32)
        side = (N + 1).to(tl.int64)
        offset = tl.load(off_ptr + l)
        hashed = tl.load(hashed_ptr + l) != 0
        s0 = x0 * Nf
        s1 = x1 * Nf
        s2 = x2 * Nf
        s3 = x3 * Nf
        c0 = tl.minimum(tl.maximum(tl.floor(s0), 0.0), Nf - 1.0)
        c1 = tl.minimum(tl.maximum(tl.floor(s1), 0.0), Nf - 1.0)
        c2 = tl.minimum(tl.maximum(tl.floor(s2), 0.0), Nf - 1.0)
        c3 = tl.minimum(tl.maximum(tl.floor(s3), 0.0), Nf - 1.0)
        f0 = s0 - c0
        f1 = s1 - c1
        f2 = s2 - c2
        f3 = s3 - c3
        v0 = c0.to(tl.int64)
        v1 = c1.to(tl.int64)
        v2 = c2.to(tl.int64)
        v3 = c3.to(tl.int64)
        if BACKWARD:
            g = tl.load(gout_ptr + p[:, None] * (L * F) + l * F + feat[None, :], mask=fm, other=0.0)
        else:
            acc = tl.zeros([BLOCK, F], dtype=tl.float32)
        for b in tl.static_range(1 << D):
            w0 = _corner(b, 0, f0, ones)
            w1 = ones
            w2 = ones
            w3 = ones
            a0 = v0 + ((b >> 0) & 1)
            h = a0
            lin = a0
            if D > 1:
                w1 = _corner(b, 1, f1, ones)
                a1 = v1 + ((b >> 1) & 1)
                h = h ^ ((a1 * 2654435761) & 0xFFFFFFFF)
                lin += a1 * side
            if D > 2:
                w2 = _corner(b, 2, f2, ones)
                a2 = v2 + ((b >> 2) & 1)
                h = h ^ ((a2 * 805459861) & 0xFFFFFFFF)
                lin += a2 * side * side
            if D > 3:
                w3 = _corner(b, 3, f3, ones)
                a3 = v3 + ((b >> 3) & 1)
                h = h ^ ((a3 * 3674653429) & 0xFFFFFFFF)
                lin += a3 * side * side * side
            row = offset + tl.where(hashed, h & table_mask, lin)
            ptrs = table_ptr + row[:, None] * F + feat[None, :]
            w = w0 * w1 * w2 * w3
            if BACKWARD:
                if NEED_TABLE:
                    tl.atomic_add(gtable_ptr + row[:, None] * F + feat[None, :], w[:, None] * g, mask=fm,
                                  sem="relaxed")
                if NEED_X:
                    dot = tl.sum(g * tl.load(ptrs, mask=fm, other=0.0), axis=1) * Nf
                    gx0 += dot * _dweight(b, 0, ones) * w1 * w2 * w3
                    if D > 1:
                        gx1 += dot * w0 * _dweight(b, 1, ones) * w2 * w3
                    if D > 2:
                        gx2 += dot * w0 * w1 * _dweight(b, 2, ones) * w3
                    if D > 3:
                        gx3 += dot * w0 * w1 * w2 * _dweight(b, 3, ones)
            else:
                acc += w[:, None] * tl.load(ptrs, mask=fm, other=0.0)
        if not BACKWARD:
            tl.store(out_ptr + p[:, None] * (L * F) + l * F + feat[None, :], acc, mask=fm)
    if BACKWARD:
        if NEED_X:
            # the clamp passes gradient only where 0 <= x_d <= 1
            tl.store(gx_ptr + p * D, tl.where((xr0 >= 0.0) & (xr0 <= 1.0), gx0, 0.0), mask=pm)
            if D > 1:
                tl.store(gx_ptr + p * D + 1, tl.where((xr1 >= 0.0) & (xr1 <= 1.0), gx1, 0.0), mask=pm)
            if D > 2:
                tl.store(gx_ptr + p * D + 2, tl.where((xr2 >= 0.0) & (xr2 <= 1.0), gx2, 0.0), mask=pm)
            if D > 3:
                tl.store(gx_ptr + p * D + 3, tl.where((xr3 >= 0.0) & (xr3 <= 1.0), gx3, 0.0), mask=pm)


def _device_meta(encoding, device):
    """(resolutions int32 [L], offsets int64 [L], hashed int32 [L]) on `device`, cached on the encoding."""
    cache = getattr(encoding, "_drgs_triton_meta", None)
    if cache is None or cache[0].device != device:
        m = hash_meta(encoding)
        cache = (torch.tensor(m.resolutions, dtype=torch.int32, device=device),
                 torch.tensor(m.offsets, dtype=torch.int64, device=device),
                 torch.tensor(m.hashed, dtype=torch.int32, device=device))
        encoding._drgs_triton_meta = cache
    return cache


def _launch(x, table, meta, out=None, gout=None, gtable=None, gx=None):
    res, off, hashed, table_size = meta
    P, D = x.shape
    F = table.shape[1]
    L = res.shape[0]
    if P == 0:
        return
    dummy = x  # never dereferenced when the matching flag is off
    with on_device(x):
        _hash_kernel[(triton.cdiv(P, BLOCK),)](
            x, table, res, off, hashed, dummy if out is None else out, dummy if gout is None else gout,
            dummy if gtable is None else gtable, dummy if gx is None else gx, P, table_size - 1,
            D=D, F=F, L=L, BACKWARD=gout is not None, NEED_TABLE=gtable is not None, NEED_X=gx is not None,
            BLOCK=BLOCK, num_warps=4, **_NO_FMA)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, meta):
        out = torch.empty(x.shape[0], meta[0].shape[0] * table.shape[1], dtype=torch.float32, device=x.device)
        _launch(x, table, meta, out=out)
        ctx.save_for_backward(x, table)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gt = torch.zeros_like(table) if need_table else None
        gx = torch.zeros_like(x) if need_x else None
        if need_x or need_table:
            _launch(x, table, ctx.meta, gout=grad_out.contiguous().float(), gtable=gt, gx=gx)
        return gx, gt, None


def hashgrid_encode(encoding, x: torch.Tensor) -> torch.Tensor:
    """[P, L*F] float32 encoding of x [P, D] (see the module docstring); differentiable w.r.t. table and x."""
    res, off, hashed = _device_meta(encoding, x.device)
    meta = (res, off, hashed, int(encoding.table_size))
    return _HashEncode.apply(x.float().contiguous(), encoding.table, meta)
