"""Shared mathematics of the Gaussian renderer (METHOD.md §4-§5, DESIGN.md `drgs_core.render`).

Every backend (the torch reference, the CUDA kernels) follows these rules; the functions here are the
executable statement of them and are reused by the tests of every backend.

Units and axes
--------------
World positions and scales in mm, attenuation rho in 1/mm, quaternions (w, x, y, z) (normalised here).
Camera space p = R_cam X + T (mm), the camera looks along +p_z; pixels (u = column, v = row) with integer
pixel centres; fx, fy, cx, cy in pixels (see `drgs_core.geometry`).

Per Gaussian with camera-space centre c (mm) the rules are

    culled                  if c_z < 0.2 * T[2]
    J                       = [[fx/c_z, 0, -fx c_x/c_z^2], [0, fy/c_z, -fy c_y/c_z^2], c^T/|c|]
    Sigma'                  = J R_cam Sigma R_cam^T J^T        (u, v in pixels, l in mm)
    Sigma'_2                = upper-left 2x2 block of Sigma'     (pixels^2); culled if det <= 0
    eta                     = sqrt(2 pi det Sigma' / det Sigma'_2)  (mm)
    (u_c, v_c)              = (cx + fx c_x/c_z, cy + fy c_y/c_z) (+ means2d when given)
    I(x, y)                 = sum_i rho_i eta_i exp(-1/2 d^T Sigma'_2^-1 d),  d = (x, y) - (u_c, v_c)
    footprint               |x - u_c| <= 3 sqrt(Sigma'_2[0,0])  and  |y - v_c| <= 3 sqrt(Sigma'_2[1,1])

How they are evaluated (exactly equal in exact arithmetic, better conditioned in floating point):

* Sigma'_2 = M M^T with M = J_2 R_cam R(q) diag(s) (J_2 = first two rows of J), so
  det Sigma'_2 = sum of the squared 2x2 minors of M (Cauchy-Binet), never negative by rounding.
* det Sigma' = det(J)^2 det(Sigma) with det J = fx fy |c| / c_z^3 and det Sigma = (s_1 s_2 s_3)^2, hence
  eta = sqrt(2 pi) * fx fy |c| / c_z^3 * |s_1 s_2 s_3| / sqrt(det Sigma'_2).
  `ray_space_covariance` gives the literal Sigma' for checking this.

A Gaussian is *visible* iff it is not culled and at least one pixel centre of the image lies inside its
footprint rectangle; radii = ceil(max(3 sqrt(Sigma'_2[0,0]), 3 sqrt(Sigma'_2[1,1]))) for visible
Gaussians (int32), 0 otherwise.

Voxelisation (METHOD §7): V(x) = sum_i rho_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)) at voxel centres,
where voxel centre x counts for Gaussian i iff |x_d - mu_d| <= 3 sqrt(Sigma_dd) on every axis d.
Gaussians with a scale <= 0 (degenerate Sigma) contribute nothing to the volume.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..geometry import PackedCamera

#: Gaussians whose camera-space depth is below this fraction of T[2] (= sad) are culled.
NEAR_FRACTION = 0.2
#: Footprint half-width in standard deviations (per axis, pixels or voxels).
FOOTPRINT_SIGMAS = 3.0
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_INT32_MAX = 2**31 - 1


class RasterResult(NamedTuple):
    """Output of `rasterize`.

    image   [H, W]  line integrals of attenuation (dimensionless), rows = detector v, columns = u.
    radii   [P] int32  ceil of the larger 3-sigma footprint half-width in pixels; 0 = not visible.
    visible [P] bool   the Gaussian contributes to at least one pixel centre.
    centres [P, 2]     projected centres (u_c, v_c) in pixels, detached; (0, 0) for culled Gaussians.
    n_pairs            CUDA backend: 0-d int64 device tensor, the (tile, Gaussian) pairs the image needed;
                       more than the `pair_capacity` asked for means contributions were dropped.  None
                       for the torch backend.
    """

    image: torch.Tensor
    radii: torch.Tensor
    visible: torch.Tensor
    centres: torch.Tensor
    n_pairs: torch.Tensor | None = None


class Projection(NamedTuple):
    """Per-visible-Gaussian screen-space quantities (output of `project_gaussians`).

    index        [V] long   indices of the visible Gaussians into the input arrays.
    u, v         [V]        projected centre in pixels (means2d included), differentiable.
    conic_a/b/c  [V]        Sigma'_2^-1 = [[a, b], [b, c]] in 1/pixel^2, differentiable.
    weight       [V]        rho * eta (1/mm * mm = dimensionless peak line integral), differentiable.
    half_u/v     [V]        3-sigma footprint half-widths in pixels, detached.
    x0, y0       [V] long   first footprint pixel column / row inside the image.
    nx, ny       [V] long   number of footprint pixel columns / rows inside the image (>= 1).
    radii        [P] int32, visible [P] bool, centres [P, 2]: as in `RasterResult`.
    params       [6, V]     (u, v, conic_a, conic_b, conic_c, weight) stacked (the fields above are views).
    """

    index: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    conic_a: torch.Tensor
    conic_b: torch.Tensor
    conic_c: torch.Tensor
    weight: torch.Tensor
    half_u: torch.Tensor
    half_v: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    nx: torch.Tensor
    ny: torch.Tensor
    radii: torch.Tensor
    visible: torch.Tensor
    centres: torch.Tensor
    params: torch.Tensor


# ---------------------------------------------------------------------------------------------
# 3D Gaussians
# ---------------------------------------------------------------------------------------------
def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Quaternions [P, 4] (w, x, y, z), any norm > 0 -> rotation matrices [P, 3, 3] (normalised inside)."""
    return _rotation_cm(q.T).permute(2, 0, 1)


