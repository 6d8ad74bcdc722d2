"""The vessel attenuation field mu(x, t): a max-union of capsules, each with its own contrast curve.

Definition (the one every routine here implements exactly):

    mu(x, t) = max { value_c(t) : capsule c contains x }   (0 outside all capsules), in 1/mm,

with value_c(t) = peak_mu * scale * gamma-variate (see :mod:`.flow`).  Overlapping capsules (at joints,
between the sub-capsules of a branch, where branches cross) therefore never double count: a ray's line
integral is the exact integral of the max over the union of its chord intervals
(:func:`.tubes.integrate_max_union`), and point samples (truth volumes, brute-force checks) take the same max.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..geometry import ConeBeamGeometry, VolumeGrid
from .flow import ContrastModel
from .tree import VesselTree
from .tubes import (CapsuleSet, as_f64, box_chunks, box_lattice_pairs, capsule_intervals, integrate_max_union,
                    segment_distance)

log = logging.getLogger(__name__)

_PAIR_CHUNK = 2_000_000


def match_kind(x: torch.Tensor, ref):
    """Return float64 tensor x as numpy (if ref is not a tensor) or as a tensor of ref's float dtype/device."""
    if isinstance(ref, torch.Tensor):
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        return x.to(dtype=dtype, device=ref.device)
    return x.cpu().numpy()


def subpixel_offsets(n: int) -> np.ndarray:
    """Offsets (pixels) of n sub-ray positions per axis, centred on the pixel centre: (j + 1/2)/n - 1/2."""
    return (np.arange(n) + 0.5) / n - 0.5


