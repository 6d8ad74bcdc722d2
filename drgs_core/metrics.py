"""Evaluation metrics (METHOD §8) and the volume/mesh helpers they need.

Units and axes: mesh vertices are [V, 3] world millimetres (the `VolumeGrid` world frame); volumes are
[nx, ny, nz] = [x, y, z] arrays on a `VolumeGrid`; image stacks are [n, H, W] (frame, row v, column u).

- 3D: `chamfer_hd95` (CD = mean d(A->B) + mean d(B->A), HD95 = max of the two 95th percentiles, in mm),
  `mesh_distances`, optional rigid ICP (`icp_align`).
- 2D: `psnr_ssim_2d` (per-image min-max normalisation, PSNR with data range 1, SSIM with an 11x11 Gaussian
  window of sigma 1.5), `ssim` (differentiable torch), `psnr`, `split_train_heldout`.
- Volumes: `dice`, `best_dice`, `correlation`, `resample_to_grid`, `mesh_from_volume`, `robust_iso_level`.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from .errors import DRGSInputError
from .geometry import VolumeGrid

log = logging.getLogger(__name__)

__all__ = [
    "mesh_distances", "chamfer_hd95", "icp_align", "kabsch",
    "ssim", "psnr", "normalise_minmax", "psnr_ssim_2d", "split_train_heldout",
    "dice", "best_dice", "correlation", "resample_to_grid", "mesh_from_volume", "robust_iso_level",
]


def _np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ======================================================================================================
# 3D surface distances
# ======================================================================================================
def _points(v, name) -> np.ndarray:
    p = _np(v)
    if p.ndim != 2 or p.shape[1] != 3:
        raise DRGSInputError(f"{name} must be a list of 3D points", f"shape {p.shape}", "[n, 3] world mm")
    if p.shape[0] == 0:
        raise DRGSInputError(f"{name} is empty", "0 vertices", "a non-empty mesh",
                             "check the iso-level used to extract the surface")
    return p


def kabsch(src: np.ndarray, dst: np.ndarray):
    """Least-squares rigid transform (R [3,3], t [3]) with dst ~= src @ R.T + t, for paired points [n, 3]."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cd - r @ cs


def icp_align(verts_a, verts_b, iterations: int = 50, tol: float = 1e-7, reject: float = 3.0):
    """Rigid point-to-point ICP of A onto B.

    Each iteration pairs every point of A (moved) with its nearest point of B, drops pairs farther than
    `reject` times the median pair distance, and solves the best rigid motion (Kabsch).  Stops when the
    mean pair distance changes by less than `tol` mm.  Returns (moved A [n,3], R [3,3], t [3]) with
    moved = A @ R.T + t (mm).
    """
    a = _points(verts_a, "mesh A")
    b = _points(verts_b, "mesh B")
    tree = cKDTree(b)
    r_tot, t_tot = np.eye(3), np.zeros(3)
    cur = a.copy()
    prev = math.inf
    for _ in range(int(iterations)):
        d, j = tree.query(cur)
        keep = d <= reject * max(np.median(d), 1e-12)
        r, t = kabsch(cur[keep], b[j[keep]])
        cur = cur @ r.T + t
        r_tot, t_tot = r @ r_tot, r @ t_tot + t
        err = float(d[keep].mean())
        if abs(prev - err) < tol:
            break
        prev = err
    return cur, r_tot, t_tot


def mesh_distances(verts_a, verts_b):
    """Nearest-neighbour distances (mm): (d_ab [n] from each A vertex to B, d_ba [m] from each B vertex to A)."""
    a = _points(verts_a, "mesh A")
    b = _points(verts_b, "mesh B")
    d_ab, _ = cKDTree(b).query(a)
    d_ba, _ = cKDTree(a).query(b)
    return d_ab, d_ba


