"""Cone-beam forward projection of a voxel volume by ray marching (torch, CPU or GPU).

Units and axes: volumes are [nx, ny, nz] = [x, y, z] arrays of attenuation in 1/mm on a `VolumeGrid`;
rays come from `ConeBeamGeometry.rays` (world mm); the result is a stack [n, H, W] (frame, detector row v,
column u) of dimensionless line integrals.

The continuous volume that is integrated is the trilinear interpolant of the voxel values between voxel
centres, held constant (edge value) in the half-voxel shell between the outermost voxel centres and the box
faces, and zero outside the volume box.  With this definition a constant volume integrates to exactly
mu times the chord through the box.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DRGSInputError
from ..geometry import ConeBeamGeometry, VolumeGrid

log = logging.getLogger(__name__)

__all__ = ["forward_project", "ray_box_intersection"]


def ray_box_intersection(origins: torch.Tensor, directions: torch.Tensor, lo, hi):
    """Slab intersection of rays with an axis-aligned box.

    origins [..., 3] and directions [..., 3] (world mm, any length) broadcast together; lo, hi: the box
    corners (mm, 3 values).  Returns (t_enter, t_exit) [...] in units of the direction's length, with
    t_enter clamped at 0 (rays start at their origin).  A ray misses the box where t_exit <= t_enter.
    """
    lo = torch.as_tensor(np.asarray(lo, dtype=np.float64), dtype=directions.dtype, device=directions.device)
    hi = torch.as_tensor(np.asarray(hi, dtype=np.float64), dtype=directions.dtype, device=directions.device)
    o = origins.to(directions.dtype)
    d = directions
    parallel = d == 0
    safe_d = torch.where(parallel, torch.ones_like(d), d)
    ta = (lo - o) / safe_d
    tb = (hi - o) / safe_d
    t_near = torch.minimum(ta, tb)
    t_far = torch.maximum(ta, tb)
    inside = (o >= lo) & (o <= hi)
    inf = torch.full_like(t_near, math.inf)
    t_near = torch.where(parallel, torch.where(inside, -inf, inf), t_near)
    t_far = torch.where(parallel, torch.where(inside, inf, -inf), t_far)
    t_enter = t_near.amax(-1).clamp_min(0.0)
    t_exit = t_far.amin(-1)
    return t_enter, t_exit


def _index_affine(grid: VolumeGrid, device, dtype):
    """Scale and offset mapping world mm to grid_sample coordinates, ordered (z, y, x) for the last axis.

    grid_sample (align_corners=True) wants -1 at the first and +1 at the last voxel centre along each axis;
    for an axis with one voxel every position maps to 0.
    """
    first = np.asarray(grid.first_voxel_centre, dtype=np.float64)
    sp = np.asarray(grid.spacing, dtype=np.float64)
    n = np.asarray(grid.resolution, dtype=np.float64)
    scale = np.where(n > 1, 2.0 / (sp * np.maximum(n - 1, 1)), 0.0)
    offset = np.where(n > 1, -first * scale - 1.0, 0.0)
    scale = torch.as_tensor(scale[::-1].copy(), dtype=dtype, device=device)
    offset = torch.as_tensor(offset[::-1].copy(), dtype=dtype, device=device)
    return scale, offset


def forward_project(volume, grid: VolumeGrid, geometry: ConeBeamGeometry, frames=None, step=None,
                    chunk: int = 1 << 22) -> torch.Tensor:
    """Line integrals of a voxel volume through every detector pixel (ray marching, midpoint rule).

    volume: [nx, ny, nz] attenuation (1/mm), torch tensor (or numpy array) on any device; gradients flow
        back to it when it requires grad.
    grid: the volume's grid; geometry: the acquisition; frames: frame indices to project (default all).
    step: target sampling step along each ray in mm (default half the smallest voxel spacing).  Each ray's
        segment inside the volume box (slab intersection) is cut into ceil(length / step) equal pieces and
        sampled at their midpoints with trilinear interpolation (see the module docstring for the
        continuous volume this integrates).
    chunk: the largest number of sample points evaluated at once (bounds memory: about 40 bytes each).

    Returns [n, H, W] line integrals (dimensionless) with the volume's dtype and device.
    """
    vol = torch.as_tensor(volume)
    if not vol.is_floating_point():
        vol = vol.float()
    if tuple(vol.shape) != tuple(grid.resolution):
        raise DRGSInputError("the volume does not match its grid", f"shape {tuple(vol.shape)}",
                             f"{tuple(grid.resolution)} (nx, ny, nz)")
    step = 0.5 * grid.min_spacing if step is None else float(step)
    if not step > 0:
        raise DRGSInputError("the ray-marching step is invalid", str(step), "a positive length in mm")
    frames = np.arange(geometry.n_frames) if frames is None else np.asarray(frames, dtype=np.int64).reshape(-1)
    device, dtype = vol.device, vol.dtype
    H, W = geometry.height, geometry.width

    lo, hi = grid.origin, grid.origin + grid.physical_size
    scale, offset = _index_affine(grid, device, dtype)
    diagonal = float(np.linalg.norm(grid.physical_size))
    max_samples = max(1, int(math.ceil(diagonal / step)) + 1)
    rays_per_batch = max(1, int(chunk) // max_samples)
    vol5 = vol[None, None]

    out = []
    for f in frames:
        src, dirs = geometry.rays(frames=[int(f)], dtype=torch.float64)
        src = src[0].to(device)
        dirs = dirs[0].reshape(-1, 3).to(device)
        t0, t1 = ray_box_intersection(src, dirs, lo, hi)
        length = (t1 - t0).clamp_min(0.0)
        image = torch.zeros(H * W, dtype=dtype, device=device)
        hit = torch.nonzero(length > 0).reshape(-1)
        for start in range(0, hit.numel(), rays_per_batch):
            idx = hit[start:start + rays_per_batch]
            L = length[idx]
            n_steps = torch.ceil(L / step).clamp_min(1)
            h = L / n_steps
            k_max = int(n_steps.max().item())
            entry = (src + t0[idx, None] * dirs[idx]).to(dtype)          # [R, 3] world mm
            entry_g = entry.flip(-1) * scale + offset                      # grid_sample coords, (z, y, x)
            d_g = dirs[idx].to(dtype).flip(-1) * scale                     # per mm along the ray
            s = torch.arange(k_max, dtype=dtype, device=device) + 0.5     # [K]
            offs = torch.outer(h.to(dtype), s)                             # [R, K] mm from the entry point
            g = torch.addcmul(entry_g[:, None, :], offs[..., None], d_g[:, None, :])   # [R, K, 3]
            vals = F.grid_sample(vol5, g[None, :, :, None, :], mode="bilinear", padding_mode="border",
                                 align_corners=True)[0, 0, :, :, 0]        # [R, K]
            valid = s[None, :] < n_steps[:, None].to(dtype)
            integral = torch.where(valid, vals, 0.0).sum(1) * h.to(dtype)
            image = image.index_put((idx,), integral)
        out.append(image.reshape(H, W))
    return torch.stack(out, 0)
