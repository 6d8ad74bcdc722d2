"""The one geometry: projection follows METHOD §3 literally; rays pass through the points that project to them."""

import math

import numpy as np
import pytest
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid, frame_times, view_indices

ANGLES = [(0.0, 0.0), (0.7, 0.0), (-1.9, 0.0), (2.5, 0.3), (1.2, -0.45)]


def _method_pixel(X, a, b, sad, sid, W, H, sx, sy):
    """METHOD §3 written out independently, one point at a time."""
    R = np.array([[-math.sin(a), math.cos(a), 0.0],
                  [math.sin(b) * math.cos(a), math.sin(b) * math.sin(a), -math.cos(b)],
                  [-math.cos(b) * math.cos(a), -math.cos(b) * math.sin(a), -math.sin(b)]])
    p = R @ np.asarray(X, float) + np.array([0.0, 0.0, sad])
    return (W - 1) / 2 + sid * p[0] / (p[2] * sx), (H - 1) / 2 + sid * p[1] / (p[2] * sy), p[2]


@pytest.fixture
def geo():
    prim = [a for a, _ in ANGLES]
    sec = [b for _, b in ANGLES]
    return ConeBeamGeometry(750.0, 1200.0, (70, 90), (0.6, 0.5), prim, sec)


def test_projection_matches_the_method_formula(geo):
    rng = np.random.default_rng(0)
    X = rng.uniform(-80, 80, size=(20, 3))
    uv, depth = geo.project(X)
    for n, (a, b) in enumerate(ANGLES):
        for i in range(len(X)):
            u, v, z = _method_pixel(X[i], a, b, 750.0, 1200.0, 90, 70, 0.6, 0.5)
            assert uv[n, i, 0] == pytest.approx(u, abs=1e-9)
            assert uv[n, i, 1] == pytest.approx(v, abs=1e-9)
            assert depth[n, i] == pytest.approx(z, abs=1e-9)
    # torch input gives the same numbers
    uv_t, _ = geo.project(torch.as_tensor(X))
    assert np.allclose(uv_t.numpy(), uv, atol=1e-9)


def test_source_position_and_orientation_conventions():
    g = ConeBeamGeometry(750.0, 1200.0, (64, 64), (1.0, 1.0), [0.0, math.pi / 2], [0.0, 0.0])
    assert np.allclose(g.source_positions(), [[750, 0, 0], [0, 750, 0]], atol=1e-9)
    # The isocentre projects to the detector centre; +z (superior) lands on smaller rows (row 0 is superior).
    uv, _ = g.project(np.array([[0.0, 0, 0], [0, 0, 20.0]]))
    assert np.allclose(uv[:, 0], [31.5, 31.5])
    assert np.all(uv[:, 1, 1] < 31.5)
    # Secondary angle b tilts the source out of the z = 0 plane: source = sad (cos b cos a, cos b sin a, sin b).
    g2 = ConeBeamGeometry(750.0, 1200.0, (64, 64), (1.0, 1.0), [0.3], [0.2])
    assert np.allclose(g2.source_positions()[0], 750 * np.array([math.cos(0.2) * math.cos(0.3),
                                                                  math.cos(0.2) * math.sin(0.3), math.sin(0.2)]))


def test_pixel_rays_pass_through_the_points_that_project_to_them(geo):
    rng = np.random.default_rng(1)
    X = rng.uniform(-60, 60, size=(15, 3))
    uv, _ = geo.project(X)
    for n in range(geo.n_frames):
        o, d = geo.rays(frames=[n], u=torch.as_tensor(uv[n, :, 0]), v=torch.as_tensor(uv[n, :, 1]),
                        dtype=torch.float64)
        w = torch.as_tensor(X) - o[0]
        dist = torch.linalg.cross(w, d[0]).norm(dim=-1)  # distance of each point from its ray
        assert float(dist.max()) < 1e-8
        assert torch.allclose(d[0].norm(dim=-1), torch.ones(len(X), dtype=torch.float64))
    # Full-detector rays: the central pixel's ray passes through the isocentre when W, H are odd.
    g = ConeBeamGeometry(750.0, 1200.0, (5, 7), (1.0, 1.0), [0.4], [0.1])
    o, d = g.rays(dtype=torch.float64)
    assert d.shape == (1, 5, 7, 3)
    assert float(torch.linalg.cross(-o[0], d[0, 2, 3]).norm()) < 1e-9


