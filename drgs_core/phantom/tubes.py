"""Exact analytic primitives of the phantom: capsules (vessel pieces) and ellipsoids (head anatomy).

Everything here is plain geometry in world millimetres; no phantom semantics.  All routines are torch and
work in float64 (the ray origins sit ~750 mm from the object, so float32 would lose the chord of a 1 mm
vessel to cancellation).  Shapes are stated per function; "pairs" are flat lists of (ray, primitive) or
(point, primitive) combinations produced by the culling helpers below.

A *capsule* is the set of points whose distance to the segment [p0, p1] is at most r (a cylinder with two
hemispherical caps).  It is convex, so a line meets it in one interval; that interval is the union of the
intervals of the finite cylinder and of the two end balls.

An *ellipsoid* is {x : |M (x - c)| <= 1} with M = diag(1/semi_axes) @ Q^T, Q's columns being its axes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BIG = 1.0e30
_DT = torch.float64


def as_f64(x, device=None) -> torch.Tensor:
    """Any array-like -> float64 torch tensor (on `device` when given)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=_DT, device=device if device is not None else x.device)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=_DT, device=device)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product over the last axis (broadcasting); einsum is much faster than (a*b).sum(-1) for size 3."""
    a, b = torch.broadcast_tensors(a, b)
    return torch.einsum("...i,...i->...", a, b)


# ----------------------------------------------------------------------------------------------------------
# chords
# ----------------------------------------------------------------------------------------------------------
def capsule_intervals(o, d, p0, p1, r):
    """Entry/exit ray parameters of rays against capsules (broadcasting over the leading dims).

    o [..., 3] ray origins (mm); d [..., 3] unit directions; p0, p1 [..., 3] segment ends (mm); r [...] radii (mm).
    Returns (s_in, s_out, hit): s in mm along d from o; `hit` is True where the line crosses the capsule with a
    chord > 0, and then the chord is s_out - s_in.  The whole line is used (no s >= 0 clipping).
    """
    mid = 0.5 * (p0 + p1)
    # Re-centre each ray at its closest approach to the capsule centre: keeps every quadratic well scaled.
    s_c = _dot(mid - o, d)
    w = o + s_c.unsqueeze(-1) * d - p0          # ray point relative to p0
    axis = p1 - p0
    length = axis.norm(dim=-1)
    a = axis / length.clamp_min(1e-300).unsqueeze(-1)
    r2 = r * r
    wa, da, wd, ww = _dot(w, a), _dot(d, a), _dot(w, d), _dot(w, w)

    # finite cylinder = infinite cylinder ∩ slab 0 <= (x - p0)·a <= L.  With x_perp = x - (x·a) a:
    # |d_perp|^2 = 1 - da^2, w_perp·d_perp = wd - wa da, |w_perp|^2 = ww - wa^2.
    qa = (1.0 - da * da).clamp_min(0.0)
    qb = wd - wa * da
    qc = ww - wa * wa - r2
    disc = qb * qb - qa * qc
    parallel = qa < 1e-14
    sq = disc.clamp_min(0).sqrt()
    qa_safe = torch.where(parallel, torch.ones_like(qa), qa)
    c_in = torch.where(parallel, torch.full_like(qa, -_BIG), (-qb - sq) / qa_safe)
    c_out = torch.where(parallel, torch.full_like(qa, _BIG), (-qb + sq) / qa_safe)
    c_hit = torch.where(parallel, qc < 0, disc > 0)
    flat = da.abs() < 1e-14
    da_safe = torch.where(flat, torch.ones_like(da), da)
    t0, t1 = -wa / da_safe, (length - wa) / da_safe
    slab_in = torch.where(flat, torch.full_like(da, -_BIG), torch.minimum(t0, t1))
    slab_out = torch.where(flat, torch.full_like(da, _BIG), torch.maximum(t0, t1))
    slab_hit = torch.where(flat, (wa >= 0) & (wa <= length), torch.ones_like(flat))
    cyl_in = torch.maximum(c_in, slab_in)
    cyl_out = torch.minimum(c_out, slab_out)
    cyl_hit = c_hit & slab_hit & (cyl_in < cyl_out) & (length > 0)

    entry = torch.where(cyl_hit, cyl_in, torch.full_like(cyl_in, _BIG))
    exit_ = torch.where(cyl_hit, cyl_out, torch.full_like(cyl_out, -_BIG))
    # end balls: at p0 (offset w) and at p1 (offset w - L a)
    for b, cc in ((wd, ww - r2), (wd - length * da, ww - 2.0 * length * wa + length * length - r2)):
        disc_s = b * b - cc
        hit_s = disc_s > 0
        sq_s = disc_s.clamp_min(0).sqrt()
        entry = torch.where(hit_s, torch.minimum(entry, -b - sq_s), entry)
        exit_ = torch.where(hit_s, torch.maximum(exit_, -b + sq_s), exit_)
    hit = entry < exit_
    return entry + s_c, exit_ + s_c, hit


def ellipsoid_matrix(semi_axes, rotation=None) -> np.ndarray:
    """M = diag(1/semi_axes) @ Q^T (float64 [3, 3]); Q [3, 3] has the ellipsoid's axes as columns (identity if None)."""
    q = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    return np.diag(1.0 / np.asarray(semi_axes, dtype=np.float64)) @ q.T


