"""The static signed background (model.background): its projector against the ray-marching forward projector, its
gradients, what it takes from a synthetic case with a static signed residue, and resume with it on."""

import numpy as np
import pytest
import torch

from drgs_core.ct.projector import forward_project
from drgs_core.geometry import Camera, ConeBeamGeometry, VolumeGrid
from drgs_core.model.background import StaticBackground, coarse_grid

GRID = VolumeGrid((40, 36, 32), (3.0, 3.0, 3.0))


def _blob_pair(grid: VolumeGrid, centre=(12.0, -8.0, 5.0), sep=(30.0, 10.0, 0.0), sigma=9.0, amp=0.02):
    """A positive and a negative Gaussian blob (1/mm) on `grid`'s voxel centres: a signed, smooth structure."""
    x = grid.voxel_centres(dtype=torch.float64)
    c, s = torch.tensor(centre, dtype=torch.float64), torch.tensor(sep, dtype=torch.float64) / 2
    def g(m):
        return torch.exp(-((x - m) ** 2).sum(-1) / (2 * sigma**2))
    return (amp * (g(c + s) - g(c - s))).float()


def _geometry(shape=(50, 60), spacing=(4.0, 4.0)):
    return ConeBeamGeometry(750.0, 1200.0, shape, spacing, np.deg2rad([20.0, 113.0]), np.deg2rad([0.0, 14.0]))


def _ray_geometry(geo: ConeBeamGeometry, bg: StaticBackground) -> ConeBeamGeometry:
    """The geometry whose pixels are exactly the background's reduced ray grid (same rays, fewer pixels)."""
    h, w = bg.ray_grid
    sx, sy = geo.detector_spacing
    return ConeBeamGeometry(geo.sad, geo.sid, (h, w), (sx * (geo.width - 1) / (w - 1), sy * (geo.height - 1) / (h - 1)),
                            geo.primary_angles, geo.secondary_angles)


def test_coarse_grid_covers_the_same_box():
    cg = coarse_grid(VolumeGrid((256, 100, 8), (0.5, 1.0, 2.0)))
    assert cg.resolution == (64, 25, 2)
    assert np.allclose(cg.physical_size, (128.0, 100.0, 16.0))


def test_projection_matches_forward_project_on_the_ray_grid_and_detector():
    geo = _geometry()
    bg = StaticBackground(GRID, geo.camera(0))
    assert bg.ray_grid[0] < geo.height and bg.ray_grid[1] < geo.width   # the reduced grid is in use
    fine = 0.1 * bg.grid.min_spacing   # a converged reference: ours samples every half voxel or finer
    # On its ray grid the projection is exact up to the sampling, even for blobs as small as a coarse voxel.
    sharp = _blob_pair(bg.grid, sigma=0.75 * bg.grid.min_spacing)
    rays = forward_project(sharp.double(), bg.grid, _ray_geometry(geo, bg), step=fine).float()
    # On the detector, bilinear upsampling is close for structures of a few coarse voxels (B's own scale).
    smooth = _blob_pair(bg.grid, sigma=1.5 * bg.grid.min_spacing)
    full = forward_project(smooth.double(), bg.grid, geo, step=fine).float()
    peak_rays, peak = float(rays.abs().max()), float(full.abs().max())   # the structure's scale
    assert peak_rays > 0.3 and peak > 0.3
    for k in range(geo.n_frames):
        params = geo.camera(k).pack().params
        with torch.no_grad():
            bg.values.copy_(sharp)
            ours_rays = bg.render_rays(params)
            bg.values.copy_(smooth)
            ours = bg.render(params)
        assert ours.shape == (geo.height, geo.width)
        assert float((ours_rays - rays[k]).abs().max()) < 0.01 * peak_rays
        # (bilinear interpolation between rays ~2.4 pixels apart flattens the peaks by a few per cent)
        assert float((ours - full[k]).abs().max()) < 0.05 * peak
        assert float((ours - full[k]).abs().mean()) < 0.005 * peak


def test_projection_of_a_moved_camera_is_the_projection_of_the_moved_volume():
    """A camera moved by T' = T + R s sees V(x - s), the volume shifted by +s: compare with forward_project of
    the shifted array (a whole number of coarse voxels, the structure well inside the box)."""
    geo = _geometry()
    cam = geo.camera(1, dtype=torch.float64)
    bg = StaticBackground(VolumeGrid((64, 64, 64), (3.0, 3.0, 3.0)), cam)   # a box large enough to roll in
    vol = _blob_pair(bg.grid, centre=(0.0, 0.0, 0.0), sep=(18.0, 0.0, 6.0), sigma=16.0)
    shift_vox = (2, -1, 1)
    s = torch.tensor(shift_vox, dtype=torch.float64) * torch.tensor(bg.grid.spacing)
    moved = Camera(cam.R, cam.T + cam.R @ s, cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height)
    with torch.no_grad():
        bg.values.copy_(vol)
        ours = bg.render(moved.pack().params)
    shifted = torch.roll(vol, shifts=shift_vox, dims=(0, 1, 2))
    ref = forward_project(shifted.double(), bg.grid, geo, frames=[1], step=0.1 * bg.grid.min_spacing)[0].float()
    assert float((ours - ref).abs().max()) < 0.05 * float(ref.abs().max())
    # and the unmoved camera differs clearly (the test can tell a translation)
    with torch.no_grad():
        still = bg.render(cam.pack().params)
    assert float((still - ref).abs().max()) > 0.2 * float(ref.abs().max())


def test_gradients_reach_the_background_and_the_penalty_only_the_background():
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.render import rasterize

    geo = _geometry((24, 24), (8.0, 8.0))
    cam = geo.camera(0)
    grid = VolumeGrid((16, 16, 16), (6.0, 6.0, 6.0))
    bg = StaticBackground(grid, cam)
    with torch.no_grad():
        bg.values.copy_(_blob_pair(bg.grid, amp=0.01))
    model = GaussianModel(grid, n=5, static=True)
    with torch.no_grad():
        model.means.copy_(torch.randn(5, 3) * 10)
        model.rho_raw.fill_(0.02)
    img = rasterize(model.means, model.scales, model.rotations, model.rho(0.0), cam).image
    img = img + bg.render(cam.pack().params)
    (img - 0.1).abs().mean().backward()
    assert float(bg.values.grad.abs().sum()) > 0 and float(model.rho_raw.grad.abs().sum()) > 0
    model.zero_grad(), bg.zero_grad()
    bg.penalty(2.0).backward()
    assert model.rho_raw.grad is None or float(model.rho_raw.grad.abs().sum()) == 0
    # d/dB of mean|B| x extent x scale = sign(B) x extent x scale / n
    expect = torch.sign(bg.values.detach()) * max(bg.grid.physical_size) * 2.0 / bg.values.numel()
    assert torch.allclose(bg.values.grad, expect)
