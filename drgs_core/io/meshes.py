"""Triangle mesh files: STL (binary), legacy VTK polydata and Wavefront OBJ.

Vertices are world coordinates in LPS millimetres (METHOD §3); faces are 0-based vertex indices [F, 3].
Every written file declares the coordinate system the way 3D Slicer reads it: ``SPACE=LPS`` in the 80-byte
STL header, in the title line (2nd line) of the VTK file and in a leading ``#`` comment of the OBJ file.
Note: the reference mesh shipped with the public 4DRGS cases (``mesh_ref.obj``) is in voxel index units;
:func:`read_mesh` returns coordinates as stored, without conversion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from .atomic import atomic_path

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".stl", ".vtk", ".obj")
_HEADER_TEXT = "DRGS4D mesh SPACE=LPS (mm)"
_STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("v", "<f4", (3, 3)), ("attr", "<u2")])


def _mesh_format(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise DRGSInputError(f"unsupported mesh file type for {Path(path).name}", f"extension '{suffix}'",
                             "one of .stl, .vtk, .obj", "choose one of these extensions")
    return suffix[1:]


def _to_numpy(x) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _check_mesh(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(_to_numpy(vertices), dtype=np.float64)
    f = _to_numpy(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise DRGSInputError("mesh vertices have the wrong shape", f"shape {v.shape}", "[V, 3] (x, y, z) in mm",
                             "pass vertices as an array of shape [V, 3]")
    if not np.all(np.isfinite(v)):
        raise DRGSInputError("mesh vertices are not all finite", f"{int(np.sum(~np.isfinite(v)))} non-finite values",
                             "finite coordinates in mm", "remove NaN/inf vertices before writing")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and not np.issubdtype(f.dtype, np.integer)):
        raise DRGSInputError("mesh faces have the wrong shape or type", f"shape {f.shape}, dtype {f.dtype}",
                             "[F, 3] integer vertex indices (0-based triangles)", "pass triangle faces as integers")
    f = f.astype(np.int64)
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise DRGSInputError("mesh faces refer to missing vertices", f"indices {f.min()}..{f.max()} for "
                             f"{v.shape[0]} vertices", "0-based indices < number of vertices",
                             "check the face array (0-based, not 1-based)")
    return v, f


# ------------------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------------------
def _write_stl(tmp: Path, v: np.ndarray, f: np.ndarray) -> None:
    tri = v[f]  # [F, 3, 3]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    normal = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
    records = np.zeros(f.shape[0], dtype=_STL_RECORD)
    records["normal"] = normal
    records["v"] = tri
    with open(tmp, "wb") as fh:
        fh.write(_HEADER_TEXT.encode("ascii").ljust(80, b" "))
        fh.write(np.uint32(f.shape[0]).astype("<u4").tobytes())
        fh.write(records.tobytes())


def _write_vtk(tmp: Path, v: np.ndarray, f: np.ndarray) -> None:
    with open(tmp, "w", encoding="ascii", newline="\n") as fh:
        fh.write("# vtk DataFile Version 3.0\n")
        fh.write(f"{_HEADER_TEXT}\n")
        fh.write("ASCII\nDATASET POLYDATA\n")
        fh.write(f"POINTS {v.shape[0]} double\n")
        np.savetxt(fh, v, fmt="%.17g")
        fh.write(f"POLYGONS {f.shape[0]} {4 * f.shape[0]}\n")
        np.savetxt(fh, np.hstack([np.full((f.shape[0], 1), 3, np.int64), f]), fmt="%d")


def _write_obj(tmp: Path, v: np.ndarray, f: np.ndarray) -> None:
    with open(tmp, "w", encoding="ascii", newline="\n") as fh:
        fh.write(f"# {_HEADER_TEXT}\n")
        np.savetxt(fh, v, fmt="v %.17g %.17g %.17g")
        np.savetxt(fh, f + 1, fmt="f %d %d %d")


def write_mesh(path, vertices, faces) -> Path:
    """Write a triangle mesh: vertices [V, 3] world LPS mm, faces [F, 3] 0-based indices.

    Format by extension: ``.stl`` (binary little-endian; float32 coordinates), ``.vtk`` (legacy ASCII
    POLYDATA, version 3.0, float64 coordinates), ``.obj`` (text, 1-based faces).  Each declares ``SPACE=LPS``
    for 3D Slicer.  Torch tensors are accepted.  Atomic.  Returns the path.
    """
    path = Path(path)
    fmt = _mesh_format(path)
    v, f = _check_mesh(vertices, faces)
    writer = {"stl": _write_stl, "vtk": _write_vtk, "obj": _write_obj}[fmt]
    with atomic_path(path) as tmp:
        writer(tmp, v, f)
    return path


# ------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------
def _merge_vertices(tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangle soup [F, 3, 3] -> (unique vertices [V, 3], faces [F, 3]) by exact coordinate equality."""
    flat = tri.reshape(-1, 3)
    verts, inverse = np.unique(flat, axis=0, return_inverse=True)
    return verts.astype(np.float64), inverse.reshape(-1, 3).astype(np.int64)


