"""drgs_core.metrics: Chamfer / HD95, ICP, marching-cubes meshes and iso-levels."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from drgs_core.errors import DRGSInputError
from drgs_core.geometry import VolumeGrid
from drgs_core.metrics import chamfer_hd95, mesh_distances, mesh_from_volume, robust_iso_level


def fibonacci_sphere(n, radius=1.0, semi=None, centre=(0.0, 0.0, 0.0)):
    """n nearly uniform points on a sphere (or an axis-aligned ellipsoid with semi-axes `semi`)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    rho = np.sqrt(1.0 - z * z)
    p = np.stack([rho * np.cos(phi), rho * np.sin(phi), z], -1)
    p = p * (np.asarray(semi) if semi is not None else radius)
    return p + np.asarray(centre)


def test_concentric_spheres_one_mm_apart():
    # ~40k points per sphere: spacing ~0.37 mm, so the nearest sample on the other sphere is at most
    # sqrt(1 + 0.26^2) ~ 1.03 mm away; tolerances 0.05 mm on CD (2 mm) and HD95 (1 mm).
    a = fibonacci_sphere(40000, 20.0, centre=(3.0, -2.0, 5.0))
    b = fibonacci_sphere(40000, 21.0, centre=(3.0, -2.0, 5.0))
    m = chamfer_hd95(a, b)
    assert m["cd"] == pytest.approx(2.0, abs=0.05)
    assert m["hd95"] == pytest.approx(1.0, abs=0.05)
    assert m["a_to_b_mean"] >= 1.0 and m["b_to_a_mean"] >= 1.0
    assert m["cd"] == pytest.approx(m["a_to_b_mean"] + m["b_to_a_mean"])


def test_identical_sets_give_zero():
    a = fibonacci_sphere(2000, 10.0)
    m = chamfer_hd95(a, a.copy())
    assert m["cd"] == 0.0 and m["hd95"] == 0.0
    d_ab, d_ba = mesh_distances(a, a)
    assert d_ab.max() == 0.0 and d_ba.max() == 0.0


def test_hd95_takes_the_larger_direction():
    a = np.zeros((1, 3))
    b = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    m = chamfer_hd95(a, b)                    # A->B: 0; B->A: 0 and 10 -> p95 = 9.5
    assert m["hd95"] == pytest.approx(9.5) and m["cd"] == pytest.approx(5.0)


def tube_points(rng):
    """Points on the surfaces of four tubes in different directions (a small vessel-like tree)."""
    pts = []
    for p0, d, radius, length in [((0, 0, 0), (1, 0, 0), 3.0, 60.0), ((10, 0, 0), (0, 1, 0.3), 2.0, 40.0),
                                  ((-10, 5, 0), (0.2, 0.3, 1), 2.5, 50.0), ((20, -5, 5), (0, -1, 1), 1.5, 30.0)]:
        d = np.asarray(d, float) / np.linalg.norm(d)
        e1 = np.cross(d, [0.3, 0.1, 0.9])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(d, e1)
        s, th = rng.uniform(0, length, 2000), rng.uniform(0, 2 * np.pi, 2000)
        pts.append(np.asarray(p0) + s[:, None] * d + radius * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2))
    return np.concatenate(pts)


def test_icp_recovers_small_rigid_transform():
    # Point-to-point ICP needs shape features: a vessel-like tube set (a smooth ellipsoid lets it stall
    # at a sampling-offset minimum, which is a property of the method, not of this implementation).
    a = tube_points(np.random.default_rng(0))
    rot = Rotation.from_rotvec(np.deg2rad(4.0) * np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8]))
    r_true, t_true = rot.as_matrix(), np.array([1.5, -1.0, 0.8])
    b = a @ r_true.T + t_true
    assert chamfer_hd95(a, b)["cd"] > 1.0                          # misaligned without ICP (the default)
    m = chamfer_hd95(a, b, icp=True)
    assert m["cd"] < 1e-3 and m["hd95"] < 1e-3
    np.testing.assert_allclose(m["icp_rotation"], r_true, atol=1e-4)
    np.testing.assert_allclose(m["icp_translation"], t_true, atol=1e-3)


def test_empty_mesh_raises():
    with pytest.raises(DRGSInputError):
        chamfer_hd95(np.zeros((0, 3)), np.zeros((5, 3)))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.5, 2.0)])
def test_mesh_from_volume_sphere_in_world_mm(spacing):
    grid = VolumeGrid((48, 36, 30), spacing)
    centre, r = np.array([4.0, -3.0, 2.5]), 11.0
    X = grid.voxel_centres().double().numpy()
    dist = np.linalg.norm(X - centre, axis=-1)
    verts, faces = mesh_from_volume(dist, grid, level=r)
    assert verts.shape[1] == 3 and faces.shape[1] == 3 and faces.max() < len(verts)
    radial = np.linalg.norm(verts - centre, axis=-1)
    # Linear interpolation of |x - c| along voxel edges: error ~ h^2 / (8 r) < 0.05 mm here.
    assert np.abs(radial - r).max() < 0.06
    # Least-squares sphere fit |v|^2 = 2 c.v + k recovers the centre in world mm (catches axis/offset errors).
    A = np.concatenate([2 * verts, np.ones((len(verts), 1))], 1)
    sol = np.linalg.lstsq(A, (verts ** 2).sum(1), rcond=None)[0]
    assert np.abs(sol[:3] - centre).max() < 0.02
    # A level outside the range gives an empty surface instead of an exception.
    v2, f2 = mesh_from_volume(dist, grid, level=1e6)
    assert v2.shape == (0, 3) and f2.shape == (0, 3)


def test_robust_iso_level_scale_invariant_and_usable():
    grid = VolumeGrid((40, 40, 40), (1.0, 1.0, 1.0))
    X = grid.voxel_centres().double().numpy()
    rng = np.random.default_rng(0)
    # A blurred tube of value 0.02/mm plus faint haze and noise.
    d = np.hypot(X[..., 0] - 3.0, X[..., 1] + 2.0)
    vol = 0.02 / (1.0 + np.exp((d - 5.0) / 0.7)) + 0.001 * np.exp(-(d / 15.0) ** 2)
    vol = vol + 0.0003 * rng.standard_normal(vol.shape)
    level = robust_iso_level(vol)
    assert 0.004 < level < 0.016                                   # between haze and plateau
    assert robust_iso_level(vol * 250.0) == pytest.approx(250.0 * level, rel=1e-9)
    verts, _ = mesh_from_volume(vol, grid)                         # level=None uses the rule
    r = np.hypot(verts[:, 0] - 3.0, verts[:, 1] + 2.0)
    inner = np.abs(verts[:, 2]) < 15.0
    assert abs(np.median(r[inner]) - 5.0) < 1.0
    with pytest.raises(DRGSInputError):
        robust_iso_level(np.zeros((4, 4, 4)))
