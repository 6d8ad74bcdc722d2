"""Feldkamp (FDK) cone-beam reconstruction for circular or short-scan, possibly sparse, C-arm runs.

Units and axes: projections [n, H, W] (frame, detector row v, column u) are dimensionless line integrals;
the result is an attenuation volume [nx, ny, nz] = [x, y, z] in 1/mm on a `VolumeGrid`.  Angles are in
radians.  Everything geometric (rays, projection of voxel centres) comes from `ConeBeamGeometry`.

The reconstruction is

    f(x) = c * sum_k  dbeta_k * (sad / depth_k(x))^2 * q_k(u_k(x), v_k(x))
    q_k  = ramp_filter_u( w_k(u) * cos_k(u, v) * g_k(u, v) )

with g_k the measured projection, cos_k the cosine of the angle between a pixel's ray and the central ray
(Feldkamp weight), the ramp filter applied along detector rows in units of the detector spacing projected to
the isocentre (sx * sad / sid), depth_k(x) the camera-space depth of x (mm along the view axis), and
(u_k(x), v_k(x)) its projection, both from `ConeBeamGeometry.project` (so any per-frame geometry, secondary
angles included, is backprojected with its true projection; the filtering itself assumes a planar circular
orbit and is approximate for other orbits).  dbeta_k is the angular interval of view k (half the distance
to its neighbours in source azimuth), and the redundancy weights w_k and factor c depend on the angular
coverage (see `scan_weights`):

- full scan (coverage >= 2 pi): w = 1, c = pi / coverage (= 1/2 for one turn);
- short scan with pi + 2 delta <= coverage < 2 pi (delta: half fan angle needed for the volume): Parker
  weights generalised to over-scans (Wesarg et al. 2002), c = 1;
- anything shorter: w = 1, c = pi / coverage (a constant object keeps its level; limited-angle artefacts
  remain).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DRGSInputError
from ..geometry import ConeBeamGeometry, VolumeGrid

log = logging.getLogger(__name__)

__all__ = ["fdk", "ramp_filter", "ramp_kernel_response", "scan_weights", "ScanWeights", "WINDOWS"]

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


# ------------------------------------------------------------------------------------------------------
# ramp filter
# ------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def ramp_kernel_response(n_pad: int, spacing: float, window: str | None = "hann", dtype=torch.float64,
                         device=None) -> torch.Tensor:
    """Frequency response [n_pad] of the band-limited ramp filter for samples `spacing` mm apart.

    The ramp is discretised in the spatial domain (h[0] = 1/(4 s^2), h[n] = -1/(pi n s)^2 for odd n, 0 for
    even n; s = spacing), wrapped circularly to n_pad samples and Fourier transformed, which keeps the DC
    gain at (nearly) zero; the response includes the factor s of the convolution sum, so filtering a row
    of values in 1 gives values in 1/mm.  window multiplies the response as a function of the normalised
    frequency f in cycles/sample (|f| <= 1/2): "ram-lak"/None: 1, "shepp-logan": sinc(f), "cosine":
    cos(pi f), "hamming": 0.54 + 0.46 cos(2 pi f), "hann": 0.5 (1 + cos(2 pi f)).
    """
    n = torch.arange(n_pad, dtype=torch.float64)
    n = torch.where(n < n_pad // 2 + 1, n, n - n_pad)   # signed offsets, circular
    h = torch.zeros(n_pad, dtype=torch.float64)
    h[0] = 0.25
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * n[odd]) ** 2
    h = h / spacing  # (1/s^2) * s: kernel times the sample spacing of the convolution sum
    resp = torch.fft.fft(h).real
    f = torch.fft.fftfreq(n_pad, dtype=torch.float64)
    name = "ram-lak" if window is None else str(window).lower()
    if name in ("ram-lak", "ramlak", "ramp", "none"):
        win = torch.ones_like(f)
    elif name == "shepp-logan":
        win = torch.sinc(f)
    elif name == "cosine":
        win = torch.cos(math.pi * f)
    elif name == "hamming":
        win = 0.54 + 0.46 * torch.cos(2 * math.pi * f)
    elif name in ("hann", "hanning"):
        win = 0.5 * (1.0 + torch.cos(2 * math.pi * f))
    else:
        raise DRGSInputError("unknown FDK filter window", str(window), "one of " + ", ".join(WINDOWS))
    return (resp * win).to(dtype=dtype, device=device)


def ramp_filter(rows: torch.Tensor, spacing: float, window: str | None = "hann") -> torch.Tensor:
    """Ramp-filter along the last axis (detector column u) of [..., W] values sampled `spacing` mm apart.

    Rows are zero-padded to a power of two >= 2W to avoid circular wrap-around.  Returns [..., W] in the
    input's dtype, in (input units)/mm.
    """
    W = rows.shape[-1]
    n_pad = _next_pow2(2 * W)
    resp = ramp_kernel_response(n_pad, spacing, window, dtype=rows.dtype, device=rows.device)
    spec = torch.fft.rfft(rows, n=n_pad, dim=-1)
    out = torch.fft.irfft(spec * resp[: n_pad // 2 + 1], n=n_pad, dim=-1)
    return out[..., :W]


# ------------------------------------------------------------------------------------------------------
# angular weights
# ------------------------------------------------------------------------------------------------------
@dataclass
class ScanWeights:
    """Angular bookkeeping of a set of views (all angles in radians).

    delta: [n] angular interval of each view; beta: [n] source azimuth relative to the start of the scanned
    arc (increasing counter-clockwise about +z); coverage: the scanned arc (sum of delta); half_fan: the half
    fan angle the volume needs; mode: "full", "parker" or "plain"; factor: the constant c of the module
    docstring; parker_delta: (coverage - pi)/2, the half over-scan used by the Parker weights.
    """

    delta: np.ndarray
    beta: np.ndarray
    coverage: float
    half_fan: float
    mode: str
    factor: float
    parker_delta: float


def _fan_angles(geometry: ConeBeamGeometry, frame: int, u: np.ndarray) -> np.ndarray:
    """Signed fan angle (radians, counter-clockwise about +z) of rays through columns u of the central row.

    Measured in the xy plane between the ray through (u, cy) and the central ray through (cx, cy).
    """
    uu = torch.as_tensor(np.concatenate([[geometry.cx], np.asarray(u, dtype=np.float64).reshape(-1)]))
    vv = torch.full_like(uu, geometry.cy)
    _, d = geometry.rays(frames=[frame], u=uu, v=vv, dtype=torch.float64)
    d = d[0].numpy()
    c, r = d[0, :2], d[1:, :2]
    cross = c[0] * r[:, 1] - c[1] * r[:, 0]
    dot = r @ c
    return np.arctan2(cross, dot)


def _required_half_fan(geometry: ConeBeamGeometry, grid: VolumeGrid | None) -> float:
    """Half fan angle (radians) covering the volume box as seen by the detector, over all views.

    The smaller of the detector's half fan and the box corners' largest fan angle.
    """
    det = 0.0
    vol = 0.0
    edges = np.array([-0.5, geometry.width - 0.5])
    corners = None
    if grid is not None:
        lo, hi = grid.origin, grid.origin + grid.physical_size
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    for k in range(geometry.n_frames):
        det = max(det, float(np.abs(_fan_angles(geometry, k, edges)).max()))
        if corners is not None:
            uv, _ = geometry.project(corners, frames=[k])
            vol = max(vol, float(np.abs(_fan_angles(geometry, k, uv[0, :, 0])).max()))
    return min(det, vol) if grid is not None else det


def scan_weights(geometry: ConeBeamGeometry, grid: VolumeGrid | None = None, parker: bool | None = None
                 ) -> ScanWeights:
    """Angular interval, arc position and redundancy mode of each view (see the module docstring).

    Views may come in any order and any spacing.  Source azimuths (from `geometry.source_positions`) are
    put on the arc that starts after the largest gap between views; a view's interval is half the distance
    to its two neighbours, the end views of an arc count their single neighbour gap in full.
    parker: None chooses automatically; True forces Parker weights for any arc between pi and 2 pi (fan
    angles beyond the over-scan are clamped, an approximation); False never uses them.
    """
    n = geometry.n_frames
    src = geometry.source_positions()
    phi = np.arctan2(src[:, 1], src[:, 0])
    half_fan = _required_half_fan(geometry, grid)
    if n == 1:
        return ScanWeights(np.array([math.pi]), np.array([0.0]), math.pi, half_fan, "plain", 1.0, 0.0)
    order = np.argsort(phi, kind="stable")
    p = phi[order]
    gaps = np.diff(np.concatenate([p, [p[0] + 2 * math.pi]]))   # gap after each sorted view, circular
    g = int(np.argmax(gaps))
    # Start the arc at the view after the largest gap.
    rot = np.roll(np.arange(n), -(g + 1))
    order = order[rot]
    p = np.unwrap(phi[order])
    p = p - p[0]
    gaps = np.diff(p)
    span = float(p[-1])
    coverage = span + 0.5 * (gaps[0] + gaps[-1])
    if not coverage > 1e-9:
        # Every view at the same azimuth: no angular integral to approximate; share pi among them.
        return ScanWeights(np.full(n, math.pi / n), np.zeros(n), math.pi, half_fan, "plain", 1.0, 0.0)
    delta = np.empty(n)
    if coverage >= 2 * math.pi * (1 - 1e-6):
        circ = np.concatenate([gaps, [2 * math.pi - span]])
        delta_sorted = 0.5 * (circ + np.roll(circ, 1))
        coverage = float(delta_sorted.sum())
        mode = "full"
    else:
        delta_sorted = np.empty(n)
        delta_sorted[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
        delta_sorted[0] = gaps[0]
        delta_sorted[-1] = gaps[-1]
        coverage = float(delta_sorted.sum())
        if parker is None:
            use = coverage >= math.pi + 2 * half_fan
        else:
            use = bool(parker) and coverage > math.pi
        mode = "parker" if use else "plain"
    delta[order] = delta_sorted
    beta = np.empty(n)
    beta[order] = p + 0.5 * delta_sorted[0]
    if mode == "parker":
        return ScanWeights(delta, beta, coverage, half_fan, mode, 1.0, 0.5 * (coverage - math.pi))
    return ScanWeights(delta, beta, coverage, half_fan, mode, math.pi / coverage, 0.0)


def parker_weights(beta: np.ndarray, gamma: np.ndarray, big_delta: float) -> np.ndarray:
    """Generalised Parker weights w(beta, gamma) for a scan over [0, pi + 2 big_delta] (radians).

    beta [n] (arc position), gamma [..., m] fan angles (counter-clockwise); returns [n, m].  Satisfies
    w(b, g) + w(b + pi + 2g, -g) = 1 for |g| < big_delta; larger |gamma| are clamped.
    """
    b = np.asarray(beta, dtype=np.float64)[:, None]
    lim = 0.999 * big_delta
    gm = np.clip(np.asarray(gamma, dtype=np.float64), -lim, lim)
    gm = np.broadcast_to(gm, (b.shape[0], gm.shape[-1]))
    w = np.ones_like(gm)
    r1 = b < 2 * (big_delta - gm)
    w = np.where(r1, np.sin(0.25 * math.pi * b / np.maximum(big_delta - gm, 1e-12)) ** 2, w)
    r3 = b > math.pi - 2 * gm
    w3 = np.sin(0.25 * math.pi * (math.pi + 2 * big_delta - b) / np.maximum(big_delta + gm, 1e-12)) ** 2
    w = np.where(r3, w3, w)
    w = np.where((b < 0) | (b > math.pi + 2 * big_delta), 0.0, w)
    return w


# ------------------------------------------------------------------------------------------------------
# FDK
# ------------------------------------------------------------------------------------------------------
def _cosine_weights(geometry: ConeBeamGeometry) -> torch.Tensor:
    """[H, W] cosine of the angle between each pixel's ray and the central ray (frame 0's intrinsics)."""
    _, d = geometry.rays(frames=[0], dtype=torch.float64)
    uu = torch.tensor([geometry.cx], dtype=torch.float64)
    vv = torch.tensor([geometry.cy], dtype=torch.float64)
    _, c = geometry.rays(frames=[0], u=uu, v=vv, dtype=torch.float64)
    return (d[0] * c[0, 0]).sum(-1)


def filter_projections(projections: torch.Tensor, geometry: ConeBeamGeometry, grid: VolumeGrid | None = None,
                       window: str | None = "hann", parker: bool | None = None) -> torch.Tensor:
    """Weighted and ramp-filtered projections [n, H, W] (1/mm) ready for backprojection.

    Includes the cosine weight, the redundancy (Parker) weight, the angular interval and the constant c
    of the module docstring.
    """
    sw = scan_weights(geometry, grid, parker)
    log.debug("FDK: %d views, coverage %.1f deg, half fan %.1f deg, mode %s", geometry.n_frames,
              math.degrees(sw.coverage), math.degrees(sw.half_fan), sw.mode)
    dtype, device = projections.dtype, projections.device
    pre = _cosine_weights(geometry).to(dtype=dtype, device=device)[None]           # [1, H, W]
    per_view = torch.as_tensor(sw.delta * sw.factor, dtype=dtype, device=device)[:, None, None]
    weighted = projections * pre * per_view
    if sw.mode == "parker":
        cols = np.arange(geometry.width, dtype=np.float64)
        gamma = np.stack([_fan_angles(geometry, k, cols) for k in range(geometry.n_frames)])    # [n, W]
        w = np.stack([parker_weights(sw.beta[k:k + 1], gamma[k], sw.parker_delta)[0]
                      for k in range(geometry.n_frames)])
        weighted = weighted * torch.as_tensor(w, dtype=dtype, device=device)[:, None, :]
    iso_spacing = geometry.detector_spacing[0] * geometry.sad / geometry.sid
    return ramp_filter(weighted, iso_spacing, window)


def backproject(filtered: torch.Tensor, geometry: ConeBeamGeometry, grid: VolumeGrid, chunk: int = 1 << 22,
                ) -> torch.Tensor:
    """Voxel-driven cone-beam backprojection: sum_k (sad / depth_k)^2 * q_k(u_k(x), v_k(x)).

    filtered [n, H, W]; bilinear interpolation in each projection, zero outside the detector.  chunk: the
    largest number of (voxel, view) pairs handled at once.  Returns [nx, ny, nz] with filtered's dtype.
    """
    n, H, W = filtered.shape
    nx, ny, nz = grid.resolution
    dtype, device = filtered.dtype, filtered.device
    axes = [torch.as_tensor(a, dtype=dtype, device=device) for a in grid.axes()]
    out = torch.zeros(grid.resolution, dtype=dtype, device=device)
    plane = ny * nz
    su = 2.0 / max(W - 1, 1)
    sv = 2.0 / max(H - 1, 1)
    sad2 = geometry.sad ** 2
    # Choose a slab of x planes and a batch of views so that slab_voxels * views <= chunk.
    views = max(1, min(n, int(chunk) // max(plane, 1)))
    slab = max(1, min(nx, int(chunk) // (plane * views)))
    img = filtered[:, None]                                                    # [n, 1, H, W]
    for i0 in range(0, nx, slab):
        i1 = min(nx, i0 + slab)
        pts = torch.stack(torch.meshgrid(axes[0][i0:i1], axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3)
        acc = torch.zeros(pts.shape[0], dtype=dtype, device=device)
        for k0 in range(0, n, views):
            k1 = min(n, k0 + views)
            uv, depth = geometry.project(pts, frames=np.arange(k0, k1))      # [b, P, 2], [b, P]
            g = torch.stack([uv[..., 0] * su - 1.0, uv[..., 1] * sv - 1.0], -1)
            samp = F.grid_sample(img[k0:k1], g[:, None], mode="bilinear", padding_mode="zeros",
                                 align_corners=True)[:, 0, 0]                 # [b, P]
            wgt = sad2 / (depth * depth)
            wgt = torch.where(depth > 0, wgt, torch.zeros_like(wgt))
            acc += (samp * wgt).sum(0)
        out[i0:i1] = acc.reshape(i1 - i0, ny, nz)
    return out


def fdk(projections, geometry: ConeBeamGeometry, grid: VolumeGrid, window: str | None = "hann",
        clip: bool = False, parker: bool | None = None, chunk: int = 1 << 22, device=None,
        dtype=torch.float32) -> torch.Tensor:
    """FDK reconstruction of an attenuation volume (1/mm) from cone-beam line integrals.

    projections: [n, H, W] dimensionless line integrals (torch or numpy), one per frame of `geometry`
        (pass `geometry.subset(frames)` for a subset of views).
    geometry: the views' geometry; grid: the output grid.
    window: apodisation of the ramp filter ("hann" default; see `ramp_kernel_response`).
    clip: if True, negative values of the result are set to 0 (METHOD §6 initialisation clips at 0);
        default False keeps the signed FDK result.
    parker: short-scan redundancy weighting, None = automatic (see `scan_weights`).
    chunk: the largest number of (voxel, view) pairs processed at once (bounds memory, ~30 bytes each).
    device, dtype: where and in what precision to compute (default: the projections' device, float32).

    Returns a torch tensor [nx, ny, nz] in 1/mm.
    """
    proj = torch.as_tensor(projections)
    if device is not None:
        proj = proj.to(device)
    proj = proj.to(dtype)
    if proj.ndim != 3 or proj.shape[0] != geometry.n_frames or tuple(proj.shape[1:]) != geometry.detector_shape:
        raise DRGSInputError("projections do not match the geometry", f"shape {tuple(proj.shape)}",
                             f"[{geometry.n_frames}, {geometry.height}, {geometry.width}] (views, H, W)",
                             "pass geometry.subset(frames) together with the projections of those frames")
    if geometry.n_frames < 1:
        raise DRGSInputError("no projections given", "0 views", "at least one view")
    with torch.no_grad():
        filtered = filter_projections(proj, geometry, grid, window, parker)
        vol = backproject(filtered, geometry, grid, chunk)
        if clip:
            vol.clamp_(min=0.0)
    return vol