def ellipsoid_chords(o, d, centre, matrix) -> torch.Tensor:
    """Chord lengths (mm) of lines o + s d (d unit, [..., 3]) through the ellipsoid {|M (x - c)| <= 1}.

    centre [3] mm, matrix M [3, 3] (see :func:`ellipsoid_matrix`).  Returns [...] (0 where missed).
    """
    c = as_f64(centre, o.device)
    m = as_f64(matrix, o.device)
    v = d @ m.T
    qa = _dot(v, v)
    if o.dim() == 1:  # one source for all rays (a frame): the origin terms are shared
        w = m @ (o - c)
        qb = v @ w
        qc = w @ w - 1.0
    else:
        w = (o - c) @ m.T
        qb = _dot(w, v)
        qc = _dot(w, w) - 1.0
    disc = qb * qb - qa * qc
    return 2.0 * disc.clamp_min(0).sqrt() / qa


def inside_ellipsoid(points, centre, matrix) -> torch.Tensor:
    """Boolean [...]: points [..., 3] (mm) inside the ellipsoid."""
    c = as_f64(centre, points.device)
    m = as_f64(matrix, points.device)
    q = (points - c) @ m.T
    return _dot(q, q) <= 1.0


def segment_distance(points, p0, p1) -> torch.Tensor:
    """Distance (mm) from points [..., 3] to segments [p0, p1] ([..., 3], broadcasting)."""
    axis = p1 - p0
    l2 = _dot(axis, axis).clamp_min(1e-300)
    s = (_dot(points - p0, axis) / l2).clamp(0.0, 1.0)
    return (points - p0 - s.unsqueeze(-1) * axis).norm(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# integration of a max-union of intervals along each ray
# ----------------------------------------------------------------------------------------------------------
def integrate_max_union(ray, s_in, s_out, value, n_rays: int, max_elements: int = 20_000_000) -> torch.Tensor:
    """Exact ∫ max_k value_k · 1[s_in_k <= s < s_out_k] ds for every ray.

    ray [P] int64 ray index of each interval; s_in, s_out, value [P] float64 (only real intervals, s_in < s_out).
    Returns [n_rays] float64.  Where intervals of one ray overlap, the largest value counts once (the union
    semantics of the phantom's vessel field).  Cost: O(K^2) per ray with K intervals, padded per bucket of K.
    """
    out = torch.zeros(n_rays, dtype=_DT, device=s_in.device)
    if ray.numel() == 0:
        return out
    order = torch.argsort(ray, stable=True)
    ray, s_in, s_out, value = ray[order], s_in[order], s_out[order], value[order]
    counts = torch.bincount(ray, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    k_of = counts[ray]
    single = k_of == 1
    out.index_add_(0, ray[single], (s_out[single] - s_in[single]) * value[single])
    multi = ~single
    if not bool(multi.any()):
        return out
    pos = torch.arange(ray.numel(), device=ray.device) - starts[ray]
    kpad = 2
    kmax = int(counts.max())
    while kpad // 2 < kmax:
        sel = multi & (k_of > kpad // 2) & (k_of <= kpad)
        if bool(sel.any()):
            rays_b, local = torch.unique(ray[sel], return_inverse=True)
            nb = rays_b.numel()
            a = torch.zeros(nb, kpad, dtype=_DT, device=s_in.device)
            a[local, pos[sel]] = s_in[sel]
            # pad with empty intervals placed at the ray's first entry (never cover anything)
            first = torch.zeros(nb, dtype=_DT, device=s_in.device)
            first[local[pos[sel] == 0]] = s_in[sel][pos[sel] == 0]
            filled = torch.zeros(nb, kpad, dtype=torch.bool, device=s_in.device)
            filled[local, pos[sel]] = True
            a = torch.where(filled, a, first.unsqueeze(1))
            b = a.clone()
            b[local, pos[sel]] = s_out[sel]
            w = torch.zeros(nb, kpad, dtype=_DT, device=s_in.device)
            w[local, pos[sel]] = value[sel]
            rows = max(1, max_elements // (2 * kpad * kpad))
            res = torch.empty(nb, dtype=_DT, device=s_in.device)
            for i in range(0, nb, rows):
                ai, bi, wi = a[i:i + rows], b[i:i + rows], w[i:i + rows]
                e = torch.sort(torch.cat([ai, bi], 1), 1).values
                mids = 0.5 * (e[:, 1:] + e[:, :-1])
                cov = (ai.unsqueeze(1) <= mids.unsqueeze(2)) & (mids.unsqueeze(2) < bi.unsqueeze(1))
                val = torch.where(cov, wi.unsqueeze(1), torch.zeros((), dtype=_DT)).amax(-1)
                res[i:i + rows] = ((e[:, 1:] - e[:, :-1]) * val).sum(-1)
            out[rays_b] += res
        kpad *= 2
    return out


# ----------------------------------------------------------------------------------------------------------
# culling helpers
# ----------------------------------------------------------------------------------------------------------
def box_lattice_pairs(lo: torch.Tensor, hi: torch.Tensor):
    """Enumerate the integer points of boxes.

    lo, hi [B, D] int64 (inclusive corners; empty where hi < lo).  Returns (owner [P] box index, coords [P, D]).
    """
    size = (hi - lo + 1).clamp_min(0)
    n = size.prod(dim=1)
    total = int(n.sum())
    owner = torch.repeat_interleave(torch.arange(lo.shape[0], device=lo.device), n)
    if total == 0:
        return owner, torch.zeros(0, lo.shape[1], dtype=torch.int64, device=lo.device)
    local = torch.arange(total, device=lo.device) - (torch.cumsum(n, 0) - n)[owner]
    coords = torch.empty(total, lo.shape[1], dtype=torch.int64, device=lo.device)
    sz = size[owner]
    for dim in range(lo.shape[1] - 1, -1, -1):
        coords[:, dim] = local % sz[:, dim] + lo[owner, dim]
        local = local // sz[:, dim]
    return owner, coords


def box_chunks(lo: torch.Tensor, hi: torch.Tensor, max_points: int):
    """Split boxes into consecutive groups of at most ~max_points lattice points; yields index slices."""
    n = (hi - lo + 1).clamp_min(0).prod(dim=1)
    csum = torch.cumsum(n, 0).tolist()
    start, base = 0, 0
    for i, c in enumerate(csum):
        if c - base > max_points and i > start:
            yield slice(start, i)
            start, base = i, csum[i - 1]
    if start < len(csum):
        yield slice(start, len(csum))


class CapsuleSet:
    """A fixed set of capsules with culling structures.

    p0, p1 [C, 3] mm, radius [C] mm (float64 torch).  `cell` (mm) is the size of the uniform hash grid used by
    :meth:`point_pairs`.
    """

    def __init__(self, p0, p1, radius, cell: float = 4.0):
        self.p0 = as_f64(p0)
        self.p1 = as_f64(p1)
        self.radius = as_f64(radius)
        self.n = int(self.radius.numel())
        self.lo = torch.minimum(self.p0, self.p1) - self.radius.unsqueeze(1)
        self.hi = torch.maximum(self.p0, self.p1) + self.radius.unsqueeze(1)
        self.centre = 0.5 * (self.p0 + self.p1)
        self.bound = 0.5 * (self.p1 - self.p0).norm(dim=1) + self.radius
        self.cell = float(cell)
        if self.n:
            self._build_cells()

    def _build_cells(self):
        self.grid_lo = self.lo.min(0).values
        ncell = torch.floor((self.hi.max(0).values - self.grid_lo) / self.cell).long() + 1
        self.ncell = ncell
        clo = torch.floor((self.lo - self.grid_lo) / self.cell).long()
        chi = torch.floor((self.hi - self.grid_lo) / self.cell).long()
        owner, coords = box_lattice_pairs(clo, chi)
        lin = (coords[:, 0] * ncell[1] + coords[:, 1]) * ncell[2] + coords[:, 2]
        order = torch.argsort(lin, stable=True)
        self._cell_ids = lin[order]
        self._cell_caps = owner[order]

    def point_pairs(self, points: torch.Tensor):
        """Candidate (point, capsule) pairs for points [P, 3]: every capsule whose AABB shares the point's cell."""
        if self.n == 0 or points.shape[0] == 0:
            e = torch.zeros(0, dtype=torch.int64, device=points.device)
            return e, e
        c = torch.floor((points - self.grid_lo) / self.cell).long()
        ok = ((c >= 0) & (c < self.ncell)).all(1)
        lin = (c[:, 0] * self.ncell[1] + c[:, 1]) * self.ncell[2] + c[:, 2]
        lin = torch.where(ok, lin, torch.full_like(lin, -1))
        first = torch.searchsorted(self._cell_ids, lin, side="left")
        last = torch.searchsorted(self._cell_ids, lin, side="right")
        cnt = torch.where(ok, last - first, torch.zeros_like(first))
        pidx = torch.repeat_interleave(torch.arange(points.shape[0], device=points.device), cnt)
        off = torch.arange(pidx.numel(), device=points.device) - (torch.cumsum(cnt, 0) - cnt)[pidx]
        return pidx, self._cell_caps[first[pidx] + off]

    def ray_pairs(self, o: torch.Tensor, d: torch.Tensor, chunk: int = 4_000_000):
        """Candidate (ray, capsule) pairs for rays o, d [R, 3] (d unit): bounding sphere meets the line."""
        rays, caps = [], []
        step = max(1, chunk // max(self.n, 1))
        for i in range(0, o.shape[0], step):
            oi, di = o[i:i + step], d[i:i + step]
            w = self.centre.unsqueeze(0) - oi.unsqueeze(1)
            proj = torch.einsum("rcj,rj->rc", w, di)
            dist2 = torch.einsum("rcj,rcj->rc", w, w) - proj * proj
            r_idx, c_idx = torch.nonzero(dist2 <= (self.bound * self.bound).unsqueeze(0), as_tuple=True)
            rays.append(r_idx + i)
            caps.append(c_idx)
        if not rays:
            e = torch.zeros(0, dtype=torch.int64, device=o.device)
            return e, e
        return torch.cat(rays), torch.cat(caps)


def rotation_matrix_xyz(angles_deg) -> np.ndarray:
    """Rotation matrix (float64 [3, 3]) R = Rz @ Ry @ Rx for angles (deg) about x, y, z."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
