"""Voxelisation: direct evaluation of METHOD §4/§7, integral, gradients, and consistency with rasterisation."""

import numpy as np
import pytest
import torch

from _render_testlib import covariances, make_geometry, random_quaternions, t64
from drgs_core import render
from drgs_core.geometry import VolumeGrid
from drgs_core.render import torch_ref


def direct_volume(means, scales, quats, rho, grid):
    """sum_i rho_i exp(-1/2 (x-mu_i)^T Sigma_i^-1 (x-mu_i)) at voxel centres, voxel counted iff
    |x_d - mu_d| <= 3 sqrt(Sigma_dd) on every axis (numpy float64, one Gaussian at a time)."""
    ax = grid.axes()
    X = np.stack(np.meshgrid(*ax, indexing="ij"), -1)
    vol = np.zeros(grid.resolution)
    for m, s, q, r in zip(np.asarray(means, float), np.asarray(scales, float), np.asarray(quats, float), rho):
        if not (s > 0).all():
            continue
        S = covariances([s], [q])[0]
        d = X - m
        e = np.einsum("...i,ij,...j->...", d, np.linalg.inv(S), d)
        inside = (np.abs(d) <= 3 * np.sqrt(np.diag(S))).all(-1)
        vol += np.where(inside, r * np.exp(-0.5 * e), 0.0)
    return vol


def _scene(seed, grid, n=30):
    rng = np.random.default_rng(seed)
    half = grid.physical_size / 2
    means = rng.uniform(-1.2 * half, 1.2 * half, size=(n, 3))
    scales = rng.uniform(0.8, 6.0, size=(n, 3))
    extra_m = [[0, 0, 0], [3.1, -2.2, 1.7], [4.0, 4.0, 4.0], [1.0, 1.0, 1.0], [500.0, 0.0, 0.0]]
    extra_s = [[60, 40, 50], [0.05, 0.04, 0.03], [2.0, 0.0, 3.0], [-1.0, 2.0, 2.0], [5.0, 5.0, 5.0]]
    means = np.concatenate([means, extra_m])
    scales = np.concatenate([scales, extra_s])
    quats = random_quaternions(rng, len(means))
    rho = rng.uniform(0.001, 0.05, size=len(means))
    return means, scales, quats, rho


@pytest.mark.parametrize("seed", [0, 1])
def test_voxelize_matches_direct_sum(seed):
    grid = VolumeGrid((20, 18, 16), (2.0, 2.5, 3.0))
    arrays = _scene(seed, grid)
    vol = render.voxelize(*t64(*arrays), grid)
    ref = direct_volume(*arrays, grid)
    assert vol.shape == (20, 18, 16)
    assert np.allclose(vol.numpy(), ref, rtol=0, atol=1e-12 * ref.max())
    dense = torch_ref.voxelize_dense(*t64(*arrays), grid)
    assert np.allclose(dense.numpy(), ref, rtol=0, atol=1e-12 * ref.max())
    small = render.voxelize(*t64(*arrays), grid, chunk=37)  # many chunks
    assert torch.allclose(small, vol, rtol=1e-12, atol=1e-15)


def test_voxelize_float32_and_gradients_match_dense():
    grid = VolumeGrid((14, 12, 10), (2.0, 2.5, 3.0))
    arrays = _scene(4, grid, n=12)
    w = torch.rand(grid.resolution, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for fn in (render.voxelize, torch_ref.voxelize_dense):
        ts = t64(*arrays, requires_grad=True)
        (fn(*ts, grid) * w).sum().backward()
        grads.append([t.grad for t in ts])
    for x, y in zip(*grads):
        assert torch.isfinite(x).all()
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-10 * y.abs().max().item())
    v32 = render.voxelize(*(torch.tensor(a, dtype=torch.float32) for a in arrays), grid)
    ref = direct_volume(*arrays, grid)
    assert np.allclose(v32.numpy(), ref, rtol=0, atol=1e-5 * ref.max())