def chamfer_hd95(verts_a, verts_b, icp: bool = False, icp_iterations: int = 50) -> dict:
    """Chamfer distance and 95 % Hausdorff distance between two vertex sets (world mm).

    cd = mean(d(A->B)) + mean(d(B->A)); hd95 = max(95th percentile of d(A->B), of d(B->A)).  Distances are
    vertex to nearest vertex.  icp=True first aligns A to B rigidly (`icp_align`); off by default (exact
    synthetic geometry needs no alignment, METHOD §8).
    Returns {"cd", "hd95", "a_to_b_mean", "b_to_a_mean", "a_to_b_p95", "b_to_a_p95"} in mm, plus
    "icp_rotation" [3,3] and "icp_translation" [3] (mm) when icp is on.
    """
    a = _points(verts_a, "mesh A")
    b = _points(verts_b, "mesh B")
    out = {}
    if icp:
        a, r, t = icp_align(a, b, icp_iterations)
        out["icp_rotation"], out["icp_translation"] = r, t
    d_ab, d_ba = mesh_distances(a, b)
    p_ab, p_ba = float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95))
    out.update(cd=float(d_ab.mean() + d_ba.mean()), hd95=max(p_ab, p_ba), a_to_b_mean=float(d_ab.mean()),
               b_to_a_mean=float(d_ba.mean()), a_to_b_p95=p_ab, b_to_a_p95=p_ba)
    return out