def _read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    if len(raw) >= 84:
        count = int(np.frombuffer(raw, "<u4", 1, 80)[0])
        if len(raw) == 84 + 50 * count:
            records = np.frombuffer(raw, _STL_RECORD, count, 84)
            return _merge_vertices(records["v"].astype(np.float64))
    text = raw.decode("ascii", errors="replace")
    if text.lstrip().lower().startswith("solid"):
        coords = [line.split()[1:4] for line in text.splitlines() if line.strip().lower().startswith("vertex")]
        tri = np.asarray(coords, dtype=np.float64)
        if tri.size == 0 or tri.shape[0] % 3:
            raise DRGSInputError(f"{path.name} is not a valid ASCII STL", f"{tri.shape[0]} vertex lines",
                                 "three vertex lines per facet", "re-export the mesh")
        return _merge_vertices(tri.reshape(-1, 3, 3))
    raise DRGSInputError(f"{path.name} is not a valid STL file", f"{len(raw)} bytes",
                         "binary STL (84 + 50 * triangles bytes) or ASCII STL starting with 'solid'",
                         "re-export the mesh as STL")


def _read_vtk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkTriangleFilter
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader

    reader = vtkPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    poly = reader.GetOutput()
    if poly is None or poly.GetNumberOfPoints() == 0:
        raise DRGSInputError(f"{path.name} holds no legacy VTK polydata", "no points read",
                             "a legacy .vtk file with DATASET POLYDATA", "re-export the mesh as VTK polydata")
    tri_filter = vtkTriangleFilter()
    tri_filter.SetInputData(poly)
    tri_filter.PassVertsOff()
    tri_filter.PassLinesOff()
    tri_filter.Update()
    out = tri_filter.GetOutput()
    verts = vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
    polys = out.GetPolys()
    if polys.GetNumberOfCells() == 0:
        return verts, np.zeros((0, 3), np.int64)
    conn = vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64)
    return verts, conn.reshape(-1, 3)


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    verts, faces = [], []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if parts[0] == "v":
                    verts.append([float(x) for x in parts[1:4]])
                elif parts[0] == "f":
                    idx = [int(p.split("/")[0]) for p in parts[1:]]
                    idx = [i - 1 if i > 0 else len(verts) + i for i in idx]  # 1-based or relative (negative)
                    for a, b in zip(idx[1:-1], idx[2:]):  # fan-triangulate polygons
                        faces.append([idx[0], a, b])
            except (ValueError, IndexError):
                raise DRGSInputError(f"{path.name} line {lineno} cannot be parsed", repr(line.strip()[:80]),
                                     "'v x y z' or 'f i j k' lines", "re-export the mesh as OBJ") from None
    v = np.asarray(verts, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise DRGSInputError(f"{path.name} has faces referring to missing vertices",
                             f"indices up to {f.max() + 1} for {v.shape[0]} vertices", "valid 1-based indices",
                             "re-export the mesh")
    return v, f


def read_mesh(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh: returns (vertices [V, 3] float64, faces [F, 3] int64, 0-based).

    ``.stl`` (binary or ASCII; duplicate corners merged by exact equality, so vertex order is not kept),
    ``.vtk`` (legacy polydata via VTK; polygons triangulated), ``.obj`` (polygons fan-triangulated).
    Coordinates are returned as stored (no LPS/RAS conversion).
    """
    path = Path(path)
    fmt = _mesh_format(path)
    if not path.is_file():
        raise DRGSInputError("mesh file not found", str(path), "an existing .stl/.vtk/.obj file", "check the path")
    return {"stl": _read_stl, "vtk": _read_vtk, "obj": _read_obj}[fmt](path)
