"""Rotational acquisition of the phantom: geometry, the mask and fill runs, scatter, noise, misregistration.

Per frame k (time t_k = k / N, primary angle a_k) and per pixel, `subpixel`^2 sub-rays are cast from the
source through positions (u + du, v + dv), du, dv in {(j + 1/2)/n - 1/2}, using
:meth:`ConeBeamGeometry.rays`.  Along each sub-ray: B = ∫ background (ellipsoids, exact), V = ∫ vessels at t_k
(capsules, exact).  Then, for pixel_average = "line_integral":

    fill = I0 exp(-mean(B + V)),  mask = I0 exp(-mean(B')),  clean DSA = mean(V)

and for "intensity": fill = I0 mean(exp(-(B + V))), mask = I0 mean(exp(-B')), clean DSA =
log(mean exp(-B)) - log(mean exp(-B - V)).  B' is B with the patient rigidly moved (misregistration, mask run
only), scatter (fraction x Gaussian-blurred primary of the same run) is added to each run, and Poisson
(+ electronic Gaussian) noise is drawn from a seeded generator.  Runs are photon counts [N, H, W] float32.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from ..geometry import ConeBeamGeometry, VolumeGrid
from .anatomy import background_line_integrals
from .field import VesselField, subpixel_offsets
from .tubes import rotation_matrix_xyz

log = logging.getLogger(__name__)


def cover_points(grid: VolumeGrid, cover: str) -> np.ndarray:
    """World points (mm) whose projections must land on the detector: box corners or the FOV cylinder rim."""
    hx, hy, hz = 0.5 * grid.physical_size
    if cover == "box":
        return np.array([[sx * hx, sy * hy, sz * hz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    rc = min(hx, hy)
    ang = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ring = np.stack([rc * np.cos(ang), rc * np.sin(ang)], 1)
    return np.concatenate([np.concatenate([ring, np.full((ang.size, 1), z)], 1) for z in (-hz, hz)])


def auto_detector_spacing(grid: VolumeGrid, sad: float, sid: float, shape, primary, secondary,
                          cover: str = "fov", margin: float = 0.03) -> tuple[float, float]:
    """Smallest square detector pixel (mm) such that `cover` projects inside the (H, W) detector in every frame."""
    H, W = shape
    probe = ConeBeamGeometry(sad, sid, (H, W), (1.0, 1.0), primary, secondary)
    uv, _ = probe.project(cover_points(grid, cover))  # pixels with 1 mm spacing = mm at the detector
    half_u = np.abs(uv[..., 0] - probe.cx).max()
    half_v = np.abs(uv[..., 1] - probe.cy).max()
    s = (1.0 + margin) * max(2.0 * half_u / W, 2.0 * half_v / H)
    return float(s), float(s)


def make_geometry(config, grid: VolumeGrid) -> ConeBeamGeometry:
    """The C-arm sweep of the configuration: primary angles linspace(start, stop, N) in radians."""
    n = config.n_frames
    primary = np.radians(np.linspace(config.angle_start_deg, config.angle_stop_deg, n))
    secondary = np.full(n, math.radians(config.secondary_angle_deg))
    spacing = config.detector_spacing
    if spacing is None:
        spacing = auto_detector_spacing(grid, config.sad, config.sid, config.detector_shape, primary, secondary,
                                        config.detector_cover, config.detector_margin)
    return ConeBeamGeometry(config.sad, config.sid, config.detector_shape, spacing, primary, secondary)


def subpixel_directions(geometry: ConeBeamGeometry, frame: int, n: int, device) -> torch.Tensor:
    """Unit directions [H, W, n*n, 3] (float64) of the sub-rays of one frame."""
    H, W = geometry.height, geometry.width
    off = subpixel_offsets(n)
    dv, du = np.meshgrid(off, off, indexing="ij")
    v = torch.arange(H, dtype=torch.float64).view(H, 1, 1) + torch.as_tensor(dv.reshape(1, 1, -1))
    u = torch.arange(W, dtype=torch.float64).view(1, W, 1) + torch.as_tensor(du.reshape(1, 1, -1))
    v, u = torch.broadcast_to(v, (H, W, n * n)), torch.broadcast_to(u, (H, W, n * n))
    _, d = geometry.rays(frames=[frame], u=u, v=v, device=device, dtype=torch.float64)
    return d[0]


def patient_motion(config):
    """Rigid misregistration of the mask run: x_world = R x_patient + shift. Returns (R [3,3], shift [3]) numpy."""
    return rotation_matrix_xyz(config.motion_rotation_deg), np.asarray(config.motion_shift_mm, np.float64)


def simulate_runs(config, geometry: ConeBeamGeometry, field: VesselField, ellipsoids, times, on_frame=None):
    """Simulate both runs.  Returns dict of numpy [N, H, W]: fill, mask (float32 counts), dsa (float32, clipped
    log-subtraction of the noisy runs), clean_dsa (float32, noise/scatter/motion-free vessel signal)."""
    device = field.device
    N, H, W = geometry.n_frames, geometry.height, geometry.width
    n_sub = config.subpixel
    I0 = float(config.photons)
    gen = torch.Generator(device="cpu").manual_seed(int(config.effective_noise_seed))
    rot, shift = patient_motion(config)
    rot_t = torch.as_tensor(rot, dtype=torch.float64, device=device)
    shift_t = torch.as_tensor(shift, dtype=torch.float64, device=device)
    fill = np.empty((N, H, W), np.float32)
    mask = np.empty((N, H, W), np.float32)
    clean = np.empty((N, H, W), np.float32)
    for k in range(N):
        if on_frame is not None:
            on_frame(k, N)
        d = subpixel_directions(geometry, k, n_sub, device)
        src = torch.as_tensor(geometry.source_positions([k])[0], dtype=torch.float64, device=device)
        V = field.frame_integrals(geometry, k, float(times[k]), d)
        if config.background and ellipsoids:
            B = background_line_integrals(src, d, ellipsoids)
            if config.has_motion:  # rays in the patient frame of the mask run: x_p = R^T (x - shift)
                B_mask = background_line_integrals((src - shift_t) @ rot_t, d @ rot_t, ellipsoids)
            else:
                B_mask = B
        else:
            B = B_mask = torch.zeros_like(V)
        if config.pixel_average == "line_integral":
            prim_fill = I0 * torch.exp(-(B + V).mean(-1))
            prim_mask = I0 * torch.exp(-B_mask.mean(-1))
            clean[k] = V.mean(-1).cpu().numpy()
        else:
            prim_fill = I0 * torch.exp(-(B + V)).mean(-1)
            prim_mask = I0 * torch.exp(-B_mask).mean(-1)
            c = torch.log(torch.exp(-B).mean(-1)) - torch.log(torch.exp(-(B + V)).mean(-1))
            clean[k] = c.clamp_min(0).cpu().numpy()
        runs = []
        for prim in (prim_fill, prim_mask):
            img = prim.cpu()
            if config.scatter_fraction > 0:
                blur = gaussian_filter(img.numpy(), sigma=config.scatter_sigma * W, mode="nearest")
                img = img + config.scatter_fraction * torch.as_tensor(blur)
            if config.noise:
                img = torch.poisson(img, generator=gen)
                if config.electronic_noise > 0:
                    img = img + config.electronic_noise * torch.randn(img.shape, generator=gen, dtype=img.dtype)
                img = img.clamp_min(1.0)
            runs.append(img.numpy().astype(np.float32))
        fill[k], mask[k] = runs
    with np.errstate(divide="ignore", invalid="ignore"):
        dsa = np.log(mask.astype(np.float64)) - np.log(fill.astype(np.float64))
    dsa = np.clip(np.nan_to_num(dsa, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None).astype(np.float32)
    return {"fill": fill, "mask": mask, "dsa": dsa, "clean_dsa": clean}
