"""The rasteriser against independent numerical line integrals along the true cone-beam rays.

Each image is compared with `ray_marched_image`: the 3D Gaussian rho exp(-1/2 (x-mu)^T Sigma^-1 (x-mu)) is
integrated with a fine midpoint rule along every pixel ray from `ConeBeamGeometry.rays()` (float64).

Measured errors (sad 750 mm, sid 1200 mm; "core" = max |error| over pixels where the true image exceeds 5 %
of its peak, relative to the peak).  The sum error is mostly the 3-sigma footprint truncation (~0.5 %):

    case                                               sum      peak     core
    iso s=2 mm, near the centre (64^2, 1 mm px)        0.59 %   0.00 %   -
    aniso s=(3, 1.2, 2) rotated, near the centre       0.52 %   0.02 %   -
    iso s=3 mm, 60 mm lateral, field edge (96^2, 2.4)  0.50 %   0.00 %   0.04 %
    aniso s=(3, 2, 2.5), 60 mm lateral + 55 mm up      0.31 %   0.03 %   0.15 %
    aniso s=(10, 6, 8), 60 mm lateral + 55 mm up       0.11 %   0.05 %   0.55 %
    large s=(25, 15, 20) rotated, centre               0.81 %   0.07 %   1.10 %
    large s=(25, 15, 20) rotated, 60 mm lateral        0.70 %   0.07 %   1.18 %
    needle s=(40, 3, 3) along the ray, 60 mm lateral   0.64 %   0.59 %   3.28 %
    needle s=(60, 3, 3) along the ray, 60 mm lat+40 up 0.50 %   0.81 %   6.04 %

The local-affine (EWA) approximation is therefore excellent for blobs and degrades only for Gaussians that are
long *along the ray* and off-axis (the ray fan diverges over their length).  The assertions below use bounds
of about 1.5-2x the measured values.
"""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from _render_testlib import covariances, make_geometry, ray_line_integral_exact, ray_marched_image, t64
from drgs_core import render

ANGLE = 0.3
LAT = np.array([-np.sin(ANGLE), np.cos(ANGLE), 0.0])  # camera x axis in world (detector u direction)
DEPTH = np.array([np.cos(ANGLE), np.sin(ANGLE), 0.0])  # towards the source (along the central ray)
UP = np.array([0.0, 0.0, 1.0])


def _errors(geo, mean, scales, quat, rho=0.05):
    cov = covariances([scales], [quat])[0]
    ref = ray_marched_image(mean, cov, rho, geo, step_fraction=1 / 8, reach=7.0)
    m, s, q, r = t64([mean], [scales], [quat], [rho])
    res = render.rasterize(m, s, q, r, geo.camera(0, dtype=torch.float64))
    img = res.image.numpy()
    assert np.isfinite(img).all() and bool(res.visible[0])
    core = ref >= 0.05 * ref.max()
    return (abs(img.sum() / ref.sum() - 1), abs(img.max() / ref.max() - 1),
            np.abs(img - ref)[core].max() / ref.max())


def _quat_along_ray():
    """Quaternion (w, x, y, z) whose local x axis is the central ray direction."""
    x = Rotation.from_matrix(np.stack([DEPTH, LAT, UP], 1)).as_quat()
    return [x[3], x[0], x[1], x[2]]


def test_ray_marcher_matches_closed_form():
    geo = make_geometry(24, 24, 1.0, angle=ANGLE)
    cov = covariances([[3.0, 1.5, 2.0]], [[0.9, 0.3, -0.2, 0.4]])[0]
    a = ray_marched_image([2.0, -1.0, 3.0], cov, 0.1, geo, step_fraction=1 / 8, reach=7.0)
    b = ray_line_integral_exact([2.0, -1.0, 3.0], cov, 0.1, geo)
    assert np.abs(a - b).max() <= 1e-8 * b.max()


@pytest.mark.parametrize("mean,scales,quat", [
    ([2.0, -3.0, 4.0], [2.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0]),
    ([4.0, -3.0, 5.0], [3.0, 1.2, 2.0], [0.9, 0.3, -0.2, 0.4]),
])
def test_central_gaussians_within_two_percent(mean, scales, quat):
    geo = make_geometry(64, 64, 1.0, angle=ANGLE)
    e_sum, e_peak, _ = _errors(geo, mean, scales, quat)
    assert e_sum <= 0.02 and e_peak <= 0.02


@pytest.mark.parametrize("name,mean,scales,quat,bounds", [
    ("iso field edge", 60 * LAT, [3.0, 3.0, 3.0], [1, 0, 0, 0], (0.01, 0.002, 0.002)),
    ("aniso corner", 60 * LAT + 55 * UP, [3.0, 2.0, 2.5], [0.9, 0.3, -0.2, 0.4], (0.01, 0.002, 0.004)),
    ("large off-axis", 60 * LAT, [25.0, 15.0, 20.0], [0.9, 0.3, -0.2, 0.4], (0.015, 0.002, 0.02)),
    ("needle along ray off-axis", 60 * LAT, [40.0, 3.0, 3.0], None, (0.015, 0.012, 0.05)),
])
def test_documented_off_axis_error(name, mean, scales, quat, bounds):
    geo = make_geometry(96, 96, 2.4, angle=ANGLE)
    quat = _quat_along_ray() if quat is None else quat
    errs = _errors(geo, list(mean), scales, quat)
    assert all(e <= b for e, b in zip(errs, bounds)), (name, errs)
