"""Checks of user inputs: ``transforms.json`` content, detected intensities, requested views.

Every problem a user can fix raises :class:`drgs_core.errors.DRGSInputError` whose message says what is wrong and
where, what was found, what was expected and what to do.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from ..geometry import VolumeGrid, view_indices

log = logging.getLogger(__name__)

#: Relative mismatch between e.g. ``volume_phy`` and ``volume_resolution * volume_spacing`` above which the
#: reader refuses the file; smaller mismatches above ``_REL_WARN`` only log a warning (spacing wins).
_REL_ERROR = 1e-2
_REL_WARN = 1e-5
_MAX_LISTED = 5


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def _first_indices(indices, limit: int = _MAX_LISTED) -> str:
    indices = [int(i) for i in indices]
    text = ", ".join(str(i) for i in indices[:limit])
    return text + (", ..." if len(indices) > limit else "")


# ------------------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------------------
def load_json(path, what: str = "geometry file") -> dict:
    """Read a JSON object from `path`; syntax errors name the line and column."""
    path = Path(path)
    if not path.is_file():
        raise DRGSInputError(f"the {what} {path.name} does not exist", str(path),
                             "a transforms.json-style JSON file", "check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DRGSInputError(f"the {what} {path} is not UTF-8 text", f"undecodable byte at offset {exc.start}",
                             "a JSON text file", "re-save the file as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        line = text.splitlines()[exc.lineno - 1] if 0 < exc.lineno <= len(text.splitlines()) else ""
        raise DRGSInputError(
            f"the {what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            f"line {exc.lineno}: {line.strip()[:80]!r}", "valid JSON (double-quoted keys, no trailing commas)",
            f"fix the syntax at line {exc.lineno} of {path.name}") from None
    if not isinstance(data, dict):
        raise DRGSInputError(f"the {what} {path} does not hold a JSON object", f"a JSON {_type_name(data)}",
                             "an object {\"sad\": ..., \"sid\": ..., \"frames\": [...], ...}",
                             "write the geometry as a JSON object with the keys of the 4DRGS transforms.json")
    return data


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Keys:
    """Typed access to the keys of one JSON object, with messages that name the file and key."""

    def __init__(self, data: dict, source: str, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def missing(self, key: str, expected: str) -> DRGSInputError:
        present = ", ".join(sorted(map(str, self.data))) or "no keys"
        return DRGSInputError(f"{self.source}: key '{self.name(key)}' is missing", f"keys present: {present}",
                              expected, f"add '{self.name(key)}' to {Path(self.source).name}")

    def ill_typed(self, key: str, value, expected: str) -> DRGSInputError:
        return DRGSInputError(f"{self.source}: key '{self.name(key)}' has the wrong type or value",
                              f"{_type_name(value)} {_short(value)}", expected,
                              f"correct '{self.name(key)}' in {Path(self.source).name}")

    def has(self, key: str) -> bool:
        return key in self.data

    def number(self, key: str, *, positive: bool = False, required: bool = True, default=None):
        if key not in self.data:
            if required:
                raise self.missing(key, "a number" + (" > 0" if positive else ""))
            return default
        value = self.data[key]
        expected = "a finite number" + (" > 0" if positive else "")
        if not _is_number(value) or not math.isfinite(value) or (positive and value <= 0):
            raise self.ill_typed(key, value, expected)
        return float(value)

    def integer(self, key: str, *, minimum: int = 1, required: bool = True):
        if key not in self.data:
            if required:
                raise self.missing(key, f"an integer >= {minimum}")
            return None
        value = self.data[key]
        if not _is_number(value) or not float(value).is_integer() or value < minimum:
            raise self.ill_typed(key, value, f"an integer >= {minimum}")
        return int(value)

    def vector(self, key: str, n: int, *, integer: bool = False, positive: bool = True, required: bool = True,
               allow_scalar: bool = False):
        kind = "integers" if integer else "numbers"
        expected = f"a list of {n} {'positive ' if positive else ''}{kind}"
        if allow_scalar:
            expected += " (or one number for all axes)"
        if key not in self.data:
            if required:
                raise self.missing(key, expected)
            return None
        value = self.data[key]
        if allow_scalar and _is_number(value):
            value = [value] * n
        if not isinstance(value, list) or len(value) != n or not all(_is_number(v) for v in value):
            raise self.ill_typed(key, self.data[key], expected)
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)) or \
                (integer and not np.all(arr == np.round(arr))):
            raise self.ill_typed(key, self.data[key], expected)
        return arr.astype(np.int64) if integer else arr


def _consistent(source: str, what_a: str, a: np.ndarray, what_b: str, b: np.ndarray, fix: str) -> None:
    """Compare two derivations of the same lengths; error above 1 %, warning above 1e-5 (relative)."""
    rel = np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))
    if rel > _REL_ERROR:
        raise DRGSInputError(f"{source}: {what_a} and {what_b} disagree", f"{what_a} = {a.tolist()}, "
                             f"{what_b} = {b.tolist()}", "equal values (within 1 %)", fix)
    if rel > _REL_WARN:
        log.warning("%s: %s = %s differs from %s = %s by %.2g (relative); using the spacing", source, what_a,
                    a.tolist(), what_b, b.tolist(), rel)


# ------------------------------------------------------------------------------------------------------------
# transforms.json
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TransformsInfo:
    """The parsed content of a ``transforms.json``-style geometry file (units: mm, radians).

    proj_resolution is (W, H) or None when the file does not give it; proj_spacing (sx, sy) or None when only
    proj_phy is given (then it is derived once the image size is known).
    """

    grid: VolumeGrid
    sad: float
    sid: float
    primary_angles: np.ndarray
    secondary_angles: np.ndarray | None
    frame_files: list
    n_views: int | None
    proj_resolution: tuple | None
    proj_spacing: np.ndarray | None
    proj_phy: np.ndarray | None
    source: str
    extra: dict = field(default_factory=dict)

    def detector_spacing(self, width: int, height: int) -> tuple[float, float]:
        """(sx, sy) mm per pixel, from proj_spacing or else proj_phy / (W, H)."""
        size = np.array([width, height], float)
        if self.proj_spacing is not None:
            if self.proj_phy is not None:
                _consistent(self.source, "proj_phy", self.proj_phy, "[W, H] * proj_spacing", size * self.proj_spacing,
                            "make proj_phy = proj_resolution * proj_spacing (mm), or drop proj_phy")
            return float(self.proj_spacing[0]), float(self.proj_spacing[1])
        derived = self.proj_phy / size
        return float(derived[0]), float(derived[1])


def _check_radians(source: str, key: str, angles: np.ndarray) -> None:
    big = np.flatnonzero(np.abs(angles) > 2 * np.pi)
    if big.size:
        k = int(big[np.argmax(np.abs(angles[big]))])
        raise DRGSInputError(
            f"{source}: {key} values look like degrees, not radians",
            f"{big.size} of {angles.size} frames have |{key}| > 2*pi (largest {angles[k]:g} at frame {k}; "
            f"frames {_first_indices(big)})",
            f"radians, |{key}| <= 2*pi (6.283)",
            f"convert the angles with radians = degrees * pi / 180 (numpy.deg2rad) and save {Path(source).name}")


def parse_transforms(data: dict, source: str = "transforms.json", use_secondary: bool = True) -> TransformsInfo:
    """Validate a ``transforms.json`` object and return its typed content.

    Required keys: ``volume_resolution`` [nx, ny, nz]; ``volume_spacing`` (mm) or ``volume_phy`` (mm);
    ``sad``, ``sid`` (mm); ``proj_spacing`` [sx, sy] (mm/pixel) or ``proj_phy`` [W*sx, H*sy] (mm);
    ``frames`` (list of objects with ``PrimaryAngle`` in radians, optional ``SecondaryAngle`` in radians,
    optional ``file``).  Optional but checked when present: ``N_views``, ``proj_resolution`` [W, H].
    With ``use_secondary=False`` (or no frame giving it) the secondary angles are 0 as in the reference code;
    frames that lack ``SecondaryAngle`` while others have it get 0.
    """
    keys = _Keys(data, source)
    resolution = keys.vector("volume_resolution", 3, integer=True)
    spacing = keys.vector("volume_spacing", 3, required=False, allow_scalar=True)
    phy = keys.vector("volume_phy", 3, required=False, allow_scalar=True)
    if spacing is None and phy is None:
        raise keys.missing("volume_spacing", "'volume_spacing' [dx, dy, dz] mm or 'volume_phy' [px, py, pz] mm")
    if spacing is None:
        spacing = phy / resolution
    elif phy is not None:
        _consistent(source, "volume_phy", phy, "volume_resolution * volume_spacing", resolution * spacing,
                    "make volume_phy = volume_resolution * volume_spacing (mm), or drop volume_phy")
    try:
        grid = VolumeGrid(tuple(int(r) for r in resolution), tuple(spacing))
    except DRGSInputError as exc:
        raise DRGSInputError(f"{source}: {exc.what}", exc.found, exc.expected, exc.fix) from None

    sad = keys.number("sad", positive=True)
    sid = keys.number("sid", positive=True)
    extent = np.asarray(grid.physical_size, float)
    if sad <= 0.5 * extent.max():
        raise DRGSInputError(f"{source}: the X-ray source would be inside the reconstruction volume",
                             f"sad = {sad:g} mm, volume {' x '.join(f'{e:g}' for e in extent)} mm",
                             f"sad (source to isocentre, mm) well above half the volume size ({0.5 * extent.max():g} "
                             "mm); C-arms have about 600-800 mm", "check sad/sid (millimetres) and volume_spacing")
    if sad <= 0.5 * float(np.linalg.norm(extent)):
        log.warning("%s: sad = %g mm is within the volume's corners (half diagonal %g mm)", source, sad,
                    0.5 * float(np.linalg.norm(extent)))
    n_views = keys.integer("N_views", required=False)
    proj_resolution = keys.vector("proj_resolution", 2, integer=True, required=False)
    proj_spacing = keys.vector("proj_spacing", 2, required=False, allow_scalar=True)
    proj_phy = keys.vector("proj_phy", 2, required=False, allow_scalar=True)
    if proj_spacing is None and proj_phy is None:
        raise keys.missing("proj_spacing", "'proj_spacing' [sx, sy] mm per pixel or 'proj_phy' [W*sx, H*sy] mm")
    # proj_phy vs proj_spacing is checked against the real image size in TransformsInfo.detector_spacing

    if "frames" not in data:
        raise keys.missing("frames", "a list with one object per frame: {\"file\": ..., \"PrimaryAngle\": radians}")
    frames = data["frames"]
    if not isinstance(frames, list) or not frames:
        raise keys.ill_typed("frames", frames, "a non-empty list with one object per frame")
    primary, secondary, files = [], [], []
    any_secondary = False
    for k, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise keys.ill_typed(f"frames[{k}]", frame, "an object {\"file\": ..., \"PrimaryAngle\": radians}")
        fk = _Keys(frame, source, prefix=f"frames[{k}].")
        primary.append(fk.number("PrimaryAngle"))
        sec = fk.number("SecondaryAngle", required=False)
        any_secondary |= sec is not None
        secondary.append(0.0 if sec is None else sec)
        name = frame.get("file", f"frame_{k:04d}")
        if not isinstance(name, str):
            raise fk.ill_typed("file", name, "a string (the frame's name)")
        files.append(name)
    primary = np.asarray(primary, dtype=np.float64)
    secondary = np.asarray(secondary, dtype=np.float64)
    _check_radians(source, "PrimaryAngle", primary)
    _check_radians(source, "SecondaryAngle", secondary)
    check_angles(source, primary, secondary)
    if n_views is not None and n_views != len(frames):
        raise DRGSInputError(f"{source}: N_views does not match the number of entries in 'frames'",
                             f"N_views = {n_views}, len(frames) = {len(frames)}", "equal counts",
                             "make N_views the number of frames (images) and list one entry per frame")
    if any_secondary and not use_secondary:
        log.info("%s: SecondaryAngle present but ignored (use_secondary=False)", source)
    use = any_secondary and use_secondary
    known = {"volume_resolution", "volume_spacing", "volume_phy", "sad", "sid", "N_views", "proj_resolution",
             "proj_spacing", "proj_phy", "frames"}
    return TransformsInfo(
        grid=grid, sad=sad, sid=sid, primary_angles=primary, secondary_angles=secondary if use else None,
        frame_files=files, n_views=n_views,
        proj_resolution=None if proj_resolution is None else (int(proj_resolution[0]), int(proj_resolution[1])),
        proj_spacing=proj_spacing, proj_phy=proj_phy, source=source,
        extra={k: v for k, v in data.items() if k not in known})


def check_angles(source: str, primary: np.ndarray, secondary: np.ndarray) -> None:
    """Degenerate orbits are errors; repeated or unsorted angles only warnings (real runs may have them)."""
    if primary.size < 2:
        return
    span = float(np.degrees(np.ptp(primary)) + np.degrees(np.ptp(secondary)))
    if span < 1.0:
        raise DRGSInputError(f"{source}: all frames were taken from (nearly) the same direction",
                             f"PrimaryAngle spans {np.degrees(np.ptp(primary)):.3g} degrees over {primary.size} "
                             "frames", "a rotational run (typically 180-200 degrees)",
                             "check that PrimaryAngle is filled per frame (radians) in this file")
    pairs = np.round(np.stack([primary, secondary], 1), 9)
    n_dup = primary.size - np.unique(pairs, axis=0).shape[0]
    if n_dup:
        log.warning("%s: %d frames repeat the angles of another frame", source, n_dup)
    steps = np.diff(primary)
    if np.any(steps > 0) and np.any(steps < 0):
        log.warning("%s: PrimaryAngle is not monotonic over the frames (%d reversals); frames are expected in "
                    "acquisition order", source, int(np.sum(np.diff(np.sign(steps[steps != 0])) != 0)))


def check_image_count(info: TransformsInfo, n_images: int, images: str) -> None:
    """The number of images must equal len(frames) (and N_views, already checked equal to it)."""
    n_frames = info.primary_angles.size
    if n_frames != n_images:
        found = f"{n_images} images in {images}, {n_frames} entries in 'frames'"
        if info.n_views is not None:
            found += f", N_views = {info.n_views}"
        raise DRGSInputError(f"{info.source}: the number of frames does not match the images", found,
                             "one 'frames' entry (and N_views) per image of the fill and mask runs",
                             "use the transforms.json that belongs to these runs, or fix N_views/frames")


def check_detector_size(info: TransformsInfo, width: int, height: int, images: str) -> None:
    """proj_resolution [W, H] must match the image size (columns W, rows H)."""
    if info.proj_resolution is None or tuple(info.proj_resolution) == (width, height):
        return
    hint = ""
    if tuple(info.proj_resolution) == (height, width):
        hint = " (the values look swapped: proj_resolution is [W, H] = [columns, rows])"
    raise DRGSInputError(f"{info.source}: proj_resolution does not match the image size{hint}",
                         f"proj_resolution = {list(info.proj_resolution)}, images in {images} are "
                         f"W x H = {width} x {height} pixels",
                         "proj_resolution = [W, H] of the images",
                         f"set proj_resolution to [{width}, {height}] or use the matching images")


# ------------------------------------------------------------------------------------------------------------
# intensities
# ------------------------------------------------------------------------------------------------------------
def sanitise_intensities(run: np.ndarray, what: str, strict: bool = False) -> tuple[np.ndarray, dict]:
    """Make a detected-intensity run [N, H, W] safe for the logarithm, in place.

    Policy: pixels that are not finite or not > 0 are replaced by the smallest positive finite value of the run
    and a warning is logged; with ``strict=True`` such pixels raise instead.  A run with no positive finite
    pixel at all always raises.  Returns (run, report) where report counts what was replaced.
    """
    report = {"replaced": 0, "non_finite": 0, "non_positive": 0, "frames": []}
    if run.size and run.min() > 0 and np.isfinite(run.max()):
        return run, report  # the usual case in two fast passes (a NaN minimum compares False)
    finite = np.isfinite(run)
    bad = ~finite
    bad |= run <= 0  # NaN compares False, already counted as non-finite
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return run, report
    n_nonfinite = int(run.size - np.count_nonzero(finite))
    n_nonpos = n_bad - n_nonfinite
    per_frame = bad.reshape(run.shape[0], -1).any(axis=1)
    frames = np.flatnonzero(per_frame)
    found = (f"{n_bad} of {run.size} pixels ({n_nonfinite} non-finite, {n_nonpos} <= 0) in {frames.size} of "
             f"{run.shape[0]} frames (frame indices {_first_indices(frames)})")
    if n_bad == run.size:
        raise DRGSInputError(f"the {what} has no positive finite intensity", found,
                             "detected X-ray intensities > 0 (the reader takes their logarithm)",
                             "check that this file holds the raw fill/mask run, not a DSA or log image")
    whole = np.flatnonzero(bad.reshape(run.shape[0], -1).all(axis=1))
    if whole.size:
        raise DRGSInputError(f"the {what} has frames without any valid intensity", f"frames {_first_indices(whole)} "
                             f"are entirely non-finite or <= 0 ({found})",
                             "every frame holding detected X-ray intensities > 0",
                             "export the run again; a frame with no data cannot be reconstructed from")
    if strict:
        raise DRGSInputError(f"the {what} has non-positive or non-finite intensities", found,
                             "detected X-ray intensities > 0 everywhere",
                             "fix the images, or read with strict=False to replace these pixels by the "
                             "smallest positive value of the run")
    floor = run[~bad].min()
    run[bad] = floor
    log.warning("%s: %s; replaced by the smallest positive value %g (log-safe)", what, found, float(floor))
    report.update(replaced=n_bad, non_finite=n_nonfinite, non_positive=n_nonpos,
                  frames=[int(f) for f in frames], floor=float(floor))
    return run, report


# ------------------------------------------------------------------------------------------------------------
# views
# ------------------------------------------------------------------------------------------------------------
def check_views(case, n_views) -> np.ndarray:
    """Training frame indices for `n_views` views of `case` (METHOD §6), with a clear error when impossible.

    `case` is a :class:`Case` (or anything with ``n_frames``, or an int frame count).  Returns int64 [n_views].
    """
    n_frames = int(case) if isinstance(case, (int, np.integer)) else int(case.n_frames)
    name = getattr(case, "name", None)
    where = f"case '{name}'" if name else "the case"
    if isinstance(n_views, bool) or not isinstance(n_views, (int, np.integer)):
        if isinstance(n_views, (float, np.floating)) and float(n_views).is_integer():
            n_views = int(n_views)
        else:
            raise DRGSInputError("the number of training views must be a whole number",
                                 f"{_type_name(n_views)} {_short(n_views)}", f"an integer in 1..{n_frames}",
                                 "pass --views with an integer such as 30")
    n_views = int(n_views)
    if n_views > n_frames:
        raise DRGSInputError("more training views requested than the case has frames",
                             f"{n_views} views requested, {where} has {n_frames} frames",
                             f"between 1 and {n_frames}", f"pass --views with a value in 1..{n_frames}")
    return view_indices(n_frames, n_views)
