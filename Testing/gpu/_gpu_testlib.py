"""Random scenes and comparison helpers for the GPU kernel tests."""

from __future__ import annotations

import math

import numpy as np
import torch

from drgs_core.geometry import ConeBeamGeometry, VolumeGrid


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a = a.detach().double()
    b = b.detach().double()
    nb = float(b.norm())
    nd = float((a - b).norm())
    if nb == 0.0:
        return 0.0 if nd == 0.0 else math.inf
    return nd / nb


def geometry(H=72, W=100, angle=0.7, sad=750.0, sid=1200.0, fov_mm=140.0):
    """A cone-beam geometry whose detector covers about `fov_mm` at the isocentre (sizes not multiples of 16)."""
    mag = sid / sad
    sx = fov_mm * mag / W
    return ConeBeamGeometry(sad, sid, (H, W), (sx, sx), np.array([angle, angle + 1.9]))


def random_quats(P, gen, device):
    q = torch.randn(P, 4, generator=gen, dtype=torch.float64)
    q = q * (0.5 + torch.rand(P, 1, generator=gen, dtype=torch.float64))  # not normalised
    return q.to(device)


def scene(kind: str, P: int, seed: int, device, geo=None):
    """(means, scales, rotations, rho) float32 on `device` for a test scene of the given kind."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    means = torch.randn(P, 3, **f64) * 25.0
    scales = 0.5 + 4.5 * torch.rand(P, 3, **f64)
    rho = 0.01 + 0.1 * torch.rand(P, **f64)
    if kind == "offscreen":
        means = means * 3.0  # many project partly or fully outside the detector
    elif kind == "behind":
        geo = geo or geometry()
        src = torch.as_tensor(geo.source_positions([0])[0])
        # between the source and 0.3 sad from it, and beyond the source (behind it)
        t = torch.rand(P, 1, **f64) * 0.6 - 0.3
        means = src[None, :] * (1.0 - t) + torch.randn(P, 3, **f64) * 20.0
        means[: P // 2] = torch.randn(P // 2, 3, **f64) * 25.0  # half of them in the normal range
    elif kind == "large":
        scales = 20.0 + 180.0 * torch.rand(P, 3, **f64)
    elif kind == "small":
        scales = 1e-3 + 1e-2 * torch.rand(P, 3, **f64)
    elif kind == "flat":
        scales[:, 2] = 1e-3  # needle / disc shaped
        scales[:, 0] *= 4.0
    elif kind != "mixed":
        raise ValueError(kind)
    rots = random_quats(P, gen, "cpu")
    to = dict(device=device, dtype=torch.float32)
    return means.to(**to), scales.to(**to), rots.to(**to), rho.to(**to)


def grid(res=(40, 36, 28), spacing=(1.5, 1.25, 1.0)):
    return VolumeGrid(res, spacing)