def _rotation_cm(q: torch.Tensor) -> torch.Tensor:
    """Component-major quaternion -> rotation: q [4, P] -> R [3, 3, P] (P last, for fast broadcasting)."""
    w, x, y, z = q.unbind(0)
    inv = (w * w + x * x + y * y + z * z).rsqrt()
    w, x, y, z = w * inv, x * inv, y * inv, z * inv
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = (
        torch.stack([1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy)], 0),
        torch.stack([2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx)], 0),
        torch.stack([2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy)], 0),
    )
    return torch.stack(rows, 0)


def covariance_3d(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Sigma = R(q) diag(s)^2 R(q)^T: scales [P, 3] mm, quaternions [P, 4] -> [P, 3, 3] mm^2."""
    L = quaternion_to_rotation(rotations) * scales[:, None, :]
    return L @ L.transpose(-1, -2)


def precision_3d(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Sigma^-1 = R(q) diag(1/s)^2 R(q)^T: scales [P, 3] mm (> 0), quaternions [P, 4] -> [P, 3, 3] 1/mm^2."""
    L = quaternion_to_rotation(rotations) / scales[:, None, :]
    return L @ L.transpose(-1, -2)


def axis_variances(scales: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Diagonal of Sigma, [P, 3] mm^2: Sigma_dd = sum_k R_dk^2 s_k^2."""
    R = quaternion_to_rotation(rotations)
    return (R * R * (scales * scales)[:, None, :]).sum(-1)


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
def camera_parameters(camera, like: torch.Tensor):
    """(R [3,3], T [3]) of a `Camera` or `PackedCamera` as `like`'s dtype/device, plus (fx, fy, cx, cy)
    floats (pixels)."""
    R = torch.as_tensor(camera.R).to(dtype=like.dtype, device=like.device)
    T = torch.as_tensor(camera.T).to(dtype=like.dtype, device=like.device)
    if isinstance(camera, PackedCamera):
        fx, fy, cx, cy = camera.params[12:16].tolist()
        return R, T, fx, fy, cx, cy
    return R, T, float(camera.fx), float(camera.fy), float(camera.cx), float(camera.cy)


def projection_jacobian(c: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """The local affine map to ray space, J [P, 3, 3], for camera-space centres c [P, 3] mm (METHOD §5)."""
    cx_, cy_, cz = c.unbind(-1)
    n = c.norm(dim=-1)
    zero = torch.zeros_like(cz)
    rows = (
        torch.stack([fx / cz, zero, -fx * cx_ / cz**2], -1),
        torch.stack([zero, fy / cz, -fy * cy_ / cz**2], -1),
        torch.stack([cx_ / n, cy_ / n, cz / n], -1),
    )
    return torch.stack(rows, -2)


def ray_space_covariance(c: torch.Tensor, cov3d: torch.Tensor, R_cam: torch.Tensor, fx: float, fy: float):
    """The literal Sigma' = J R_cam Sigma R_cam^T J^T [P, 3, 3] (pixels and mm); a reference for the tests."""
    JW = projection_jacobian(c, fx, fy) @ R_cam
    return JW @ cov3d @ JW.transpose(-1, -2)


def screen_factor(c: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor, R_cam: torch.Tensor,
                  fx: float, fy: float) -> torch.Tensor:
    """M = J_2 R_cam R(q) diag(s) [P, 2, 3] (pixels), so that Sigma'_2 = M M^T.

    c [P, 3] camera-space centres (mm, c_z > 0), scales [P, 3] mm, quaternions [P, 4].
    Row k of J_2 R_cam is (f_k / c_z) (R_cam[k] - (c_k / c_z) R_cam[2]) for k = x, y.
    """
    m0, m1 = _screen_factor_cm(c.T, scales.T, _rotation_cm(rotations.T), R_cam, fx, fy)
    return torch.stack([m0, m1], 0).permute(2, 0, 1)


def _screen_factor_cm(c, s, Rq, R_cam, fx, fy):
    """Component-major `screen_factor`: c [3, P], s [3, P], Rq [3, 3, P] -> rows (m0, m1) of M, each [3, P]."""
    L = Rq * s[None, :, :]  # R(q) diag(s): L[i, j] = R[i, j] s_j
    inv_z = 1.0 / c[2]
    a0 = (fx * inv_z) * (R_cam[0][:, None] - (c[0] * inv_z)[None, :] * R_cam[2][:, None])  # [3, P]
    a1 = (fy * inv_z) * (R_cam[1][:, None] - (c[1] * inv_z)[None, :] * R_cam[2][:, None])
    return (a0[:, None, :] * L).sum(0), (a1[:, None, :] * L).sum(0)


def screen_covariance(M: torch.Tensor):
    """From M [P, 2, 3]: (s00, s01, s11, det) of Sigma'_2 = M M^T (pixels^2; det by Cauchy-Binet, >= 0)."""
    return _screen_covariance_cm(M[:, 0, :].T, M[:, 1, :].T)


def _screen_covariance_cm(m0, m1):
    """Component-major `screen_covariance`: rows m0, m1 [3, P] -> (s00, s01, s11, det), each [P]."""
    s00 = (m0 * m0).sum(0)
    s01 = (m0 * m1).sum(0)
    s11 = (m1 * m1).sum(0)
    a0, a1, a2 = m0.unbind(0)
    b0, b1, b2 = m1.unbind(0)
    k01, k02, k12 = a0 * b1 - a1 * b0, a0 * b2 - a2 * b0, a1 * b2 - a2 * b1  # the three 2x2 minors
    det = k01 * k01 + k02 * k02 + k12 * k12
    return s00, s01, s11, det


def integration_factor(c: torch.Tensor, scales: torch.Tensor, det2: torch.Tensor, fx: float, fy: float):
    """eta = sqrt(2 pi det Sigma' / det Sigma'_2) [P] in mm, via det Sigma' = (fx fy |c| / c_z^3)^2 (s1 s2 s3)^2.

    c [P, 3] mm, scales [P, 3] mm, det2 [P] pixels^4.
    """
    return _integration_factor_cm(c.T, scales.T, det2, fx, fy)


def _integration_factor_cm(c, s, det2, fx, fy):
    detJ = fx * fy * (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt() / c[2] ** 3
    return _SQRT_2PI * detJ * s.prod(0).abs() / det2.sqrt()


def footprint_range(centre: torch.Tensor, half: torch.Tensor, sizes, coords=None):
    """Index ranges of the sample points inside |x - centre| <= half on each axis, clipped to the axis.

    centre, half [P, D] (detached); sizes: D axis lengths; sample k of axis d sits at coords[d][k] (default:
    at k, i.e. pixel centres).  Returns (first, count) [P, D] long; count = 0 when no sample is inside.  The
    decision for the boundary samples is re-checked with the literal rule so that it agrees bit-for-bit with
    a dense evaluation.
    """
    firsts, counts = [], []
    for d, size in enumerate(sizes):
        f, n = _footprint_axis(centre[:, d].contiguous(), half[:, d].contiguous(), int(size),
                               None if coords is None else coords[d])
        firsts.append(f)
        counts.append(n)
    return torch.stack(firsts, -1), torch.stack(counts, -1)


def _footprint_axis(c: torch.Tensor, h: torch.Tensor, size: int, coords):
    """`footprint_range` along one axis: c, h [P] -> (first, count) [P] long."""
    if coords is None:
        origin, step = 0.0, 1.0
    else:
        origin = float(coords[0])
        step = float(coords[1] - coords[0]) if size > 1 else 1.0
    lo = ((c - h - origin) / step).nan_to_num_(nan=float("inf")).clamp_(-1.0, size + 1.0)
    hi = ((c + h - origin) / step).nan_to_num_(nan=float("-inf")).clamp_(-2.0, size + 1.0)
    first = lo.ceil_().long().clamp_(0, size)
    last = hi.floor_().long().clamp_(-1, size - 1)

    def inside(k):
        kc = k.clamp(0, size - 1)
        x = kc.to(c.dtype) if coords is None else coords[kc]
        return ((x - c).abs() <= h) & (k >= 0) & (k < size)

    # nudge the boundary decisions to the literal rule (rounding of the division above is <= 1 step)
    first = torch.where(inside(first - 1), first - 1, first)
    first = torch.where((first <= last) & ~inside(first), first + 1, first)
    last = torch.where(inside(last + 1), last + 1, last)
    last = torch.where((last >= first) & ~inside(last), last - 1, last)
    return first, (last - first + 1).clamp_(min=0)


def project_gaussians(means: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor, rho: torch.Tensor,
                      camera, means2d: torch.Tensor | None = None) -> Projection:
    """Cull and project Gaussians for one camera (the preprocessing stage shared by the torch rasterisers).

    means [P, 3] mm, scales [P, 3] mm (std devs), rotations [P, 4] (w, x, y, z), rho [P] 1/mm,
    means2d optional [P, 2] pixels added to the projected centres.  Differentiable w.r.t. all of them
    through the returned u, v, conic_*, weight.  Culled Gaussians are evaluated on harmless stand-in values
    and dropped, so that they receive exactly zero gradient (never NaN).  See `Projection`.
    """
    W, H = int(camera.width), int(camera.height)
    R_cam, T, fx, fy, cx, cy = camera_parameters(camera, means)

    # component-major layout ([3, P] etc.): the Gaussian index is the fastest axis
    mx, my, mz = means.T.contiguous().unbind(0)
    c_all = torch.stack([R_cam[k, 0] * mx + R_cam[k, 1] * my + R_cam[k, 2] * mz + T[k] for k in range(3)], 0)
    with torch.no_grad():
        front = torch.isfinite(c_all[0]) & torch.isfinite(c_all[1]) & (c_all[2] >= NEAR_FRACTION * T[2])
    c = torch.where(front[None, :], c_all, T[:, None])  # culled -> stand-in on the axis
    inv_z = 1.0 / c[2]
    u = cx + fx * c[0] * inv_z
    v = cy + fy * c[1] * inv_z
    if means2d is not None:
        u = u + means2d[:, 0]
        v = v + means2d[:, 1]
    s = scales.T
    m0, m1 = _screen_factor_cm(c, s, _rotation_cm(rotations.T), R_cam, fx, fy)
    s00, s01, s11, det2 = _screen_covariance_cm(m0, m1)

    with torch.no_grad():
        uvd = torch.stack([u, v], -1).detach()
        ok = front & (det2 > 0) & torch.isfinite(det2) & torch.isfinite(u) & torch.isfinite(v)
        half = FOOTPRINT_SIGMAS * torch.stack([s00, s11], -1).sqrt()
        first, count = footprint_range(uvd, half, (W, H))
        keep = ok & (count > 0).all(-1)
        index = keep.nonzero().squeeze(1)
        centres = torch.where(front[:, None], uvd, torch.zeros_like(uvd))
        r = half.max(-1).values.ceil().clamp(max=_INT32_MAX)
        radii = torch.where(keep, r, torch.zeros_like(r)).to(torch.int32)

    det_safe = torch.where(ok, det2, torch.ones_like(det2))
    eta = _integration_factor_cm(c, s, det_safe, fx, fy)
    prm = torch.stack([u, v, s11 / det_safe, -s01 / det_safe, s00 / det_safe, rho * eta], 0)[:, index]
    half_k, first_k, count_k = half[index], first[index], count[index]
    return Projection(
        index=index, u=prm[0], v=prm[1], conic_a=prm[2], conic_b=prm[3], conic_c=prm[4], weight=prm[5],
        half_u=half_k[:, 0], half_v=half_k[:, 1],
        x0=first_k[:, 0], y0=first_k[:, 1], nx=count_k[:, 0], ny=count_k[:, 1],
        radii=radii, visible=keep, centres=centres, params=prm,
    )


# ---------------------------------------------------------------------------------------------
# Voxelisation
# ---------------------------------------------------------------------------------------------
class VoxelBoxes(NamedTuple):
    """Per-contributing-Gaussian voxel boxes (output of `voxel_boxes`).

    index [V] long into the inputs; first [V, 3] long first voxel index per axis; count [V, 3] long number of
    voxels per axis inside both the 3-sigma box and the grid (>= 1).
    """

    index: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor


def voxel_boxes(means: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor, axes) -> VoxelBoxes:
    """3-sigma voxel boxes on a grid whose voxel-centre coordinates (mm) per axis are `axes` (3 tensors).

    Gaussians with non-finite parameters or a scale <= 0 are dropped, as are boxes that miss the grid.
    """
    with torch.no_grad():
        var = axis_variances(scales, rotations)
        half = FOOTPRINT_SIGMAS * var.sqrt()
        ok = (scales > 0).all(-1) & torch.isfinite(half).all(-1) & torch.isfinite(means).all(-1)
        ok &= torch.isfinite(rotations).all(-1) & (rotations.norm(dim=-1) > 0)
        first, count = footprint_range(means.detach(), half, [int(a.numel()) for a in axes], axes)
        ok &= (count > 0).all(-1)
        index = ok.nonzero().squeeze(1)
    return VoxelBoxes(index, first[index], count[index])
