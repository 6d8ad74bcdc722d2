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

log = logging.getLogger("DRGS4D.inputs")


class InputProblem(Exception):
    """Something the user has to fix; ``str()`` is the message to show (never a traceback)."""


def readable_error(exc: BaseException) -> str:
    """A message for the panel from any exception raised while reading inputs."""
    if type(exc).__name__ == "DRGSInputError" or isinstance(exc, InputProblem):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return f"File not found: {name}. What to do: check the path, or choose the file again."
    if isinstance(exc, PermissionError):
        return f"Permission denied: {exc.filename or exc}. What to do: choose a file or folder you can read/write."
    if isinstance(exc, ImportError):
        return (f"A Python package is missing: {exc.name or exc}. What to do: press Reconstruct once to install the "
                "engine's dependencies, or choose an external Python environment that has them.")
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def input_request(case: str | None = None, fill: str | None = None, mask: str | None = None,
                  geometry: str | None = None) -> dict:
    """The input part of a request; checks that a complete set of inputs is named."""
    if case:
        if not os.path.isdir(case):
            raise InputProblem(f"The case folder does not exist: {case}. What to do: choose the folder that holds "
                               "fill_run, mask_run and transforms.json.")
        return {"case": os.fspath(case)}
    missing = [name for name, value in (("fill run", fill), ("mask run", mask), ("geometry JSON", geometry))
               if not value]
    if missing:
        raise InputProblem("Inputs are incomplete: choose " + ", ".join(missing)
                           + " (or a case folder instead).")
    for label, value in (("fill run", fill), ("mask run", mask), ("geometry JSON", geometry)):
        if not os.path.isfile(value):
            raise InputProblem(f"The {label} file does not exist: {value}. What to do: choose it again.")
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
    raise InputProblem(event.get("message") or "The inputs could not be read.")


def format_summary(summary: dict) -> str:
    """Multi-line text for the panel's input summary."""
    h, w = summary.get("detector_shape", [0, 0])
    sx, sy = (summary.get("detector_spacing_mm") or [0, 0])[:2]
    a0, a1 = summary.get("primary_deg", [0, 0])
    nx, ny, nz = summary.get("volume_resolution", [0, 0, 0])
    dx, dy, dz = summary.get("volume_spacing_mm", [0, 0, 0])
    px, py, pz = summary.get("volume_size_mm", [0, 0, 0])
    lines = [
        f"{summary.get('name', 'case')}: {summary.get('n_frames', '?')} frames",
        f"Detector: {w} × {h} pixels at {sx:g} × {sy:g} mm",
        f"Angles: {a0:.1f}° to {a1:.1f}° ({summary.get('angle_span_deg', 0.0):.1f}° arc)",
        f"SAD {summary.get('sad_mm', 0):g} mm, SID {summary.get('sid_mm', 0):g} mm",
        f"Volume grid: {nx} × {ny} × {nz} voxels of {dx:g} × {dy:g} × {dz:g} mm ({px:g} × {py:g} × {pz:g} mm)",
    ]
    sec = summary.get("secondary_deg")
    if sec and (abs(sec[0]) > 1e-6 or abs(sec[1]) > 1e-6):
        lines.insert(3, f"Secondary angles: {sec[0]:.1f}° to {sec[1]:.1f}°")
    return "\n".join(lines)


def export_volume_node(node, folder: str | os.PathLike, name: str) -> str:
    """Write a scalar volume node to ``folder/name.nrrd`` so that the worker can read it.

    The voxel array is written unchanged (a projection stack stays [N, H, W] = [k, j, i]); the file is LPS, as
    Slicer always writes.  SimpleITK is used when the MRML storage node cannot write (e.g. missing image data).
    """
    if node is None or node.GetImageData() is None:
        raise InputProblem(f"The volume chosen for the {name} has no image data. What to do: load the run again.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nrrd"
    import slicer

    scene = node.GetScene()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    if scene is not None:
        scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        ok = storage.WriteData(node)
    finally:
        if scene is not None:
            scene.RemoveNode(storage)
    if ok and path.is_file():
        return str(path)
    log.warning("MRML storage could not write %s; falling back to SimpleITK", path)
    import numpy as np
    import SimpleITK as sitk

    from .scene import ijk_to_ras_of, LPS_TO_RAS

    array = slicer.util.arrayFromVolume(node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ijk_to_lps = LPS_TO_RAS @ ijk_to_ras_of(node)  # diag(-1,-1,1) is its own inverse
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    image.SetDirection([float(d) for d in (ijk_to_lps[:3, :3] / spacing).reshape(-1)])
    sitk.WriteImage(image, str(path))
    return str(path)
