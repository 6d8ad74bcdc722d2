"""Independent references for the render tests (numpy / scipy, float64, written from METHOD.md directly).

Nothing here calls `drgs_core.render`; rotations come from scipy, projections from `ConeBeamGeometry`.
Units: mm, 1/mm, pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from drgs_core.geometry import ConeBeamGeometry


def make_geometry(H=48, W=48, spacing=2.0, angle=0.3, sad=750.0, sid=1200.0) -> ConeBeamGeometry:
    """One-frame C-arm geometry (detector H x W pixels of `spacing` mm, primary angle `angle` rad)."""
    return ConeBeamGeometry(sad, sid, (H, W), (spacing, spacing), np.array([angle]))


def covariances(scales, quats) -> np.ndarray:
    """Sigma_i = R(q) diag(s)^2 R(q)^T [P, 3, 3] with R from scipy (quaternions (w, x, y, z), any norm)."""
    q = np.asarray(quats, float)
    R = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    s2 = np.asarray(scales, float) ** 2
    return np.einsum("pij,pj,pkj->pik", R, s2, R)


def reference_raster(means, scales, quats, rho, geo: ConeBeamGeometry, frame=0, shift=None):
    """Literal METHOD §5 rasterisation, one Gaussian at a time (the full 3x3 Sigma' and its determinants).

    Returns (image [H, W], radii [P] int, visible [P] bool).  shift [P, 2] pixels is added to the centres.
    """
    means = np.asarray(means, float)
    rho = np.asarray(rho, float)
    Sig = covariances(scales, quats)
    Rc = geo.rotations([frame])[0]
    T = geo.translation()
    fx, fy, cx, cy = geo.fx, geo.fy, geo.cx, geo.cy
    H, W = geo.height, geo.width
    yy, xx = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    image = np.zeros((H, W))
    P = means.shape[0]
    radii = np.zeros(P, dtype=np.int64)
    visible = np.zeros(P, dtype=bool)
    for i in range(P):
        c = Rc @ means[i] + T
        if not c[2] >= 0.2 * T[2]:
            continue
        n = np.linalg.norm(c)
        J = np.array([[fx / c[2], 0.0, -fx * c[0] / c[2] ** 2],
                      [0.0, fy / c[2], -fy * c[1] / c[2] ** 2],
                      [c[0] / n, c[1] / n, c[2] / n]])
        S = J @ Rc @ Sig[i] @ Rc.T @ J.T
        S2 = S[:2, :2]
        det2 = np.linalg.det(S2)
        if det2 <= 0:
            continue
        eta = np.sqrt(2 * np.pi * max(np.linalg.det(S), 0.0) / det2)  # det S may round below 0 if singular
        uc = cx + fx * c[0] / c[2]
        vc = cy + fy * c[1] / c[2]
        if shift is not None:
            uc, vc = uc + shift[i][0], vc + shift[i][1]
        hx, hy = 3 * np.sqrt(S2[0, 0]), 3 * np.sqrt(S2[1, 1])
        dx, dy = xx - uc, yy - vc
        inside = (np.abs(dx) <= hx) & (np.abs(dy) <= hy)
        if not inside.any():
            continue
        Ci = np.linalg.inv(S2)
        q = Ci[0, 0] * dx * dx + 2 * Ci[0, 1] * dx * dy + Ci[1, 1] * dy * dy
        image += np.where(inside, rho[i] * eta * np.exp(-0.5 * q), 0.0)
        visible[i] = True
        radii[i] = int(np.ceil(max(hx, hy)))
    return image, radii, visible


def ray_marched_image(mean, cov, rho, geo: ConeBeamGeometry, frame=0, step_fraction=1 / 25, reach=8.0):
    """Line integrals of rho exp(-1/2 (x-mu)^T Sigma^-1 (x-mu)) along every pixel's true cone-beam ray.

    Midpoint rule with step = (smallest std dev) * step_fraction over the ray parameter interval
    t* +- reach * (largest std dev), t* = the ray's closest approach to mu.  Float64 numpy.
    """
    origins, dirs = geo.rays([frame], dtype=torch.float64)
    o = origins[0].numpy()
    d = dirs[0].numpy().reshape(-1, 3)
    mean = np.asarray(mean, float)
    cov = np.asarray(cov, float)
    prec = np.linalg.inv(cov)
    ev = np.linalg.eigvalsh(cov)
    s_min, s_max = np.sqrt(ev.min()), np.sqrt(ev.max())
    h = s_min * step_fraction
    n = int(np.ceil(2 * reach * s_max / h))
    offsets = (np.arange(n) + 0.5) * h - reach * s_max
    out = np.zeros(d.shape[0])
    t_star = d @ (mean - o)
    for a in range(0, d.shape[0], 256):
        dd = d[a:a + 256]
        t = t_star[a:a + 256, None] + offsets[None, :]
        x = o + t[..., None] * dd[:, None, :] - mean  # [r, n, 3]
        q = np.einsum("rni,ij,rnj->rn", x, prec, x)
        out[a:a + 256] = rho * np.exp(-0.5 * q).sum(1) * h
    return out.reshape(geo.height, geo.width)


def ray_line_integral_exact(mean, cov, rho, geo: ConeBeamGeometry, frame=0):
    """Closed-form line integral of the 3D Gaussian along each pixel ray (checks the ray marcher)."""
    origins, dirs = geo.rays([frame], dtype=torch.float64)
    o = origins[0].numpy()
    d = dirs[0].numpy().reshape(-1, 3)
    prec = np.linalg.inv(np.asarray(cov, float))
    e = o - np.asarray(mean, float)
    a = np.einsum("ri,ij,rj->r", d, prec, d)
    b = np.einsum("ri,ij,j->r", d, prec, e)
    c = e @ prec @ e
    val = rho * np.sqrt(2 * np.pi / a) * np.exp(-0.5 * (c - b * b / a))
    return val.reshape(geo.height, geo.width)


def random_quaternions(rng, n):
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, size=(n, 1))


def t64(*arrays, requires_grad=False):
    out = [torch.tensor(np.asarray(a, float), dtype=torch.float64, requires_grad=requires_grad) for a in arrays]
    return out if len(out) > 1 else out[0]