# ======================================================================================================
# 2D image metrics
# ======================================================================================================
@functools.lru_cache(maxsize=16)
def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    """The normalised 1-D Gaussian window [size]; the 2-D window is its outer product (separable).
    Cached: a fresh host -> GPU copy per call would stall the training loop (and break graph capture)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _local_means(stack: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid-region Gaussian filtering of [B, C, H, W] as two 1-D passes with all C channels in one call."""
    c = stack.shape[1]
    k = g.numel()
    out = F.conv2d(stack, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _as_batch(img: torch.Tensor) -> torch.Tensor:
    if img.ndim == 2:
        return img[None, None]
    if img.ndim == 3:
        return img[:, None]
    if img.ndim == 4 and img.shape[1] == 1:
        return img
    raise DRGSInputError("image has an unsupported shape", f"{tuple(img.shape)}", "[H,W], [B,H,W] or [B,1,H,W]")


def ssim_per_image(img1: torch.Tensor, img2: torch.Tensor, window: int = 11, sigma: float = 1.5,
                   data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of each image pair [B] (see `ssim`)."""
    x = _as_batch(torch.as_tensor(img1))
    y = _as_batch(torch.as_tensor(img2)).to(x)
    if x.shape != y.shape:
        raise DRGSInputError("images to compare differ in shape", f"{tuple(x.shape)} vs {tuple(y.shape)}",
                             "equal shapes")
    if not x.is_floating_point():
        x, y = x.float(), y.float()
    if min(x.shape[-2:]) < window:
        raise DRGSInputError("image is smaller than the SSIM window", f"{tuple(x.shape[-2:])}",
                             f"at least {window} x {window} pixels")
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my, exx, eyy, exy = _local_means(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).unbind(1)
    sxx = exx - mx * mx
    syy = eyy - my * my
    sxy = exy - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2))


def ssim(img1: torch.Tensor, img2: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity, differentiable (torch), as a scalar tensor averaged over all images.

    img1, img2: [H, W], [B, H, W] or [B, 1, H, W], same shape.  Gaussian window `window` x `window` with
    standard deviation `sigma` pixels (normalised to sum 1), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    L = data_range, population (biased) variances, and the SSIM map averaged over the "valid" positions
    only (windows entirely inside the image).  This equals skimage.metrics.structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L.
    """
    return ssim_per_image(img1, img2, window, sigma, data_range).mean()


def psnr(img1, img2, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(L^2 / MSE); +inf for identical images."""
    a, b = _np(img1), _np(img2)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def normalise_minmax(img) -> np.ndarray:
    """Min-max normalisation of one image to [0, 1] (float64); a constant image becomes all zeros."""
    a = _np(img)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def _normalise_frames(stack: torch.Tensor) -> torch.Tensor:
    """`normalise_minmax` of every frame of [B, H, W] at once."""
    lo = stack.amin(dim=(1, 2), keepdim=True)
    span = stack.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (stack - lo) / torch.where(span > 0, span, 1.0), 0.0)


def split_train_heldout(values, train_idx):
    """Means of a per-frame metric over training frames and over the other (held-out) frames.

    Returns (train_mean, heldout_mean); a side with no frames gives nan.
    """
    v = np.asarray(values, dtype=np.float64)
    mask = np.zeros(v.shape[0], dtype=bool)
    mask[np.asarray(train_idx, dtype=np.int64)] = True
    tr = float(v[mask].mean()) if mask.any() else math.nan
    ho = float(v[~mask].mean()) if (~mask).any() else math.nan
    return tr, ho


def psnr_ssim_2d(rendered, measured, train_idx=None, window: int = 11, sigma: float = 1.5, device=None) -> dict:
    """PSNR (dB) and SSIM of rendered vs measured images [n, H, W] (METHOD §8).

    Each image of both stacks is min-max normalised to [0, 1] on its own (a constant image becomes 0);
    PSNR uses data range 1 and is +inf for a frame that matches exactly (means then are inf too); SSIM as
    `ssim`; all computed on `device` (e.g. the GPU) in batches of frames.  Returns {"psnr", "ssim" (means over
    frames), "psnr_per_frame", "ssim_per_frame" (lists)} and, when train_idx (frame indices) is given, "psnr_train", "psnr_heldout", "ssim_train", "ssim_heldout".
    """
    r, m = (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            for x in (rendered, measured))
    if r.ndim == 2:
        r, m = r[None], m[None]
    if r.shape != m.shape or r.ndim != 3:
        raise DRGSInputError("rendered and measured stacks differ", f"{r.shape} vs {m.shape}",
                             "two [n, H, W] stacks of equal shape")
    # Batches of frames on `device` (float64, as the per-frame numpy definitions): on the GPU the whole
    # paper-size stack takes tens of milliseconds instead of seconds of per-frame numpy.
    ps, ss = [], []
    for i in range(0, len(r), 16):
        a = _normalise_frames(r[i:i + 16].to(device=device, dtype=torch.float64))
        b = _normalise_frames(m[i:i + 16].to(device=device, dtype=torch.float64))
        mse = (a - b).pow(2).mean(dim=(1, 2)).tolist()
        ps += [math.inf if e == 0 else -10.0 * math.log10(e) for e in mse]
        ss += ssim_per_image(a, b, window, sigma, 1.0).tolist()
    out = {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "psnr_per_frame": ps, "ssim_per_frame": ss}
    if train_idx is not None:
        out["psnr_train"], out["psnr_heldout"] = split_train_heldout(ps, train_idx)
        out["ssim_train"], out["ssim_heldout"] = split_train_heldout(ss, train_idx)
    return out


# ======================================================================================================
# volume metrics
# ======================================================================================================
def _same_shape(a: np.ndarray, b: np.ndarray, what: str):
    if a.shape != b.shape:
        raise DRGSInputError(f"{what}: volumes differ in shape", f"{a.shape} vs {b.shape}",
                             "equal shapes (use resample_to_grid to bring them onto one grid)")


def dice(volume, truth_mask, threshold: float | None = None) -> float:
    """Dice overlap 2|P & T| / (|P| + |T|) of P = volume > threshold with the boolean truth mask.

    threshold None: the volume is taken as a mask already (non-zero = inside).  Two empty masks give 1.
    """
    v = _np(volume, None)
    t = _np(truth_mask, None).astype(bool)
    _same_shape(v, t, "dice")
    p = v.astype(bool) if threshold is None else v > threshold
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def best_dice(volume, truth_mask, thresholds=None):
    """The best Dice over thresholds of the volume: returns (dice, threshold).

    thresholds None: an exhaustive search over every distinct voxel value (sort once, cumulative
    overlaps), returning the threshold halfway between the last value kept and the next lower value, so
    that volume > threshold reproduces the best mask.  Otherwise the given thresholds are tried.
    """
    v = _np(volume).ravel()
    t = _np(truth_mask, None).astype(bool).ravel()
    _same_shape(v, t, "best_dice")
    if thresholds is not None:
        best = max(((dice(v, t, float(th)), float(th)) for th in np.atleast_1d(thresholds)), key=lambda x: x[0])
        return best
    n_true = int(t.sum())
    # Sort only the voxels above the minimum (a reconstruction is mostly exact zeros): the minimum's voxels
    # are one tie group that can only be cut after as a whole, appended as the last candidate.
    lowest = v.min()
    above = v > lowest
    order = np.argsort(-v[above], kind="stable")
    vs = np.append(v[above][order], lowest)
    overlap = np.append(np.cumsum(t[above][order]), n_true)
    k = np.append(np.arange(1, order.size + 1), v.size)
    # Only cut where the value changes (ties go together).
    cut = np.ones(vs.size, dtype=bool)
    cut[:-1] = vs[:-1] > vs[1:]
    scores = np.where(cut, 2.0 * overlap / (k + n_true), -1.0)
    i = int(np.argmax(scores))
    best_score = float(scores[i])
    if n_true == 0 and best_score < 1.0:
        # Nothing true: the empty prediction (threshold at the maximum) is perfect.
        return 1.0, float(vs[0])
    nxt = vs[i + 1] if i + 1 < vs.size else vs[i] - max(1.0, abs(vs[i]))
    return best_score, float(0.5 * (vs[i] + nxt))


def correlation(volume, truth, mask=None) -> float:
    """Pearson correlation coefficient between two volumes (optionally within a boolean mask)."""
    a, b = _np(volume), _np(truth)
    _same_shape(a, b, "correlation")
    if mask is not None:
        m = _np(mask, None).astype(bool)
        a, b = a[m], b[m]
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return math.nan if den == 0 else float((a * b).sum()) / den


def resample_to_grid(volume, grid_from: VolumeGrid, grid_to: VolumeGrid, fill: float = 0.0,
                     chunk: int = 1 << 22):
    """Trilinear resampling of a volume from one grid onto another by world (mm) position.

    Each voxel centre of grid_to is mapped to a continuous index of grid_from (`world_to_index`) and
    interpolated trilinearly between grid_from's voxel centres; in the half-voxel shell between the
    outermost voxel centres and the faces of grid_from's box the edge value is held (as in
    `drgs_core.ct.forward_project`), and points outside that box get `fill`.  Returns the same kind as `volume` (numpy or torch), shape grid_to.resolution.
    """
    is_t = isinstance(volume, torch.Tensor)
    vol = volume if is_t else torch.as_tensor(np.asarray(volume))
    if not vol.is_floating_point():
        vol = vol.double()
    if tuple(vol.shape) != tuple(grid_from.resolution):
        raise DRGSInputError("the volume does not match grid_from", f"shape {tuple(vol.shape)}",
                             f"{tuple(grid_from.resolution)}")
    dtype, device = vol.dtype, vol.device
    n = np.asarray(grid_from.resolution, dtype=np.float64)
    axes = [torch.as_tensor(a, dtype=torch.float64) for a in grid_to.axes()]
    nx, ny, nz = grid_to.resolution
    out = torch.empty(grid_to.resolution, dtype=dtype, device=device)
    slab = max(1, int(chunk) // max(1, ny * nz))
    src = vol[None, None]
    for i0 in range(0, nx, slab):
        i1 = min(nx, i0 + slab)
        pts = torch.stack(torch.meshgrid(axes[0][i0:i1], axes[1], axes[2], indexing="ij"), -1)
        idx = grid_from.world_to_index(pts)                                   # [m, ny, nz, 3] float64
        inside = ((idx >= -0.5 - 1e-9) & (idx <= torch.as_tensor(n - 0.5) + 1e-9)).all(-1)
        g = torch.where(torch.as_tensor(n > 1), idx * torch.as_tensor(2.0 / np.maximum(n - 1, 1)) - 1.0,
                        torch.zeros_like(idx))
        g = g.flip(-1).to(dtype=dtype, device=device)                         # (z, y, x) for grid_sample
        vals = F.grid_sample(src, g[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
        out[i0:i1] = torch.where(inside.to(device), vals, torch.full_like(vals, fill))
    return out if is_t else out.cpu().numpy()


# ======================================================================================================
# surfaces
# ======================================================================================================
def _robust_vessel_value(volume, percentile: float) -> tuple[np.ndarray, float]:
    """(finite voxels, M): M = the `percentile`-th percentile of the voxels above 1 % of the maximum, a robust
    "vessel value" insensitive to a few hot voxels and to how much of the volume is background."""
    v = _np(volume).ravel()
    v = v[np.isfinite(v)]
    vmax = float(v.max()) if v.size else 0.0
    if not vmax > 0:
        raise DRGSInputError("cannot choose an iso-level", "the volume has no positive value",
                             "a reconstruction with some attenuation above 0")
    return v, float(np.percentile(v[v > 0.01 * vmax], percentile))


def robust_iso_level(volume, fraction: float = 0.05, percentile: float = 99.5) -> float:
    """A default iso-level for `mesh_from_volume` that works on any intensity scale (used for FDK).

    Rule: with M the robust vessel value (see `_robust_vessel_value`), the level is the Otsu threshold of the
    voxels above fraction * M (the structure-vs-haze split), kept within [0.1 M, 0.9 M].  The rule is
    scale-equivariant: robust_iso_level(c * V) = c * robust_iso_level(V).
    Raises DRGSInputError if the volume has no positive value.
    """
    from skimage.filters import threshold_otsu

    v, high = _robust_vessel_value(volume, percentile)
    cand = v[v > fraction * high]
    if cand.size < 2 or float(cand.max()) <= float(cand.min()):
        return 0.5 * high
    level = float(threshold_otsu(cand))
    return float(min(max(level, 0.1 * high), 0.9 * high))


def vessel_iso_level(volume, fraction: float = 0.2, percentile: float = 99.5) -> float:
    """Default iso-level for Gaussian reconstructions: `fraction` of the robust vessel value M.

    A voxelised Gaussian model has no streak haze to separate from, so Otsu's split would fall between
    large and small vessels; a fixed fraction of M keeps the small ones (METHOD §7's reference level, 0.008,
    is about this fraction of its data's vessel value).  Scale-equivariant.
    """
    return float(fraction * _robust_vessel_value(volume, percentile)[1])


def mesh_from_volume(volume, grid: VolumeGrid, level: float | None = None):
    """Iso-surface of a volume by marching cubes: (vertices [V, 3] world mm float64, faces [F, 3] int64).

    level None uses `robust_iso_level`.  Vertices are placed with the grid spacing and shifted by the first
    voxel centre, so they lie in the world frame of the grid.  A level outside the volume's value range
    gives empty arrays (and a warning in the log).
    """
    from skimage.measure import marching_cubes

    v = _np(volume)
    if v.shape != tuple(grid.resolution):
        raise DRGSInputError("the volume does not match its grid", f"shape {v.shape}", f"{grid.resolution}")
    if level is None:
        level = robust_iso_level(v)
    level = float(level)
    if not (float(v.min()) < level < float(v.max())):
        log.warning("iso-level %g is outside the volume's range [%g, %g]: empty surface", level,
                    float(v.min()), float(v.max()))
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    verts, faces, _, _ = marching_cubes(v, level=level, spacing=tuple(grid.spacing))
    verts = verts.astype(np.float64) + np.asarray(grid.first_voxel_centre)
    return verts, faces.astype(np.int64)