def test_camera_matches_projection(geo):
    cam = geo.camera(3, dtype=torch.float64)
    X = torch.tensor([[10.0, -20.0, 5.0]], dtype=torch.float64)
    c = X @ cam.R.T + cam.T
    u = cam.cx + cam.fx * c[:, 0] / c[:, 2]
    uv, _ = geo.project(X.numpy(), frames=[3])
    assert float(u) == pytest.approx(float(uv[0, 0, 0]), abs=1e-9)
    assert np.allclose(cam.source.numpy(), geo.source_positions([3])[0])


def test_volume_grid_conventions():
    grid = VolumeGrid((4, 6, 8), (1.0, 2.0, 0.5))
    assert np.allclose(grid.origin, [-2, -6, -2])
    assert np.allclose(grid.first_voxel_centre, [-1.5, -5, -1.75])
    centres = grid.voxel_centres(dtype=torch.float64)
    assert centres.shape == (4, 6, 8, 3)
    assert np.allclose(centres[3, 5, 7].numpy(), [1.5, 5, 1.75])
    assert np.allclose(grid.world_to_index(np.array([1.5, 5, 1.75])), [3, 5, 7])
    assert np.allclose(grid.normalise(np.array([2.0, 6.0, 2.0])), [1, 1, 1])


def test_frame_times_and_view_selection():
    assert np.allclose(frame_times(4), [0, 0.25, 0.5, 0.75])
    assert view_indices(133, 30).tolist()[:4] == [0, 4, 8, 13]
    assert len(view_indices(133, 30)) == 30 and view_indices(133, 133).tolist() == list(range(133))
    with pytest.raises(DRGSInputError, match="views"):
        view_indices(10, 11)


@pytest.mark.parametrize("factor", [2, 5])
def test_binned_detector_pixels_sit_at_the_mean_of_the_merged_pixels(geo, factor):
    """A point on binned pixel (u', v') lies at original pixel factor*(u', v') + (factor - 1)/2."""
    X = np.random.default_rng(1).uniform(-60, 60, size=(15, 3))
    uv, depth = geo.project(X)
    binned = geo.binned(factor)
    assert binned.detector_shape == (70 // factor, 90 // factor)
    uv_b, depth_b = binned.project(X)
    assert np.allclose(factor * uv_b + (factor - 1) / 2, uv, atol=1e-9)
    assert np.allclose(depth_b, depth)
    assert geo.binned(1).detector_shape == geo.detector_shape


def test_binning_that_does_not_divide_the_detector_is_refused(geo):
    with pytest.raises(DRGSInputError, match="binning"):
        geo.binned(3)   # 70 x 90: 3 does not divide 70
    with pytest.raises(DRGSInputError, match="binning"):
        geo.binned(0)


def test_auto_binning_merges_down_to_about_the_voxel_size():
    # pixel at the isocentre = 0.6 mm * 750 / 1200 = 0.375 mm
    g = ConeBeamGeometry(750.0, 1200.0, (96, 96), (0.6, 0.6), [0.0])
    assert g.auto_binning(0.3) == 1      # pixels already coarser than the voxels
    assert g.auto_binning(0.75) == 2     # two pixels per voxel
    assert g.auto_binning(1.2) == 3      # 3.2 pixels per voxel, 3 divides 96
    assert g.auto_binning(1.9) == 4      # 5.07 -> 5 does not divide 96 -> 4
    odd = ConeBeamGeometry(750.0, 1200.0, (97, 96), (0.6, 0.6), [0.0])
    assert odd.auto_binning(1.2) == 1    # nothing above 1 divides 97
