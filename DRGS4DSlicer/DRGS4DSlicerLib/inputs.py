"""Inputs for the panel: describe a case, turn engine errors into readable text, export scene volumes for the worker.

A case is either a case folder (METHOD §2) or fill + mask runs (files, or volume nodes already in the scene) plus a
``transforms.json``-style geometry file.  Describing it is the worker's ``--describe`` command in the chosen
interpreter (never in Slicer's own process), so the panel works the same with Slicer's Python and with an external
environment.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from . import process
from .protocol import tr

log = logging.getLogger("DRGS4D.inputs")


class InputProblem(Exception):
    """Something the user has to fix; ``str()`` is the message to show (never a traceback)."""


def readable_error(exc: BaseException) -> str:
    """A message for the panel from any exception raised while reading inputs."""
    if type(exc).__name__ == "DRGSInputError" or isinstance(exc, InputProblem):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return tr("File not found: {name}. What to do: check the path, or choose the file again.", name=name)
    if isinstance(exc, PermissionError):
        return tr("Permission denied: {name}. What to do: choose a file or folder you can read/write.",
                  name=exc.filename or exc)
    if isinstance(exc, ImportError):
        return tr("A Python package is missing: {name}. What to do: press Reconstruct once to install the engine's "
                  "dependencies, or choose an external Python environment that has them.", name=exc.name or exc)
    text = str(exc).strip() or type(exc).__name__
    return tr("{error}: {message}", error=type(exc).__name__, message=text) if type(exc).__name__ not in text else text


def input_request(case: str | None = None, fill: str | None = None, mask: str | None = None,
                  geometry: str | None = None) -> dict:
    """The input part of a request; checks that a complete set of inputs is named."""
    if case:
        if not os.path.isdir(case):
            raise InputProblem(tr("The case folder does not exist: {folder}. What to do: choose the folder that holds "
                                  "fill_run, mask_run and transforms.json.", folder=case))
        return {"case": os.fspath(case)}
    named = ((tr("fill run"), fill), (tr("mask run"), mask), (tr("geometry JSON"), geometry))
    missing = [label for label, value in named if not value]
    if missing:
        raise InputProblem(tr("Inputs are incomplete: choose {missing} (or a case folder instead).",
                              missing=", ".join(missing)))
    for label, value in named:
        if not os.path.isfile(value):
            raise InputProblem(tr("The {role} file does not exist: {path}. What to do: choose it again.", role=label,
                                  path=value))
    return {"fill": os.fspath(fill), "mask": os.fspath(mask), "geometry": os.fspath(geometry)}


def describe_inputs(request: dict, python: str | None = None, external: bool = False,
                    timeout: float = 300.0) -> dict:
    """Read the inputs with the worker's ``--describe`` and return its summary (``drgs_core.worker.summarize_case``).

    Blocking (scripts, tests); the panel runs the same command in the background (``process.WorkerCommand``), so that
    neither reading the runs nor importing torch happens in Slicer's process.  Raises ``InputProblem`` with a readable
    message for anything wrong with the inputs.
    """
    with tempfile.TemporaryDirectory(prefix="drgs4d-describe-") as tmp:
        path = os.path.join(tmp, "request.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(request, fh)
        event = process.run_worker_command(["--describe", path], python=python, external=external,
                                           timeout=timeout)
    if event.get("event") == "described":
        return event["case"]
    raise InputProblem(event.get("message") or tr("The inputs could not be read."))


def format_summary(summary: dict) -> str:
    """Multi-line text for the panel's input summary."""
    h, w = summary.get("detector_shape", [0, 0])
    sx, sy = (summary.get("detector_spacing_mm") or [0, 0])[:2]
    a0, a1 = summary.get("primary_deg", [0, 0])
    nx, ny, nz = summary.get("volume_resolution", [0, 0, 0])
    dx, dy, dz = summary.get("volume_spacing_mm", [0, 0, 0])
    px, py, pz = summary.get("volume_size_mm", [0, 0, 0])
    lines = [
        tr("{name}: {frames} frames", name=summary.get("name", "case"), frames=summary.get("n_frames", "?")),
        tr("Detector: {columns} × {rows} pixels at {column_mm} × {row_mm} mm", columns=w, rows=h,
           column_mm=f"{sx:g}", row_mm=f"{sy:g}"),
        tr("Angles: {start}° to {end}° ({span}° arc)", start=f"{a0:.1f}", end=f"{a1:.1f}",
           span=f"{summary.get('angle_span_deg', 0.0):.1f}"),
        tr("SAD {sad} mm, SID {sid} mm", sad=f"{summary.get('sad_mm', 0):g}", sid=f"{summary.get('sid_mm', 0):g}"),
        tr("Volume grid: {nx} × {ny} × {nz} voxels of {dx} × {dy} × {dz} mm ({sx} × {sy} × {sz} mm)",
           nx=nx, ny=ny, nz=nz, dx=f"{dx:g}", dy=f"{dy:g}", dz=f"{dz:g}", sx=f"{px:g}", sy=f"{py:g}", sz=f"{pz:g}"),
    ]
    sec = summary.get("secondary_deg")
    if sec and (abs(sec[0]) > 1e-6 or abs(sec[1]) > 1e-6):
        lines.insert(3, tr("Secondary angles: {start}° to {end}°", start=f"{sec[0]:.1f}", end=f"{sec[1]:.1f}"))
    return "\n".join(lines)


