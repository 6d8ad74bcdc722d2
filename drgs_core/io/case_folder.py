"""The public 4DRGS "case folder" (METHOD §2): reading and writing.

A case folder holds ``fill_run`` and ``mask_run`` (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.nhdr``; detected
intensities, SimpleITK array [N, H, W] = frame, detector row v, column u) and ``transforms.json`` (geometry in mm
and radians).  DSA = max(log(mask) - log(fill), 0), float32, dimensionless line integrals.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from ..geometry import ConeBeamGeometry, frame_times
from .atomic import write_text_atomic
from .case import Case
from .validation import (check_detector_size, check_image_count, load_json, parse_transforms,
                         sanitise_intensities)
from .volumes import read_stack, write_stack

log = logging.getLogger(__name__)

RUN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
FILL_STEM, MASK_STEM, TRANSFORMS = "fill_run", "mask_run", "transforms.json"

#: Unattenuated intensity used by write_case when a case has no raw runs: mask = I0 everywhere and
#: fill = I0 * exp(-dsa), so that log(mask) - log(fill) = dsa.  Any positive value works (it cancels in the
#: log difference); 1e4 resembles detector counts.
DEFAULT_I0 = 1.0e4

#: negative / positive mass of log(mask) - log(fill) above which the runs are taken as swapped: noise alone
#: gives about 1 and contrast adds to the positive side only (the noisy tiny phantom: 0.38, swapped 2.6)
SWAP_RATIO = 1.5

_CHUNK_PIXELS = 1 << 24  # frames are processed in blocks of about this many pixels (limits temporaries)


def _frame_chunks(shape):
    n, h, w = shape
    step = max(1, _CHUNK_PIXELS // max(1, h * w))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def dsa_from_runs(fill: np.ndarray, mask: np.ndarray, what: str = "the runs") -> np.ndarray:
    """DSA [N, H, W] float32 = max(log(mask) - log(fill), 0) = max(log(mask / fill), 0), in blocks of frames.

    Both runs must be positive (see sanitise_intensities).  The ratio and its logarithm are taken in float32
    (35x faster than two float64 logarithms at 133 x 512^2, and within 1e-7 of them: the float32 rounding of the
    result); a block whose ratio leaves the float32 range falls back to float64.  Contrast only absorbs, so the
    log difference is mostly positive; when its negative part outweighs the positive one by far the runs are
    swapped: an error.
    """
    out = np.empty(fill.shape, dtype=np.float32)
    pos = neg = 0.0
    for s in _frame_chunks(fill.shape):
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            d = np.divide(mask[s], fill[s], dtype=np.float32)
            np.log(d, out=d)
        if not np.isfinite(d).all():
            d = (np.log(mask[s].astype(np.float64)) - np.log(fill[s].astype(np.float64))).astype(np.float32)
        total = float(d.sum(dtype=np.float64))
        np.maximum(d, 0.0, out=out[s])
        above = float(out[s].sum(dtype=np.float64))
        pos += above
        neg += above - total
    if neg > SWAP_RATIO * pos and neg > 0:
        raise DRGSInputError(f"the fill and mask runs look swapped ({what})",
                             f"log(mask) - log(fill) is mostly negative (negative part {neg:.3g}, positive part "
                             f"{pos:.3g})", "contrast-filled frames darker than the mask frames",
                             "swap the files: fill_run is the run with contrast, mask_run the one without "
                             "(--fill/--mask)")
    return out


def _listing(folder: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(cannot list the folder)"
    if not names:
        return "the folder is empty"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _find_run(folder: Path, stem: str) -> Path:
    found = [folder / (stem + suffix) for suffix in RUN_SUFFIXES if (folder / (stem + suffix)).is_file()]
    if not found:
        raise DRGSInputError(f"the case folder {folder} has no {stem} image",
                             f"folder contents: {_listing(folder)}",
                             f"{stem}.nii.gz (or {stem}.nii / {stem}.nrrd / {stem}.nhdr)",
                             f"put the {stem.replace('_', ' ')} images in the folder under that name")
    if len(found) > 1:
        log.info("%s: several %s files (%s); using %s", folder, stem, ", ".join(p.name for p in found),
                 found[0].name)
    return found[0]


def _build_case(fill_path: Path, mask_path: Path, json_path: Path, *, strict: bool, use_secondary: bool,
                name: str, source: Path) -> Case:
    info = parse_transforms(load_json(json_path, "geometry file"), str(json_path), use_secondary=use_secondary)
    # the two runs in parallel: inflating a .gz (zlib) and numpy release the GIL, so two cores read at once
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(read_stack, p, f"{what} {p.name}")
                for p, what in ((fill_path, "fill run"), (mask_path, "mask run"))]
        fill, mask = (job.result() for job in jobs)  # the fill run's error first when both fail
    if fill.shape != mask.shape:
        raise DRGSInputError("the fill and mask runs have different shapes",
                             f"fill {fill_path.name} [N, H, W] = {list(fill.shape)}, "
                             f"mask {mask_path.name} [N, H, W] = {list(mask.shape)}",
                             "identical shapes (same frames, same detector size)",
                             "use the fill and mask runs of the same acquisition")
    n, h, w = fill.shape
    images = f"{fill_path.name}/{mask_path.name}"
    check_image_count(info, n, images)
    check_detector_size(info, w, h, images)
    fill, fill_report = sanitise_intensities(fill, f"fill run {fill_path.name}", strict=strict)
    mask, mask_report = sanitise_intensities(mask, f"mask run {mask_path.name}", strict=strict)
    detector_spacing = info.detector_spacing(w, h)
    try:
        geometry = ConeBeamGeometry(info.sad, info.sid, (h, w), detector_spacing, info.primary_angles,
                                    info.secondary_angles)
    except DRGSInputError as exc:
        raise DRGSInputError(f"{json_path}: {exc.what}", exc.found, exc.expected, exc.fix) from None
    dsa = dsa_from_runs(fill, mask, images)
    meta = {
        "fill_path": str(fill_path), "mask_path": str(mask_path), "transforms_path": str(json_path),
        "frame_files": info.frame_files, "sanitised": {"fill": fill_report, "mask": mask_report},
        "secondary_used": info.secondary_angles is not None, "extra_keys": info.extra,
    }
    log.info("read case %s: %d frames of %dx%d, grid %s", name, n, w, h, info.grid.resolution)
    return Case(dsa=dsa, geometry=geometry, grid=info.grid, times=frame_times(n), fill=fill, mask=mask,
                name=name, source=source, meta=meta)


def read_case(path, *, strict: bool = False, use_secondary: bool = True) -> Case:
    """Read a public-format case folder (METHOD §2) into a :class:`Case`.

    path: the folder (or its ``transforms.json``).  Runs ``fill_run``/``mask_run`` are looked up as ``.nii.gz``,
    ``.nii``, ``.nrrd``, ``.nhdr`` in that order.  Intensities that are not finite or not > 0 are replaced by
    the smallest positive value of their run with a warning (``strict=True``: raise).  ``use_secondary``: use
    each frame's ``SecondaryAngle`` when present (the reference implementation ignores it, i.e. 0; pass False
    to reproduce that).  Frame times are k / N.  The returned case keeps ``fill`` and ``mask`` (float32).
    Raises DRGSInputError for every problem a user can fix.
    """
    folder = Path(path)
    if folder.is_file() and folder.name.lower().endswith(".json"):
        json_path, folder = folder, folder.parent
    else:
        json_path = folder / TRANSFORMS
    if not folder.is_dir():
        parent = folder.parent
        raise DRGSInputError("the case folder does not exist", str(folder),
                             "a folder with fill_run.nii.gz, mask_run.nii.gz and transforms.json",
                             f"check the path (the parent {parent} "
                             f"{'exists' if parent.is_dir() else 'does not exist either'})")
    if not json_path.is_file():
        raise DRGSInputError(f"the case folder {folder} has no {json_path.name}", f"folder contents: "
                             f"{_listing(folder)}", "transforms.json with the acquisition geometry",
                             "add the transforms.json that came with the runs")
    fill_path = _find_run(folder, FILL_STEM)
    mask_path = _find_run(folder, MASK_STEM)
    return _build_case(fill_path, mask_path, json_path, strict=strict, use_secondary=use_secondary,
                       name=folder.resolve().name, source=folder)


def read_runs(fill_path, mask_path, geometry_json, *, strict: bool = False, use_secondary: bool = True,
              name: str | None = None) -> Case:
    """Read a case from separate fill/mask files (NIfTI or NRRD) and a ``transforms.json``-style geometry file.

    Same checks and options as :func:`read_case`; name defaults to the fill file's stem.
    """
    paths = {"fill run": Path(fill_path), "mask run": Path(mask_path), "geometry file": Path(geometry_json)}
    for what, p in paths.items():
        if not p.is_file():
            folder = p.parent
            contents = _listing(folder) if folder.is_dir() else f"the folder {folder} does not exist"
            raise DRGSInputError(f"the {what} {p.name} does not exist", f"{folder}: {contents}",
                                 f"an existing {what} file", "check the path")
    fill_p = paths["fill run"]
    if name is None:
        name = fill_p.name.split(".")[0]
    return _build_case(fill_p, paths["mask run"], paths["geometry file"], strict=strict,
                       use_secondary=use_secondary, name=name, source=fill_p.parent)


def transforms_dict(case: Case, frame_names=None) -> dict:
    """The ``transforms.json`` content for `case` (all keys of METHOD §2; angles in radians, lengths in mm)."""
    g, grid = case.geometry, case.grid
    n = g.n_frames
    names = list(frame_names) if frame_names is not None else [f"frame_{k:04d}" for k in range(n)]
    data = dict(grid.to_json())
    data.update(g.to_json())
    data["N_views"] = n
    data["frames"] = [{"file": names[k], "PrimaryAngle": float(g.primary_angles[k]),
                       "SecondaryAngle": float(g.secondary_angles[k])} for k in range(n)]
    return data


def _runs_match_dsa(case: Case) -> bool:
    """True when the case's fill/mask reproduce its DSA (to float32 precision)."""
    for s in _frame_chunks(case.dsa.shape):
        f, m = case.fill[s], case.mask[s]
        if not (np.all(np.isfinite(f)) and np.all(f > 0) and np.all(np.isfinite(m)) and np.all(m > 0)):
            return False
        d = dsa_from_runs(f, m)
        if not np.allclose(d, case.dsa[s], rtol=1e-5, atol=1e-5):
            return False
    return True


