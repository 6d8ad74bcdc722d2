"""A static, signed background attenuation B and its cone-beam projection (docs/METHOD.md §10.8).

Subtraction leaves time-constant residues in DSA: a mask run misregistered by a rigid motion leaves
bone(x) - bone(Rx + t), a signed 3D structure, and scatter leaves a smooth haze.  The Gaussians are positive and
time-varying; without somewhere else to go, these residues become false vessels.  `StaticBackground` is that
somewhere: one signed attenuation volume on a coarse grid over the reconstruction box, added to every rendering
and never to the vessel volume.

Units and axes: B is [mx, my, mz] = (x, y, z) in 1/mm on `grid` (a `VolumeGrid` over the same box as the
reconstruction grid, voxels about `factor` times larger).  The continuous volume is the one of
`drgs_core.ct.projector`: trilinear between voxel centres, the edge value in the half-voxel shell, zero outside
the box.  Renderings are [H, W] line integrals (dimensionless) on the camera's detector.

The projection is computed on a reduced ray grid (rays about half a coarse voxel apart at the isocentre, at most
`max_rays` per axis, always including the detector's corner pixels) and upsampled bilinearly to the full detector:
the projection of a coarse volume is smooth at that scale, so little is lost and the cost stays small.  Shapes are
fixed and the camera is read from its packed device tensor, so the rendering runs inside a captured CUDA graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import VolumeGrid


def coarse_grid(grid: VolumeGrid, factor: int = 4, max_voxels: int = 64) -> VolumeGrid:
    """The background's grid: the box of `grid` in voxels about `factor` times larger, at most `max_voxels` and at
    least 2 per axis."""
    res = [min(max_voxels, max(2, math.ceil(n / factor))) for n in grid.resolution]
    return VolumeGrid.from_physical(res, grid.physical_size)


class StaticBackground(nn.Module):
    """Signed static attenuation `values` [mx, my, mz] (1/mm, zero at start) and its projection for one detector.

    grid: the reconstruction grid (B covers its box, `coarse_grid`); camera: any training `Camera` (its detector
    size and pixel size at the isocentre set the ray grid; the rays themselves come from the packed camera given
    to `render`).  image_scale: the trainer's image scale (1 / the DSA's robust maximum); B's natural `unit`
    (1/mm) is the attenuation whose chord through the box, times image_scale, is 1.
    """

    def __init__(self, grid: VolumeGrid, camera, image_scale: float = 1.0, factor: int = 4, max_voxels: int = 64,
                 max_rays: int = 128):
        super().__init__()
        self.grid = coarse_grid(grid, factor, max_voxels)
        self.unit = 1.0 / (float(image_scale) * float(max(self.grid.physical_size)))
        self.width, self.height = int(camera.width), int(camera.height)
        self.values = nn.Parameter(torch.zeros(self.grid.resolution))
        # Ray grid: about two rays per coarse voxel at the isocentre (Nyquist for the trilinear volume).
        sad = float(torch.as_tensor(camera.T, dtype=torch.float64).norm())
        pixel_mm = sad / min(float(camera.fx), float(camera.fy))
        stride = max(1.0, 0.5 * self.grid.min_spacing / pixel_mm)
        w = min(self.width, max_rays, max(2, math.ceil((self.width - 1) / stride) + 1))
        h = min(self.height, max_rays, max(2, math.ceil((self.height - 1) / stride) + 1))
        # Ray j sits on full-detector pixel j (W - 1) / (w - 1): bilinear upsampling with align_corners=True
        # puts every coarse sample back on that pixel.
        u = torch.linspace(0.0, self.width - 1.0, w, dtype=torch.float64)
        v = torch.linspace(0.0, self.height - 1.0, h, dtype=torch.float64)
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        self.register_buffer("_u", uu, persistent=False)
        self.register_buffer("_v", vv, persistent=False)
        lo = torch.as_tensor(self.grid.origin, dtype=torch.float64)
        self.register_buffer("_lo", lo, persistent=False)
        self.register_buffer("_hi", lo + torch.as_tensor(self.grid.physical_size), persistent=False)
        # world mm -> grid_sample coordinates (-1/+1 at the first/last voxel centre), in (z, y, x) order
        first = torch.as_tensor(self.grid.first_voxel_centre, dtype=torch.float64)
        span = torch.as_tensor(np.asarray(self.grid.spacing) * (np.asarray(self.grid.resolution) - 1.0))
        self.register_buffer("_scale", (2.0 / span).flip(0), persistent=False)
        self.register_buffer("_offset", (-first * 2.0 / span - 1.0).flip(0), persistent=False)
        # A fixed number of midpoint samples per ray, at most half a coarse voxel apart on the longest chord.
        step = 0.5 * self.grid.min_spacing
        self.n_samples = int(math.ceil(float(np.linalg.norm(self.grid.physical_size)) / step))
        self.register_buffer("_s", torch.arange(self.n_samples, dtype=torch.float32) + 0.5, persistent=False)

    @property
    def ray_grid(self) -> tuple[int, int]:
        """(rows, columns) of the reduced ray grid."""
        return tuple(self._u.shape)

    def render_rays(self, params: torch.Tensor) -> torch.Tensor:
        """Line integrals of B on the reduced ray grid [h, w] for a packed camera params [16] (float64, on B's
        device: R row-major, T mm, fx, fy, cx, cy in full-detector pixels)."""
        R = params[:9].view(3, 3)
        fx, fy, cx, cy = params[12], params[13], params[14], params[15]
        d_cam = torch.stack([(self._u - cx) / fx, (self._v - cy) / fy, torch.ones_like(self._u)], -1)
        d = d_cam @ R                                   # R^T d_cam, [h, w, 3] world mm
        d = d / d.norm(dim=-1, keepdim=True)
        src = -(params[9:12] @ R)                       # -R^T T
        # slab intersection with the box (directions with a zero component never leave their slab)
        safe = torch.where(d == 0, torch.full_like(d, 1e-300), d)
        ta, tb = (self._lo - src) / safe, (self._hi - src) / safe
        t0 = torch.minimum(ta, tb).amax(-1).clamp_min(0.0)
        t1 = torch.maximum(ta, tb).amin(-1)
        h = (t1 - t0).clamp_min(0.0) / self.n_samples   # [h, w] mm per sample (0 for rays missing the box)
        # Per ray in float64, per sample in B's dtype: sample k sits at entry + (k + 1/2) step, in grid_sample
        # coordinates (z, y, x); the [h, w, K, 3] tensor is the step's only large one.
        dtype = self.values.dtype
        entry = ((src + t0[..., None] * d).flip(-1) * self._scale + self._offset).to(dtype)    # [h, w, 3]
        step = (d.flip(-1) * (self._scale * h[..., None])).to(dtype)                           # [h, w, 3]
        g = torch.addcmul(entry[..., None, :], self._s[:, None], step[..., None, :])          # [h, w, K, 3]
        vals = F.grid_sample(self.values[None, None], g[None], mode="bilinear", padding_mode="border",
                             align_corners=True)[0, 0]  # [h, w, K]
        return vals.sum(-1) * h.to(dtype)

    def render(self, params: torch.Tensor) -> torch.Tensor:
        """Line integrals of B on the full detector [H, W] (bilinear upsampling of `render_rays`)."""
        coarse = self.render_rays(params)
        if tuple(coarse.shape) == (self.height, self.width):
            return coarse
        return F.interpolate(coarse[None, None], size=(self.height, self.width), mode="bilinear",
                             align_corners=True)[0, 0]

    def penalty(self) -> torch.Tensor:
        """The L1 sparsity term in the loss's image units: mean |B| / unit, about the mean absolute line integral
        B would add (x image_scale) were it spread evenly over the box.  Only B receives its gradient."""
        return self.values.abs().mean() / self.unit

    @torch.no_grad()
    def summary(self) -> dict:
        """Range of B (1/mm) and its grid, for metrics.json."""
        v = self.values.detach()
        return {"min": float(v.min()), "max": float(v.max()), "mean_abs": float(v.abs().mean()),
                "resolution": list(self.grid.resolution), "spacing_mm": list(self.grid.spacing)}