class VesselField:
    """Capsules of a :class:`VesselTree` with their :class:`ContrastModel` (all geometry float64 torch, mm)."""

    def __init__(self, tree: VesselTree, contrast: ContrastModel, device="cpu"):
        self.tree = tree
        self.contrast = contrast
        self.device = torch.device(device)
        self.caps = CapsuleSet(as_f64(tree.p0, self.device), as_f64(tree.p1, self.device),
                               as_f64(tree.radius, self.device),
                               cell=max(4.0, 2.0 * float(np.max(tree.radius)) if tree.radius.size else 4.0))

    @property
    def n_capsules(self) -> int:
        return self.caps.n

    def _values(self, t, capsules: torch.Tensor) -> torch.Tensor:
        return self.contrast.values(t, capsules.cpu()).to(self.device)

    # ---- rays -----------------------------------------------------------------------------------------
    def _integrate_pairs(self, o, d, ray, cap, t_pair, n_rays: int) -> torch.Tensor:
        """Exact max-union integrals given candidate pairs; o, d [R, 3]; t_pair: scalar or [P] times."""
        hits_r, hits_in, hits_out, hits_v = [], [], [], []
        caps = self.caps
        for i in range(0, ray.numel(), _PAIR_CHUNK):
            r_i, c_i = ray[i:i + _PAIR_CHUNK], cap[i:i + _PAIR_CHUNK]
            s_in, s_out, hit = capsule_intervals(o[r_i], d[r_i], caps.p0[c_i], caps.p1[c_i], caps.radius[c_i])
            if torch.is_tensor(t_pair) and t_pair.dim() > 0:
                t_i = t_pair[i:i + _PAIR_CHUNK][hit.cpu()]
            else:
                t_i = t_pair
            val = self._values(t_i, c_i[hit])
            keep = val > 0
            hits_r.append(r_i[hit][keep])
            hits_in.append(s_in[hit][keep])
            hits_out.append(s_out[hit][keep])
            hits_v.append(val[keep])
        if not hits_r:
            return torch.zeros(n_rays, dtype=torch.float64, device=self.device)
        return integrate_max_union(torch.cat(hits_r), torch.cat(hits_in), torch.cat(hits_out), torch.cat(hits_v),
                                   n_rays)

    def line_integrals(self, origins, directions, t):
        """∫ mu(x, t) ds (dimensionless) along the lines origins + s * directions.

        origins [3] or [..., 3] mm (broadcast against directions); directions [..., 3] (normalised here);
        t: scalar normalised time or an array broadcastable to the ray shape [...].  Returns [...] of the input
        kind (numpy float64, or torch with the directions' float dtype and device).
        """
        d = as_f64(directions, self.device)
        shape = d.shape[:-1]
        d = d.reshape(-1, 3)
        d = d / d.norm(dim=-1, keepdim=True)
        o = torch.broadcast_to(as_f64(origins, self.device), shape + (3,)).reshape(-1, 3)
        tt = as_f64(t, self.device)
        if tt.dim() > 0:
            tt = torch.broadcast_to(tt, shape).reshape(-1)
        ray, cap = self.caps.ray_pairs(o, d)
        t_pair = tt[ray].cpu() if tt.dim() > 0 else tt.cpu()
        out = self._integrate_pairs(o, d, ray, cap, t_pair, o.shape[0]).reshape(shape)
        return match_kind(out, directions)

    def frame_integrals(self, geometry: ConeBeamGeometry, frame: int, t: float, directions: torch.Tensor):
        """Vessel line integrals of all sub-rays of one frame at time t (normalised), exact.

        directions [H, W, S, 3] float64 unit vectors of the frame's S sub-rays per pixel, each passing within half
        a pixel of its pixel centre (see acquisition.subpixel_directions); the origin is the frame's source.
        Culling: a capsule is tested only against the pixels covered by the projection of its bounding box.
        Returns [H, W, S] float64.
        """
        H, W, S = directions.shape[:3]
        vals = self._values(t, torch.arange(self.n_capsules))
        idx = torch.nonzero(vals > 0).reshape(-1)
        out = torch.zeros(H * W * S, dtype=torch.float64, device=self.device)
        if idx.numel() == 0:
            return out.reshape(H, W, S)
        lo, hi = self.caps.lo[idx], self.caps.hi[idx]
        corners = torch.stack([torch.stack([(hi if (m >> k) & 1 else lo)[:, k] for k in range(3)], -1)
                               for m in range(8)], 1)  # [Ca, 8, 3]
        uv, _ = geometry.project(corners, frames=[frame])
        uv = uv[0]
        reach = 0.5  # sub-rays lie within half a pixel of the pixel centre
        umin = torch.ceil(uv[..., 0].min(1).values - reach).long().clamp(0, W - 1)
        umax = torch.floor(uv[..., 0].max(1).values + reach).long().clamp(-1, W - 1)
        vmin = torch.ceil(uv[..., 1].min(1).values - reach).long().clamp(0, H - 1)
        vmax = torch.floor(uv[..., 1].max(1).values + reach).long().clamp(-1, H - 1)
        blo, bhi = torch.stack([vmin, umin], 1), torch.stack([vmax, umax], 1)
        origin = as_f64(geometry.source_positions([frame])[0], self.device).reshape(1, 3)
        d_all = directions.reshape(-1, 3)
        rays, caps = [], []
        for sl in box_chunks(blo, bhi, max(1, _PAIR_CHUNK // S)):
            owner, vu = box_lattice_pairs(blo[sl], bhi[sl])
            pix = vu[:, 0] * W + vu[:, 1]
            sub = torch.arange(S, device=self.device)
            rays.append((pix.unsqueeze(1) * S + sub).reshape(-1))
            caps.append(idx[sl][owner].unsqueeze(1).expand(-1, S).reshape(-1))
        ray, cap = torch.cat(rays), torch.cat(caps)
        o = origin.expand(d_all.shape[0], 3)
        out = self._integrate_pairs(o, d_all, ray, cap, float(t), H * W * S)
        return out.reshape(H, W, S)

    # ---- points -------------------------------------------------------------------------------------------
    def attenuation(self, points, t):
        """mu(x, t) in 1/mm at points [..., 3] (mm); t scalar or broadcastable to [...]. Same kind as points."""
        p = as_f64(points, self.device)
        shape = p.shape[:-1]
        p = p.reshape(-1, 3)
        tt = as_f64(t, self.device)
        if tt.dim() > 0:
            tt = torch.broadcast_to(tt, shape).reshape(-1)
        out = torch.zeros(p.shape[0], dtype=torch.float64, device=self.device)
        step = 1_000_000
        for i in range(0, p.shape[0], step):
            pi = p[i:i + step]
            pidx, cidx = self.caps.point_pairs(pi)
            ins = segment_distance(pi[pidx], self.caps.p0[cidx], self.caps.p1[cidx]) <= self.caps.radius[cidx]
            pidx, cidx = pidx[ins], cidx[ins]
            tp = tt[i + pidx].cpu() if tt.dim() > 0 else tt.cpu()
            val = self._values(tp, cidx)
            seg = torch.zeros(pi.shape[0], dtype=torch.float64, device=self.device)
            seg.scatter_reduce_(0, pidx, val, reduce="amax", include_self=True)
            out[i:i + step] = seg
        return match_kind(out.reshape(shape), points)

    # ---- grids --------------------------------------------------------------------------------------------
    def _lattice(self, grid: VolumeGrid, factor: int):
        """Sub-lattice with `factor` points per voxel axis: point j at origin + (j + 1/2) * spacing / factor."""
        h = torch.as_tensor(np.asarray(grid.spacing) / factor, dtype=torch.float64, device=self.device)
        n = torch.as_tensor(np.asarray(grid.resolution) * factor, dtype=torch.int64, device=self.device)
        origin = torch.as_tensor(grid.origin, dtype=torch.float64, device=self.device)
        return origin, h, n

    def _inside_pairs(self, grid: VolumeGrid, factor: int, capsules: torch.Tensor, pad: float = 0.0,
                      want_distance: bool = False):
        """(lattice linear index, capsule[, signed distance]) for lattice points within `pad` mm of capsules."""
        origin, h, n = self._lattice(grid, factor)
        lo_w, hi_w = self.caps.lo[capsules] - pad, self.caps.hi[capsules] + pad
        lo = torch.ceil((lo_w - origin) / h - 0.5).long().clamp_min(0)
        hi = torch.minimum(torch.floor((hi_w - origin) / h - 0.5).long(), n - 1)
        lins, capl, dists = [], [], []
        for sl in box_chunks(lo, hi, _PAIR_CHUNK):
            owner, j = box_lattice_pairs(lo[sl], hi[sl])
            c = capsules[sl][owner]
            pts = origin + (j.double() + 0.5) * h
            sd = segment_distance(pts, self.caps.p0[c], self.caps.p1[c]) - self.caps.radius[c]
            keep = sd <= pad
            lin = (j[:, 0] * n[1] + j[:, 1]) * n[2] + j[:, 2]
            lins.append(lin[keep])
            capl.append(c[keep])
            dists.append(sd[keep])
        if not lins:
            e = torch.zeros(0, dtype=torch.int64, device=self.device)
            return e, e, torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.cat(lins), torch.cat(capl), torch.cat(dists)

    def grid_mean(self, grid: VolumeGrid, times, factor: int = 2) -> np.ndarray:
        """Voxel averages of mean_t mu(x, t_k): the mean over `times` [T] of mu at factor^3 sub-points per voxel.

        Returns float32 [nx, ny, nz] (1/mm).
        """
        times = np.atleast_1d(np.asarray(times, np.float64))
        allc = torch.arange(self.n_capsules, device=self.device)
        lin, cap, sd = self._inside_pairs(grid, factor, allc)
        inside = sd <= 0
        lin, cap = lin[inside], cap[inside]
        nx, ny, nz = grid.resolution
        vol = torch.zeros(nx * ny * nz, dtype=torch.float64, device=self.device)
        if lin.numel() == 0:
            return vol.reshape(nx, ny, nz).cpu().numpy().astype(np.float32)
        uniq, inv = torch.unique(lin, return_inverse=True)
        acc = torch.zeros(uniq.numel(), dtype=torch.float64, device=self.device)
        tchunk = max(1, int(20_000_000 // max(lin.numel(), 1)))
        for i in range(0, times.size, tchunk):
            tab = self.contrast.table(times[i:i + tchunk]).to(self.device)  # [C, Tc]
            m = torch.zeros(uniq.numel(), tab.shape[1], dtype=torch.float64, device=self.device)
            m.scatter_reduce_(0, inv.unsqueeze(1).expand(-1, tab.shape[1]), tab[cap], reduce="amax",
                              include_self=True)
            acc += m.sum(1)
        acc /= times.size
        _, _, n = self._lattice(grid, factor)
        jz = uniq % n[2]
        jy = (uniq // n[2]) % n[1]
        jx = uniq // (n[1] * n[2])
        vox = ((jx // factor) * ny + (jy // factor)) * nz + (jz // factor)
        vol.index_add_(0, vox, acc / factor ** 3)
        return vol.reshape(nx, ny, nz).cpu().numpy().astype(np.float32)

    def grid_mask(self, grid: VolumeGrid, capsules: torch.Tensor) -> np.ndarray:
        """Bool [nx, ny, nz]: voxel centre inside one of the given capsules."""
        lin, _, sd = self._inside_pairs(grid, 1, capsules)
        mask = torch.zeros(int(np.prod(grid.resolution)), dtype=torch.bool, device=self.device)
        mask[lin[sd <= 0]] = True
        return mask.reshape(grid.resolution).cpu().numpy()

    def grid_sdf(self, grid: VolumeGrid, capsules: torch.Tensor, factor: int, band: float):
        """Signed distance (mm, < 0 inside) to the union of the given capsules on the sub-lattice, clipped to band.

        Returns (sdf float32 [nx*f, ny*f, nz*f], first lattice point [3] mm, lattice spacing [3] mm).
        """
        origin, h, n = self._lattice(grid, factor)
        lin, _, sd = self._inside_pairs(grid, factor, capsules, pad=band)
        field = torch.full((int(n.prod()),), float(band), dtype=torch.float64, device=self.device)
        field.scatter_reduce_(0, lin, sd, reduce="amin", include_self=True)
        sdf = field.reshape(tuple(int(x) for x in n)).to(torch.float32).cpu().numpy()
        return sdf, (origin + 0.5 * h).cpu().numpy(), h.cpu().numpy()


def auto_mesh_factor(grid: VolumeGrid, min_radius: float, max_points_per_axis: int = 320) -> int:
    """Smallest sub-lattice factor whose cell half-diagonal is below 0.8 x the smallest radius (bounded)."""
    step = max(grid.spacing)
    f = 1
    while f < 6 and step / f * math.sqrt(3) / 2 > 0.8 * min_radius \
            and max(grid.resolution) * (f + 1) <= max_points_per_axis:
        f += 1
    return f