def write_case(case: Case, folder, *, i0: float = DEFAULT_I0) -> Path:
    """Write `case` as a public-format case folder: fill_run.nii.gz, mask_run.nii.gz, transforms.json.

    If the case carries ``fill`` and ``mask`` runs that reproduce its DSA they are written as they are (float32);
    otherwise (no runs, or runs inconsistent with ``case.dsa``, which is then authoritative and a warning is
    logged) the runs are synthesised: mask = `i0` everywhere (default DEFAULT_I0 = 1e4) and
    fill = i0 * exp(-dsa), so that read_case gives back the DSA to float32 precision.  Frame names are
    ``frame_0000``, ...; angles in radians; SecondaryAngle always written.  Frame times are not stored (the format
    implies k / N; other times log a warning).  Each file is written atomically.  Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dsa = np.asarray(case.dsa, dtype=np.float32)
    n = dsa.shape[0]
    g = case.geometry
    if dsa.ndim != 3 or g.n_frames != n or (dsa.shape[1], dsa.shape[2]) != (g.height, g.width):
        raise DRGSInputError("the case's DSA stack does not match its geometry", f"dsa shape {list(dsa.shape)}, "
                             f"geometry {g.n_frames} frames of H x W = {g.height} x {g.width}",
                             "dsa [N, H, W] with N frames and the detector size of the geometry",
                             "build the Case with matching dsa and geometry")
    if not np.all(np.isfinite(dsa)) or dsa.min(initial=0.0) < 0:
        raise DRGSInputError("the case's DSA has negative or non-finite values",
                             f"min {np.nanmin(dsa):g}, {int(np.sum(~np.isfinite(dsa)))} non-finite",
                             "finite line integrals >= 0 (the format stores log(mask) - log(fill) clipped at 0)",
                             "clip the DSA at 0 and remove NaN/inf before writing")
    if not np.isfinite(i0) or i0 <= 0:
        raise DRGSInputError("i0 must be a positive number", repr(i0), "e.g. 1e4", "pass a positive i0")
    if case.times is not None and not np.allclose(np.asarray(case.times, float), frame_times(n), atol=1e-9):
        log.warning("case %s: frame times differ from k/N but the case format stores none; read_case will "
                    "return k/N", case.name)

    use_runs = (case.fill is not None and case.mask is not None
                and np.shape(case.fill) == dsa.shape and np.shape(case.mask) == dsa.shape)
    if use_runs and not _runs_match_dsa(case):
        log.warning("case %s: fill/mask runs do not reproduce the DSA; writing runs synthesised from the DSA "
                    "(I0 = %g)", case.name, i0)
        use_runs = False
    if use_runs:
        fill = np.asarray(case.fill, dtype=np.float32)
        mask = np.asarray(case.mask, dtype=np.float32)
    else:
        mask = np.full(dsa.shape, i0, dtype=np.float32)
        fill = np.empty(dsa.shape, dtype=np.float32)
        for s in _frame_chunks(dsa.shape):
            fill[s] = i0 * np.exp(-dsa[s].astype(np.float64))
        if np.any(fill < np.finfo(np.float32).tiny):
            limit = float(np.log(i0 / np.finfo(np.float32).tiny))
            raise DRGSInputError("the DSA is too large to store as float32 intensities",
                                 f"max DSA {float(dsa.max()):g}: i0 * exp(-dsa) underflows float32",
                                 f"DSA line integrals below log(i0 / 1.2e-38) = {limit:.1f}",
                                 "check the DSA scale, or pass a larger i0")
    spacing = g.detector_spacing
    write_stack(folder / f"{MASK_STEM}.nii.gz", mask, spacing)
    write_stack(folder / f"{FILL_STEM}.nii.gz", fill, spacing)
    names = case.meta.get("frame_files") if isinstance(case.meta, dict) else None
    if not (isinstance(names, list) and len(names) == n and all(isinstance(x, str) for x in names)):
        names = None
    text = json.dumps(transforms_dict(case, names), indent=2)
    write_text_atomic(folder / TRANSFORMS, text + "\n")
    log.info("wrote case %s to %s (%s runs)", case.name, folder, "original" if use_runs else "synthesised")
    return folder