class VolumeSnapshot:
    """What writing a scene volume needs, taken in the main thread without copying: the voxel array [k, j, i] (a view
    of the node's image), its IJK -> LPS matrix (mm) and the vtkImageData it views (kept alive while a background
    thread writes it, even if the node gets new image data meanwhile)."""

    def __init__(self, array, ijk_to_lps, image):
        self.array, self.ijk_to_lps, self.image = array, ijk_to_lps, image


def snapshot_volume_node(node, label: str) -> VolumeSnapshot:
    """Main thread, no copy (a few microseconds): the voxels and geometry of a scalar volume node."""
    if node is None or node.GetImageData() is None:
        raise InputProblem(tr("The volume chosen for the {role} has no image data. What to do: load the run again.",
                              role=label))
    import slicer

    from .scene import LPS_TO_RAS, ijk_to_ras_of

    image = node.GetImageData()
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3:
        raise InputProblem(tr("The volume chosen for the {role} has {count} components per voxel; a run is a stack of "
                              "grey-value frames. What to do: choose the run's scalar volume.", role=label,
                              count=array.shape[-1] if array.ndim == 4 else array.ndim))
    return VolumeSnapshot(array, LPS_TO_RAS @ ijk_to_ras_of(node), image)  # diag(-1,-1,1) is its own inverse


def write_volume_snapshot(snapshot: VolumeSnapshot, path) -> str:
    """Write a snapshot to the NRRD file ``path`` (any thread: only numpy, SimpleITK and files; no MRML, no Qt).

    The voxel array is written unchanged (a projection stack stays [N, H, W] = [k, j, i]), in LPS as Slicer writes
    volumes, uncompressed, through a temporary file that replaces ``path`` once it is complete and reads back with
    the right size.
    """
    import numpy as np
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(snapshot.array))
    matrix = np.asarray(snapshot.ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in matrix[:3, 3]])
    image.SetDirection([float(v) for v in (matrix[:3, :3] / spacing).reshape(-1)])
    tmp = path.with_name(".partial-" + path.name)
    sitk.WriteImage(image, str(tmp), False)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    reader.ReadImageInformation()
    if tuple(reader.GetSize()) != tuple(reversed(snapshot.array.shape)):
        tmp.unlink()
        raise OSError(tr("{path} was not written completely.", path=path))
    os.replace(tmp, path)
    return str(path)


def write_volume_snapshots(targets: dict) -> dict:
    """``{role: (snapshot, path)}`` -> ``{role: written path}`` (for a background thread)."""
    return {role: write_volume_snapshot(snapshot, path) for role, (snapshot, path) in targets.items()}
