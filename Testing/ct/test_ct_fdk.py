"""drgs_core.ct.fdk on an off-centre ball whose projections are exact analytic chords (not our projector)."""

import math

import numpy as np
import pytest
import torch

from drgs_core.ct import fdk, parker_weights, ramp_kernel_response, scan_weights
from drgs_core.errors import DRGSInputError
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid, view_indices

GRID = VolumeGrid((64, 64, 64), (2.0, 2.0, 2.0))                  # 128 mm box
N_FRAMES = 133
ANGLES = np.deg2rad(np.linspace(0.0, 200.0, N_FRAMES))            # short scan, ~ pi + fan
GEO = ConeBeamGeometry(750.0, 1200.0, (128, 128), (2.5, 2.5), ANGLES)
CENTRE = np.array([24.0, -14.0, 9.0])                             # off-centre on every axis: catches flips
RADIUS, MU = 15.0, 0.02


def ball_projections(geo):
    """Exact line integrals MU * chord of the ball for every pixel of every frame of geo."""
    src, dirs = geo.rays(dtype=torch.float64)
    oc = src[:, None, None, :] - torch.as_tensor(CENTRE)
    b = (dirs * oc).sum(-1)
    c = (oc * oc).sum(-1) - RADIUS ** 2
    return (2.0 * MU * torch.sqrt((b * b - c).clamp_min(0.0))).float()


@pytest.fixture(scope="module")
def truth():
    """Partial-volume voxelised ball (4^3 sub-samples per voxel) and voxel-centre distances to its centre."""
    sub = 4
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    X, Y, Z = np.meshgrid(*GRID.axes(), indexing="ij")
    frac = np.zeros(GRID.resolution)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                frac += ((X + 2 * ox - CENTRE[0]) ** 2 + (Y + 2 * oy - CENTRE[1]) ** 2
                         + (Z + 2 * oz - CENTRE[2]) ** 2) <= RADIUS ** 2
    dist = np.sqrt((X - CENTRE[0]) ** 2 + (Y - CENTRE[1]) ** 2 + (Z - CENTRE[2]) ** 2)
    return MU * frac / sub ** 3, dist


@pytest.fixture(scope="module")
def projections():
    return ball_projections(GEO)


def centroid_world(vol):
    """World-mm centroid of the voxels above half the ball's attenuation."""
    m = vol > 0.5 * MU
    idx = np.argwhere(m).mean(0)
    return GRID.index_to_world(idx)


def test_short_scan_ball_all_views(projections, truth):
    vol = fdk(projections, GEO, GRID).numpy()
    true_vol, dist = truth
    assert vol.shape == GRID.resolution and vol.dtype == np.float32
    inside = vol[dist < RADIUS - 3.0]
    assert abs(inside.mean() - MU) < 0.02 * MU                     # level within 2 %
    assert inside.std() < 0.03 * MU
    assert np.abs(vol[dist > RADIUS + 5.0]).max() < 0.15 * MU       # background
    assert np.corrcoef(vol.ravel(), true_vol.ravel())[0, 1] >= 0.95
    assert np.linalg.norm(centroid_world(vol) - CENTRE) < 0.5 * GRID.min_spacing


def test_sparse_subset_of_30_views(projections, truth):
    idx = view_indices(N_FRAMES, 30)
    vol = fdk(projections[idx], GEO.subset(idx), GRID).numpy()
    true_vol, dist = truth
    inside = vol[dist < RADIUS - 3.0]
    assert abs(inside.mean() - MU) < 0.05 * MU
    assert np.corrcoef(vol.ravel(), true_vol.ravel())[0, 1] >= 0.9
    assert np.linalg.norm(centroid_world(vol) - CENTRE) < GRID.min_spacing


def test_full_rotation_and_reversed_order():
    """A 360-degree run given in decreasing-angle order (full-scan weights) reconstructs the same ball."""
    geo = ConeBeamGeometry(750.0, 1200.0, (128, 128), (2.5, 2.5), np.deg2rad(np.arange(357.0, -1.0, -6.0)))
    sw = scan_weights(geo, GRID)
    assert sw.mode == "full" and sw.coverage == pytest.approx(2 * math.pi)
    vol = fdk(ball_projections(geo), geo, GRID, clip=True).numpy()
    X = GRID.voxel_centres().numpy()
    dist = np.linalg.norm(X - CENTRE, axis=-1)
    assert abs(vol[dist < RADIUS - 3.0].mean() - MU) < 0.03 * MU
    assert vol.min() >= 0.0                                           # clip=True
    assert np.linalg.norm(centroid_world(vol) - CENTRE) < 0.5 * GRID.min_spacing


def test_scan_weights_short_scan():
    sw = scan_weights(GEO, GRID)
    step = math.radians(200.0 / (N_FRAMES - 1))
    assert sw.mode == "parker" and sw.factor == 1.0
    assert sw.coverage == pytest.approx(math.radians(200.0) + step)
    assert sw.delta.sum() == pytest.approx(sw.coverage)
    assert np.allclose(sw.delta, step)
    assert math.pi + 2 * sw.half_fan <= sw.coverage
    # A 150-degree arc cannot use Parker weights: plain weights scaled by pi / coverage.
    short = GEO.subset(np.arange(0, 100))
    sw2 = scan_weights(short, GRID)
    assert sw2.mode == "plain" and sw2.factor == pytest.approx(math.pi / sw2.coverage)


def test_parker_weights_complementary():
    big = math.radians(12.0)
    gamma = np.linspace(-0.9 * big, 0.9 * big, 7)
    beta = np.linspace(0.0, math.pi + 2 * big, 41)
    for g in gamma:
        w = parker_weights(beta, np.array([g]), big)[:, 0]
        conj = beta + math.pi + 2 * g
        conj = np.where(conj > math.pi + 2 * big, conj - 2 * math.pi, conj)
        wc = parker_weights(conj, np.array([-g]), big)[:, 0]
        np.testing.assert_allclose(w + wc, 1.0, atol=1e-9)


def test_ramp_response_has_no_dc_and_is_scaled():
    s = 0.8
    r = ramp_kernel_response(1024, s, window=None)
    assert abs(r[0].item()) < 1e-3 / s                              # nearly no DC gain
    f = torch.fft.fftfreq(1024, dtype=torch.float64) / s            # cycles/mm
    mid = (f.abs() > 0.05 / s) & (f.abs() < 0.45 / s)
    np.testing.assert_allclose(r[mid].numpy(), f[mid].abs().numpy(), rtol=0.02)   # |f| in cycles/mm
    hann = ramp_kernel_response(1024, s, window="hann")
    assert abs(hann[512].item()) < 1e-9                              # zero at Nyquist


def test_bad_input():
    with pytest.raises(DRGSInputError):
        fdk(torch.zeros(3, 128, 128), GEO, GRID)
    with pytest.raises(DRGSInputError):
        fdk(torch.zeros(N_FRAMES, 128, 128), GEO, GRID, window="blackman-nuttall")
