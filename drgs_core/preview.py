"""Training previews in a form a viewer loads in a few milliseconds (the Slicer panel applies them in its GUI thread).

``write_preview`` writes, for one training iteration, the mean volume as an *uncompressed* NRRD shrunk by an integer
block-mean factor so that no axis exceeds ``max_size`` voxels, and its iso-surface as a *binary* legacy VTK polydata
file.  Both are in DICOM patient LPS millimetres (METHOD §3) and are written atomically; older previews are removed so
that a folder holds the newest ``keep`` only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .geometry import VolumeGrid
from .io.atomic import atomic_path

log = logging.getLogger(__name__)

MAX_PREVIEW_SIZE = 128


def shrink_factor(resolution, max_size: int = MAX_PREVIEW_SIZE) -> int:
    """The smallest integer factor that brings every axis of ``resolution`` to at most ``max_size`` voxels."""
    return max(1, max(math.ceil(int(n) / max_size) for n in resolution))


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks of ``volume [nx, ny, nz]``; voxels past the last whole block are dropped."""
    if factor == 1:
        return np.asarray(volume, dtype=np.float32)
    n = [s // factor for s in volume.shape]
    v = np.asarray(volume, dtype=np.float32)[:n[0] * factor, :n[1] * factor, :n[2] * factor]
    return v.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5), dtype=np.float32)


def _write_raw_nrrd(path: Path, volume: np.ndarray, spacing, first_centre) -> None:
    """Uncompressed NRRD, axes (x, y, z) = (i, j, k) with x fastest, LPS space."""
    arr = np.asarray(volume, dtype="<f4")
    spacing, first_centre = [float(v) for v in spacing], [float(v) for v in first_centre]
    header = ("NRRD0004\n"
              "type: float\n"
              "dimension: 3\n"
              "space: left-posterior-superior\n"
              f"sizes: {arr.shape[0]} {arr.shape[1]} {arr.shape[2]}\n"
              f"space directions: ({spacing[0]!r},0,0) (0,{spacing[1]!r},0) (0,0,{spacing[2]!r})\n"
              "kinds: domain domain domain\n"
              "endian: little\n"
              "encoding: raw\n"
              f"space origin: ({first_centre[0]!r},{first_centre[1]!r},{first_centre[2]!r})\n\n")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(np.asfortranarray(arr).tobytes(order="F"))


def _write_binary_vtk(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Legacy VTK POLYDATA, BINARY (big-endian), tagged SPACE=LPS as 3D Slicer expects."""
    v = np.ascontiguousarray(vertices, dtype=">f4")
    f = np.ascontiguousarray(np.concatenate([np.full((len(faces), 1), 3), faces], axis=1), dtype=">i4")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"# vtk DataFile Version 3.0\nDRGS4D preview SPACE=LPS\nBINARY\nDATASET POLYDATA\n")
        fh.write(f"POINTS {len(v)} float\n".encode("ascii"))
        fh.write(v.tobytes())
        fh.write(f"\nPOLYGONS {len(faces)} {f.size}\n".encode("ascii"))
        fh.write(f.tobytes())
        fh.write(b"\n")


def write_preview(folder, iteration: int, volume, grid: VolumeGrid, level: float | None,
                  max_size: int = MAX_PREVIEW_SIZE, keep: int = 2) -> dict:
    """Write the preview of ``volume [nx, ny, nz]`` (attenuation, 1/mm) on ``grid`` for training ``iteration``.

    Returns ``{"volume": .nrrd path, "mesh": .vtk path or None, "iso_level": level, "factor": shrink factor}``.
    The mesh is the ``level`` iso-surface of the shrunk volume (None when ``level`` is None, not positive or above
    the values).
    """
    from .metrics import mesh_from_volume

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factor = shrink_factor(grid.resolution, max_size)
    small = block_mean(np.asarray(volume), factor)
    spacing = tuple(float(s) * factor for s in grid.spacing)
    # centre of the first block = first fine voxel centre + (factor - 1) / 2 fine voxels
    first = np.asarray(grid.first_voxel_centre, float) + 0.5 * (factor - 1) * np.asarray(grid.spacing, float)
    vpath, mpath = folder / f"preview_{iteration:06d}.nrrd", folder / f"preview_{iteration:06d}.vtk"
    _write_raw_nrrd(vpath, small, spacing, first)
    result = {"volume": str(vpath), "mesh": None, "iso_level": None if level is None else float(level),
              "factor": factor}
    if level is not None and level > 0 and small.size and float(small.max()) > level:
        coarse = VolumeGrid(small.shape, spacing)
        verts, faces = mesh_from_volume(small, coarse, level)
        if len(faces):
            verts = verts - np.asarray(coarse.first_voxel_centre) + first
            _write_binary_vtk(mpath, verts, faces)
            result["mesh"] = str(mpath)
    _remove_older(folder, iteration, keep)
    return result


def _remove_older(folder: Path, iteration: int, keep: int) -> None:
    """Delete preview files older than the newest ``keep`` iterations (the viewer may still read the previous one)."""
    iterations = set()
    for path in folder.glob("preview_*.*"):
        stem = path.name.split(".")[0]
        if stem[len("preview_"):].isdigit():
            iterations.add(int(stem[len("preview_"):]))
    for old in sorted(iterations)[:-keep] if len(iterations) > keep else []:
        if old < iteration:
            for path in folder.glob(f"preview_{old:06d}.*"):
                path.unlink(missing_ok=True)