def test_integral_of_a_gaussian_inside_the_grid():
    grid = VolumeGrid((48, 48, 48), (1.0, 1.0, 1.0))
    s = np.array([4.0, 3.0, 5.0])
    rho = 0.2
    vol = render.voxelize(*t64([[1.3, -0.7, 2.1]], [s], [[0.8, 0.3, -0.4, 0.2]], [rho]), grid)
    integral = vol.sum().item() * np.prod(grid.spacing)
    expected = rho * (2 * np.pi) ** 1.5 * np.prod(s)  # rho (2 pi)^(3/2) det(Sigma)^(1/2)
    assert abs(integral / expected - 1) <= 0.01


def test_voxelize_gradcheck():
    grid = VolumeGrid((8, 7, 6), (2.0, 2.0, 2.5))
    means = [[0.9, -1.3, 0.4], [-2.6, 2.2, -1.1]]
    scales = [[2.7, 3.9, 2.3], [3.4, 2.1, 4.6]]
    quats = [[0.9, 0.2, -0.3, 0.1], [0.5, -0.4, 0.6, 0.3]]
    inputs = t64(means, scales, quats, [0.04, 0.07], requires_grad=True)
    # no voxel centre on a box face (the box rule is discontinuous there)
    var = render.common.axis_variances(inputs[1], inputs[2]).detach()
    for d, ax in enumerate(grid.axes()):
        gap = np.abs(np.abs(ax[None, :] - np.asarray(means)[:, d:d + 1]) - 3 * np.sqrt(var[:, d:d + 1].numpy()))
        assert gap.min() > 1e-3
    assert torch.autograd.gradcheck(lambda m, s, q, r: render.voxelize(m, s, q, r, grid), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def _project(volume, grid, geo):
    try:
        from drgs_core.ct import forward_project
    except ImportError:  # pragma: no cover - fallback when the CT module is absent
        forward_project = None
    if forward_project is not None:
        return forward_project(volume, grid, geo, step=0.25)[0]
    # simple ray march with trilinear sampling (grid_sample, align_corners=True on voxel centres)
    origins, dirs = geo.rays([0], dtype=torch.float64)
    L = np.linalg.norm(geo.source_positions([0])[0])
    t = torch.arange(L - 80, L + 80, 0.25, dtype=torch.float64)
    pts = origins[0] + t[:, None, None, None] * dirs[0][None]  # [n, H, W, 3]
    ext = torch.tensor(grid.first_voxel_centre), torch.tensor(grid.physical_size - np.asarray(grid.spacing))
    g = (2 * (pts - ext[0]) / ext[1] - 1).flip(-1)
    vals = torch.nn.functional.grid_sample(volume[None, None], g[None], align_corners=True, padding_mode="zeros")
    return vals[0, 0].sum(0) * 0.25


def test_voxelised_volume_projects_to_the_rasterised_image():
    """A large-ish Gaussian: ray-marched line integrals of its voxelisation == the rasteriser (a few %)."""
    grid = VolumeGrid((64, 64, 64), (1.5, 1.5, 1.5))
    geo = make_geometry(40, 40, 3.0, angle=0.7)
    args = t64([[3.0, -4.0, 2.0]], [[12.0, 7.0, 9.0]], [[0.8, 0.3, -0.4, 0.2]], [0.02])
    vol = render.voxelize(*args, grid)
    proj = _project(vol, grid, geo).numpy()
    img = render.rasterize(*args, geo.camera(0, dtype=torch.float64)).image.numpy()
    # measured: sum -0.25 %, peak -0.45 %, core max 0.65 % of the peak
    assert abs(proj.sum() / img.sum() - 1) <= 0.015
    assert abs(proj.max() / img.max() - 1) <= 0.015
    core = img >= 0.05 * img.max()
    assert np.abs(proj - img)[core].max() <= 0.02 * img.max()
