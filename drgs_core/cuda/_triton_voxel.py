"""Triton voxeliser (backend "triton"): the rule of `render.torch_ref.voxelize` and csrc/voxel.cu,

    V(x) = sum_i rho_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i))   at voxel centres x (1/mm),

voxel centre x counted for Gaussian i iff |x_d - mu_d| <= 3 sqrt(Sigma_dd) on every axis d (FOOTPRINT_SIGMAS);
Gaussians with a scale <= 0, a zero quaternion or non-finite parameters contribute nothing.

One kernel, forward only.  Program (i, s) of a (P, split) launch grid evaluates Gaussian i.  In float64 it
normalises the quaternion, forms m (row k = Rq[:, k] / s_k, so that q = sum_k (m_k . (x - mu))^2 has no
cancellation) and the clipped voxel box: the division of csrc's `voxel_range`, then the boundary voxels
re-checked with the literal rule as `common.footprint_range` does (the division can round a centre lying on a
box face to either side).  It then walks blocks s, s + split, ... of BLOCK voxels of that box (z fastest, so
that neighbouring lanes hit neighbouring addresses) and atomically adds rho exp(-q/2) into the float32 volume
(q in float64 as in csrc, exp in float32).  split > 1 spreads large boxes over several programs when there are
few Gaussians.  Sizes come from P and the grid only: no host synchronisation.  Float atomics: the summation
order varies, so volumes are not bit-reproducible (~1e-7 relative).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..render.common import FOOTPRINT_SIGMAS
from ._triton import on_device
from ._triton_raster import finite, quat_rotation

BLOCK = 256                 # voxels per step of one program's box walk
MIN_PROGRAMS = 1 << 16      # few Gaussians: split boxes until at least this many programs run (GPU occupancy)
MAX_SPLIT = 65535           # CUDA's limit on the second launch-grid dimension
MAX_VOXELS = 2**31 - 1 - BLOCK   # box indices are int32
# no FMA contraction: voxel centres o + k sp then round as the reference's (numpy) axes do, so that a centre on
# a box face is decided alike (the interpreter takes no such option and never contracts)
_NO_FMA = {} if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else {"enable_fp_fusion": False}


@triton.jit
def _axis_range(mu, half, o, sp, n):
    """First and last voxel index (int32) of the centres o + k sp, k in [0, n), with |centre - mu| <= half;
    first > last when there is none.  mu, half, o, sp float64 (finite half and mu assumed by the caller)."""
    nf = n.to(tl.float64)
    lo = tl.ceil((mu - half - o) / sp)
    hi = tl.floor((mu + half - o) / sp)
    first = tl.minimum(tl.maximum(lo, 0.0), nf).to(tl.int32)    # clamped first: +-inf convert safely
    last = tl.minimum(tl.maximum(hi, -1.0), nf - 1.0).to(tl.int32)
    # the division can round a boundary centre to the wrong side: decide those with the literal rule
    lower = first - 1
    first = tl.where((lower >= 0) & (tl.abs(o + lower.to(tl.float64) * sp - mu) <= half), lower, first)
    first = tl.where((first <= last) & ~(tl.abs(o + first.to(tl.float64) * sp - mu) <= half), first + 1, first)
    upper = last + 1
    last = tl.where((upper < n) & (tl.abs(o + upper.to(tl.float64) * sp - mu) <= half), upper, last)
    last = tl.where((last >= first) & ~(tl.abs(o + last.to(tl.float64) * sp - mu) <= half), last - 1, last)
    return first, last


@triton.jit(do_not_specialize=["n0", "n1", "n2"])
def _voxel_kernel(means_ptr, scales_ptr, rot_ptr, rho_ptr, grid_ptr, vol_ptr, n0, n1, n2,
                  SIGMAS: tl.constexpr, BLOCK: tl.constexpr):
    """Adds Gaussian program_id(0)'s share (blocks program_id(1) + k num_programs(1)) into vol [n0, n1, n2].
    grid_ptr: float64 [6] first voxel centre (mm), spacing (mm)."""
    i = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    f64 = tl.float64
    mu0 = tl.load(means_ptr + 3 * i).to(f64)
    mu1 = tl.load(means_ptr + 3 * i + 1).to(f64)
    mu2 = tl.load(means_ptr + 3 * i + 2).to(f64)
    s0 = tl.load(scales_ptr + 3 * i).to(f64)
    s1 = tl.load(scales_ptr + 3 * i + 1).to(f64)
    s2 = tl.load(scales_ptr + 3 * i + 2).to(f64)
    q0 = tl.load(rot_ptr + 4 * i).to(f64)
    q1 = tl.load(rot_ptr + 4 * i + 1).to(f64)
    q2 = tl.load(rot_ptr + 4 * i + 2).to(f64)
    q3 = tl.load(rot_ptr + 4 * i + 3).to(f64)
    rho = tl.load(rho_ptr + i)
    o0 = tl.load(grid_ptr + 0)
    o1 = tl.load(grid_ptr + 1)
    o2 = tl.load(grid_ptr + 2)
    sp0 = tl.load(grid_ptr + 3)
    sp1 = tl.load(grid_ptr + 4)
    sp2 = tl.load(grid_ptr + 5)

    qn2 = q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3
    ok = (finite(mu0) & finite(mu1) & finite(mu2) & finite(s0) & finite(s1) & finite(s2)
          & (s0 > 0.0) & (s1 > 0.0) & (s2 > 0.0) & finite(qn2) & (qn2 > 0.0))
    # invalid Gaussians go on with harmless stand-ins and an empty box
    mu0 = tl.where(ok, mu0, 0.0)
    mu1 = tl.where(ok, mu1, 0.0)
    mu2 = tl.where(ok, mu2, 0.0)
    s0 = tl.where(ok, s0, 1.0)
    s1 = tl.where(ok, s1, 1.0)
    s2 = tl.where(ok, s2, 1.0)
    inv = 1.0 / tl.sqrt(tl.where(ok, qn2, 1.0))
    qw = tl.where(ok, q0, 1.0) * inv
    qx = tl.where(ok, q1, 0.0) * inv
    qy = tl.where(ok, q2, 0.0) * inv
    qz = tl.where(ok, q3, 0.0) * inv
    R00, R01, R02, R10, R11, R12, R20, R21, R22 = quat_rotation(qw, qx, qy, qz)
    # half widths of the box: SIGMAS sqrt(Sigma_dd), Sigma_dd = sum_k R_dk^2 s_k^2
    v0, v1, v2 = s0 * s0, s1 * s1, s2 * s2
    h0 = SIGMAS * tl.sqrt(R00 * R00 * v0 + R01 * R01 * v1 + R02 * R02 * v2)
    h1 = SIGMAS * tl.sqrt(R10 * R10 * v0 + R11 * R11 * v1 + R12 * R12 * v2)
    h2 = SIGMAS * tl.sqrt(R20 * R20 * v0 + R21 * R21 * v1 + R22 * R22 * v2)
    ok = ok & finite(h0) & finite(h1) & finite(h2)
    a0, b0 = _axis_range(mu0, tl.where(ok, h0, 0.0), o0, sp0, n0)
    a1, b1 = _axis_range(mu1, tl.where(ok, h1, 0.0), o1, sp1, n1)
    a2, b2 = _axis_range(mu2, tl.where(ok, h2, 0.0), o2, sp2, n2)
    c0 = tl.maximum(b0 - a0 + 1, 0)
    c1 = tl.maximum(b1 - a1 + 1, 0)
    c2 = tl.maximum(b2 - a2 + 1, 0)
    count = tl.where(ok, c0 * c1 * c2, 0)
    c2 = tl.maximum(c2, 1)
    c1 = tl.maximum(c1, 1)
    # m: row k = Rq[:, k] / s_k
    m00, m01, m02 = R00 / s0, R10 / s0, R20 / s0
    m10, m11, m12 = R01 / s1, R11 / s1, R21 / s1
    m20, m21, m22 = R02 / s2, R12 / s2, R22 / s2

    lanes = tl.arange(0, BLOCK)
    for start in range(s * BLOCK, count, split * BLOCK):
        k = start + lanes
        kz = k % c2
        t = k // c2
        ix = a0 + t // c1
        iy = a1 + t % c1
        iz = a2 + kz
        dx = o0 + ix.to(f64) * sp0 - mu0
        dy = o1 + iy.to(f64) * sp1 - mu1
        dz = o2 + iz.to(f64) * sp2 - mu2
        y0 = m00 * dx + m01 * dy + m02 * dz
        y1 = m10 * dx + m11 * dy + m12 * dz
        y2 = m20 * dx + m21 * dy + m22 * dz
        q = (y0 * y0 + y1 * y1 + y2 * y2).to(tl.float32)
        val = rho * tl.exp(-0.5 * q)
        # exp underflows to 0 far out in thin boxes: skip those atomics
        addr = (ix.to(tl.int64) * n1 + iy) * n2 + iz
        tl.atomic_add(vol_ptr + addr, val, mask=(k < count) & (val != 0.0), sem="relaxed")


def default_split(P: int, n_voxels: int) -> int:
    """Programs per Gaussian: 1 for many Gaussians, more for few (never more than the grid has blocks)."""
    want = -(-MIN_PROGRAMS // max(P, 1))
    return max(1, min(want, -(-n_voxels // BLOCK), MAX_SPLIT))


def voxelize(means, scales, rotations, rho, first_voxel_centre, spacing, resolution, split=None) -> torch.Tensor:
    """Volume [nx, ny, nz] float32 (1/mm) of float32 Gaussians on the grid of voxel centres
    first_voxel_centre + index * spacing (mm, per axis; resolution (nx, ny, nz)).

    means [P, 3] mm, scales [P, 3] mm (std devs), rotations [P, 4] (w, x, y, z, any norm), rho [P] 1/mm, all
    float32 on one device (a GPU, or the CPU under TRITON_INTERPRET=1); at most MAX_VOXELS voxels.
    split: programs per Gaussian (None: `default_split`).  Forward only: no gradient flows.
    """
    n = [int(v) for v in resolution]
    if n[0] * n[1] * n[2] > MAX_VOXELS:
        raise ValueError(f"grid {n} has more than {MAX_VOXELS} voxels (int32 box indices)")
    dev = means.device
    volume = torch.zeros(n, dtype=torch.float32, device=dev)
    P = int(means.shape[0])
    if P == 0:
        return volume
    # grid parameters in float64 (a Python float reaches a Triton kernel as float32); pinned and non-blocking,
    # so that the copy does not wait for the GPU
    cuda = dev.type == "cuda"
    gp = torch.tensor([float(v) for v in first_voxel_centre] + [float(v) for v in spacing], dtype=torch.float64,
                      pin_memory=cuda).to(dev, non_blocking=True)
    split = default_split(P, volume.numel()) if split is None else max(1, min(int(split), MAX_SPLIT))
    with torch.no_grad(), on_device(means):
        _voxel_kernel[(P, split)](means.detach().contiguous(), scales.detach().contiguous(),
                                  rotations.detach().contiguous(), rho.detach().contiguous(), gp, volume,
                                  n[0], n[1], n[2], SIGMAS=float(FOOTPRINT_SIGMAS), BLOCK=BLOCK, num_warps=4,
                                  **_NO_FMA)
    return volume
