"""C-arm cone-beam geometry: the one place where the conventions of METHOD.md §3 live.

World frame: millimetres, origin at the isocentre, z = rotation axis, taken as DICOM patient LPS.
For frame k with primary angle a and secondary angle b (radians):

    world -> camera   p = R X + T,  T = (0, 0, sad)
    R = [[-sin a,        cos a,        0     ],
         [ sin b cos a,  sin b sin a, -cos b ],
         [-cos b cos a, -cos b sin a, -sin b ]]
    pixel             u = cx + fx p_x / p_z,  v = cy + fy p_y / p_z
                      cx = (W-1)/2, cy = (H-1)/2, fx = sid/sx, fy = sid/sy   (pixels)

Projection stacks are [N, H, W] (frame, detector row v, column u); row 0 is the +z side.
Volumes are arrays indexed [i, j, k] = (x, y, z); voxel centre = origin + (idx + 1/2) * spacing,
origin = -phy/2.  Every function accepts numpy arrays or torch tensors and returns the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .errors import DRGSInputError


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _like(a: np.ndarray, ref):
    """Return numpy array `a` as the same kind (and device/dtype for torch) as `ref`."""
    if _is_torch(ref):
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        return torch.as_tensor(a, dtype=dtype, device=ref.device)
    return a


@dataclass(frozen=True)
class VolumeGrid:
    """The reconstruction grid, centred on the isocentre.

    resolution: (nx, ny, nz) voxels; spacing: (dx, dy, dz) mm.  Arrays are [nx, ny, nz].
    """

    resolution: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self):
        res = tuple(int(r) for r in self.resolution)
        sp = tuple(float(s) for s in self.spacing)
        if len(res) != 3 or min(res) < 1:
            raise DRGSInputError("volume_resolution is invalid", str(self.resolution), "three positive integers")
        if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
            raise DRGSInputError("volume_spacing is invalid", str(self.spacing), "three positive lengths in mm")
        object.__setattr__(self, "resolution", res)
        object.__setattr__(self, "spacing", sp)

    @classmethod
    def from_physical(cls, resolution, physical_size) -> "VolumeGrid":
        res = np.asarray(resolution, dtype=np.int64)
        return cls(tuple(res), tuple(np.asarray(physical_size, float) / res))

    @property
    def physical_size(self) -> np.ndarray:
        """(px, py, pz) in mm."""
        return np.asarray(self.resolution, float) * np.asarray(self.spacing, float)

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of the outer corner of voxel (0,0,0): -phy/2."""
        return -0.5 * self.physical_size

    @property
    def first_voxel_centre(self) -> np.ndarray:
        return self.origin + 0.5 * np.asarray(self.spacing)

    @property
    def min_spacing(self) -> float:
        return float(min(self.spacing))

    def axes(self) -> list[np.ndarray]:
        """Voxel-centre coordinates (mm) along x, y and z."""
        return [self.first_voxel_centre[d] + np.arange(self.resolution[d]) * self.spacing[d] for d in range(3)]

    def voxel_centres(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """All voxel centres as a torch tensor [nx, ny, nz, 3] (mm)."""
        ax = [torch.as_tensor(a, dtype=dtype, device=device) for a in self.axes()]
        return torch.stack(torch.meshgrid(*ax, indexing="ij"), dim=-1)

    def world_to_index(self, points):
        """World mm -> continuous voxel index (voxel centres at integers)."""
        o = _like(self.first_voxel_centre, points)
        s = _like(np.asarray(self.spacing), points)
        return (points - o) / s

    def index_to_world(self, index):
        o = _like(self.first_voxel_centre, index)
        s = _like(np.asarray(self.spacing), index)
        return index * s + o

    def normalise(self, points):
        """World mm -> [0, 1]^3 over the volume box (p_hat of METHOD §4)."""
        o = _like(self.origin, points)
        p = _like(self.physical_size, points)
        return (points - o) / p

    def contains(self, points):
        """Boolean mask: points inside the volume box."""
        q = self.normalise(points)
        return ((q >= 0) & (q <= 1)).all(-1)

    def to_json(self) -> dict:
        return {
            "volume_resolution": list(self.resolution),
            "volume_spacing": list(self.spacing),
            "volume_phy": self.physical_size.tolist(),
        }


@dataclass(frozen=True)
class Camera:
    """One frame's pinhole camera as torch tensors, for the rasteriser.

    R [3,3], T [3] (world->camera, mm); fx, fy, cx, cy in pixels; width W, height H in pixels.
    """

    R: torch.Tensor
    T: torch.Tensor
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def source(self) -> torch.Tensor:
        """X-ray source position in world mm (the camera centre)."""
        return -(self.R.T @ self.T)

    def pack(self, device=None) -> "PackedCamera":
        """This camera with its parameters in one float64 tensor on `device` (see `PackedCamera`)."""
        R = torch.as_tensor(self.R).reshape(9)
        device = R.device if device is None else device
        k = torch.tensor([self.fx, self.fy, self.cx, self.cy], dtype=torch.float64)
        parts = [R, torch.as_tensor(self.T).reshape(3), k]
        params = torch.cat([t.to(device=device, dtype=torch.float64) for t in parts])
        return PackedCamera(params, int(self.width), int(self.height))


class PackedCamera(NamedTuple):
    """A `Camera` as params [16] float64 = (R row-major, T mm, fx, fy, cx, cy) plus the image size.

    The renderer takes either kind.  Kept on the GPU, a packed camera costs no host -> device copy per
    rendering, and a fixed params buffer whose contents change per view lets one CUDA graph render any view.
    """

    params: torch.Tensor
    width: int
    height: int

    @property
    def R(self) -> torch.Tensor:
        return self.params[:9].view(3, 3)

    @property
    def T(self) -> torch.Tensor:
        return self.params[9:12]


def rotation_matrices(primary, secondary=None):
    """World->camera rotations [N, 3, 3] for primary/secondary angles [N] in radians (numpy or torch)."""
    if _is_torch(primary):
        lib, a = torch, primary
        b = torch.zeros_like(a) if secondary is None else secondary
        stack = torch.stack
    else:
        lib, a = np, np.asarray(primary, dtype=np.float64)
        b = np.zeros_like(a) if secondary is None else np.asarray(secondary, dtype=np.float64)
        stack = np.stack
    sa, ca, sb, cb = lib.sin(a), lib.cos(a), lib.sin(b), lib.cos(b)
    zero = sa * 0
    rows = [
        stack([-sa, ca, zero], -1),
        stack([sb * ca, sb * sa, -cb], -1),
        stack([-cb * ca, -cb * sa, -sb], -1),
    ]
    return stack(rows, -2)


@dataclass(frozen=True)
class ConeBeamGeometry:
    """Rotational C-arm acquisition: one entry per frame.

    sad, sid: source-isocentre and source-detector distances (mm).
    detector_shape: (H, W) pixels; detector_spacing: (sx, sy) mm per pixel at the detector (u, v).
    primary_angles, secondary_angles: [N] radians.
    """

    sad: float
    sid: float
    detector_shape: tuple[int, int]
    detector_spacing: tuple[float, float]
    primary_angles: np.ndarray
    secondary_angles: np.ndarray = field(default=None)

    def __post_init__(self):
        a = np.asarray(self.primary_angles, dtype=np.float64).reshape(-1)
        b = (np.zeros_like(a) if self.secondary_angles is None
             else np.asarray(self.secondary_angles, dtype=np.float64).reshape(-1))
        if b.shape != a.shape:
            raise DRGSInputError("secondary angles do not match primary angles",
                                 f"{b.size} secondary, {a.size} primary", "one of each per frame")
        if not (np.isfinite(self.sad) and np.isfinite(self.sid) and 0 < self.sad < self.sid):
            raise DRGSInputError("sad/sid are invalid", f"sad={self.sad}, sid={self.sid}",
                                 "0 < sad < sid, both in mm")
        object.__setattr__(self, "primary_angles", a)
        object.__setattr__(self, "secondary_angles", b)
        object.__setattr__(self, "sad", float(self.sad))
        object.__setattr__(self, "sid", float(self.sid))
        object.__setattr__(self, "detector_shape", tuple(int(x) for x in self.detector_shape))
        object.__setattr__(self, "detector_spacing", tuple(float(x) for x in self.detector_spacing))

    # ---- intrinsics -------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self.primary_angles.size)

    @property
    def height(self) -> int:
        return self.detector_shape[0]

    @property
    def width(self) -> int:
        return self.detector_shape[1]

    @property
    def fx(self) -> float:
        return self.sid / self.detector_spacing[0]

    @property
    def fy(self) -> float:
        return self.sid / self.detector_spacing[1]

    @property
    def cx(self) -> float:
        return (self.width - 1) / 2.0

    @property
    def cy(self) -> float:
        return (self.height - 1) / 2.0

    # ---- extrinsics -------------------------------------------------------------------------
    def rotations(self, frames=None) -> np.ndarray:
        """[n, 3, 3] world->camera rotations (float64) for frame indices (all frames by default)."""
        idx = slice(None) if frames is None else np.asarray(frames)
        return rotation_matrices(self.primary_angles[idx], self.secondary_angles[idx])

    def translation(self) -> np.ndarray:
        return np.array([0.0, 0.0, self.sad])

    def source_positions(self, frames=None) -> np.ndarray:
        """[n, 3] source positions in world mm: -R^T T."""
        R = self.rotations(frames)
        return -np.einsum("nji,j->ni", R, self.translation())

    def binned(self, factor: int) -> "ConeBeamGeometry":
        """The same acquisition read out with factor x factor detector pixels merged into one.

        Binned pixel (i, j) covers pixels factor*i .. factor*i + factor - 1 (rows, likewise columns), and its
        centre lands exactly where those pixels' mean centre was, because cx = (W - 1) / 2 in both."""
        H, W = self.detector_shape
        factor = int(factor)
        if factor < 1 or H % factor or W % factor:
            raise DRGSInputError("detector binning does not divide the detector", f"{factor} for {H} x {W}",
                                 "a factor >= 1 that divides both the height and the width",
                                 "choose another --detector-binning (or 'auto')")
        sx, sy = self.detector_spacing
        return ConeBeamGeometry(self.sad, self.sid, (H // factor, W // factor), (sx * factor, sy * factor),
                                self.primary_angles, self.secondary_angles)

    def auto_binning(self, voxel_size: float) -> int:
        """The largest factor dividing the detector for which a binned pixel, scaled to the isocentre, is still
        no larger than `voxel_size` (mm): finer detector sampling than the volume's adds noise, not detail."""
        pixel_at_iso = max(self.detector_spacing) * self.sad / self.sid
        factor = max(1, int(np.floor(voxel_size / pixel_at_iso + 1e-9)))
        H, W = self.detector_shape
        while H % factor or W % factor:
            factor -= 1
        return factor

    def subset(self, frames) -> "ConeBeamGeometry":
        frames = np.asarray(frames)
        return ConeBeamGeometry(self.sad, self.sid, self.detector_shape, self.detector_spacing,
                                self.primary_angles[frames], self.secondary_angles[frames])

    def camera(self, frame: int, device=None, dtype=torch.float32) -> Camera:
        R = torch.as_tensor(self.rotations([frame])[0], dtype=dtype, device=device)
        T = torch.as_tensor(self.translation(), dtype=dtype, device=device)
        return Camera(R, T, self.fx, self.fy, self.cx, self.cy, self.width, self.height)

    # ---- projection and rays ----------------------------------------------------------------
    def world_to_camera(self, points, frames=None):
        """points [..., 3] world mm -> camera coordinates [n, ..., 3] mm for each frame."""
        R = _like(self.rotations(frames), points)
        T = _like(self.translation(), points)
        lib = torch if _is_torch(points) else np
        flat = points.reshape(-1, 3)
        cam = lib.einsum("nij,pj->npi", R, flat) + T
        return cam.reshape((R.shape[0],) + tuple(points.shape[:-1]) + (3,))

    def project(self, points, frames=None):
        """points [..., 3] world mm -> (uv [n, ..., 2] pixels, depth [n, ...] mm along the view axis)."""
        cam = self.world_to_camera(points, frames)
        z = cam[..., 2]
        u = self.cx + self.fx * cam[..., 0] / z
        v = self.cy + self.fy * cam[..., 1] / z
        lib = torch if _is_torch(points) else np
        return lib.stack([u, v], -1), z

    def pixel_directions_camera(self, u, v):
        """Camera-frame ray directions (not normalised, p_z = 1) through pixel positions u, v."""
        lib = torch if _is_torch(u) else np
        x = (u - self.cx) / self.fx
        y = (v - self.cy) / self.fy
        return lib.stack([x, y, lib.ones_like(x)], -1)

    def rays(self, frames=None, u=None, v=None, device=None, dtype=torch.float32):
        """Rays through pixel centres as torch tensors.

        Returns (origins [n, 3], directions [n, H, W, 3] unit vectors) in world mm.  Custom pixel
        positions may be given as tensors u, v of any equal shape S, giving directions [n, *S, 3].
        """
        if u is None:
            v, u = torch.meshgrid(torch.arange(self.height, dtype=torch.float64),
                                  torch.arange(self.width, dtype=torch.float64), indexing="ij")
        u = torch.as_tensor(u, dtype=torch.float64)
        v = torch.as_tensor(v, dtype=torch.float64)
        d_cam = self.pixel_directions_camera(u, v)
        R = torch.as_tensor(self.rotations(frames))
        d = torch.einsum("nji,...j->n...i", R, d_cam)  # R^T d_cam
        d = d / d.norm(dim=-1, keepdim=True)
        src = torch.as_tensor(self.source_positions(frames))
        return src.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype)

    def to_json(self) -> dict:
        return {
            "sad": self.sad,
            "sid": self.sid,
            "proj_resolution": [self.width, self.height],
            "proj_spacing": list(self.detector_spacing),
            "proj_phy": [self.width * self.detector_spacing[0], self.height * self.detector_spacing[1]],
        }


def frame_times(n_frames: int) -> np.ndarray:
    """Normalised acquisition times t_k = k / N in [0, 1)."""
    return np.arange(n_frames, dtype=np.float64) / n_frames


def view_indices(n_frames: int, n_views: int) -> np.ndarray:
    """Training frames floor(arange(0, N, N / n_views)), the last clamped to N-1 (METHOD §6)."""
    if not 1 <= int(n_views) <= n_frames:
        raise DRGSInputError("the number of training views is out of range", f"{n_views} views requested",
                             f"between 1 and the number of frames ({n_frames})",
                             f"pass --views with a value in 1..{n_frames}")
    idx = np.floor(np.arange(0, n_frames, n_frames / n_views)).astype(np.int64)[:n_views]
    return np.minimum(idx, n_frames - 1)


def held_out_indices(n_frames: int, train: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(n_frames), np.asarray(train))
