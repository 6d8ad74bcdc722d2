"""DICOM import of rotational angiography: classic XA and Enhanced XA multi-frame runs -> a DSA `Case`.

Public API::

    list_runs(sources) -> list[Run]                 # every multi-frame XA / Enhanced XA run found, usable or not
    find_pairs(runs) -> list[Pair]                  # compatible (mask, fill) rotations, best first
    import_dicom(sources, fill=None, mask=None, grid=None) -> DicomImport   # .case, .provenance, .pair
    write_import(result, folder) -> Path            # public case folder + provenance.json, all or nothing

`sources`: a folder (scanned recursively, any file names; a DICOMDIR is not needed and is skipped), a file, a
text file ending in ``.txt`` with one path per line, or a list of those.

Geometry (DICOM PS3.3 C.8.7.5, C.8.19.6; docs/DICOM.md derives it):

- Positioner angles (degrees) give the direction from the isocentre to the detector in patient LPS:
  n(a, b) = (sin a cos b, -cos a cos b, sin b), primary a (+90 = LAO, patient left), secondary b (+90 = cranial).
- Engine angles (radians, METHOD §3): alpha = a + 90 deg, beta = -b; the engine's world frame is LPS.
- Pixel columns: XA frames are stored as seen from behind the detector looking at the patient (the radiological
  display: at LAO 0 / CRA 0 the patient's right is on the left of the image, the head at the top); the engine's
  detector u axis runs the other way, so columns are mirrored on import.  Rows are not (row 0 = cranial side).
- sid = DistanceSourceToDetector, sad = DistanceSourceToPatient (classic) or DistanceSourceToIsocenter (Enhanced);
  detector spacing (sx, sy) = ImagerPixelSpacing (column spacing, row spacing).

Intensities: PixelIntensityRelationship LIN is used as stored, LOG through the Modality LUT, DISP is refused.
DSA = max(log(mask) - log(fill), 0), with blanked (<= 0) pixels set to 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from ..geometry import ConeBeamGeometry, VolumeGrid, frame_times
from .case import Case
from .case_folder import dsa_from_runs, write_case

log = logging.getLogger(__name__)

XA = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
KINDS = {XA: "XA", ENHANCED_XA: "Enhanced XA"}

MIN_SPAN_DEG = 60.0        # a run turning less than this is not a rotational acquisition
MAX_SECONDARY_DEG = 30.0   # the FDK initialisation assumes a nearly planar orbit
WARN_SECONDARY_DEG = 5.0
MAGNIFICATION_TOLERANCE = 0.05  # relative, EstimatedRadiographicMagnificationFactor vs SID/SOD
UNEVEN_TOLERANCE = 0.5     # a step may differ from the median step by this fraction
MAPPING = ("engine primary = DICOM PositionerPrimaryAngle + 90 deg; engine secondary = -PositionerSecondaryAngle; "
           "image columns mirrored; world frame = DICOM patient LPS (docs/DICOM.md)")


@dataclass
class Run:
    """One rotation: a multi-frame XA / Enhanced XA instance, or one half of an instance holding two rotations.

    Angles are DICOM positioner angles in degrees (unwrapped); lengths in mm; `spacing` = ImagerPixelSpacing
    (row spacing, column spacing).  `problem` says why the run cannot be used (None: usable).
    """

    id: str
    path: str
    kind: str
    sop_uid: str
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    series_description: str = ""
    series_number: int | None = None
    acquisition_time: str = ""
    vendor: str = ""
    model: str = ""
    plane: str = ""
    frames: tuple = (0, 0)
    rows: int = 0
    columns: int = 0
    primary_deg: np.ndarray = None
    secondary_deg: np.ndarray = None
    angle_rule: str = ""
    sid: float | None = None
    sod: float | None = None
    spacing: tuple | None = None
    intensity: str = ""
    problem: str | None = None
    warnings: list = field(default_factory=list)
    error: DRGSInputError | None = field(default=None, repr=False)   # the exception behind `problem`

    @property
    def n_frames(self) -> int:
        return int(self.frames[1] - self.frames[0])

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def step_deg(self) -> float:
        return float(np.median(np.abs(np.diff(self.primary_deg)))) if self.n_frames > 1 else 0.0

    def summary(self) -> dict:
        """JSON-ready facts for listings (degrees, mm)."""
        a = self.primary_deg
        b = self.secondary_deg
        return {
            "id": self.id, "path": self.path, "kind": self.kind, "sop_instance_uid": self.sop_uid,
            "series_instance_uid": self.series_uid, "study_instance_uid": self.study_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid, "series_description": self.series_description,
            "series_number": self.series_number, "acquisition_time": self.acquisition_time,
            "vendor": self.vendor, "model": self.model, "plane": self.plane, "frames": list(self.frames),
            "n_frames": self.n_frames, "rows": self.rows, "columns": self.columns,
            "primary_deg": [float(a[0]), float(a[-1])] if a is not None and a.size else None,
            "secondary_deg": [float(b.min()), float(b.max())] if b is not None and b.size else None,
            "step_deg": self.step_deg if a is not None and a.size > 1 else None,
            "angle_rule": self.angle_rule, "sid_mm": self.sid, "sod_mm": self.sod,
            "imager_pixel_spacing_mm": list(self.spacing) if self.spacing else None,
            "intensity": self.intensity, "usable": self.usable, "problem": self.problem,
            "warnings": list(self.warnings),
        }


@dataclass
class Pair:
    mask: Run
    fill: Run
    order: np.ndarray   # order[k] = mask frame (within the mask run) acquired at the angle of fill frame k
    reversed: bool

    def summary(self) -> dict:
        return {"mask": self.mask.id, "fill": self.fill.id, "reversed": bool(self.reversed),
                "plane": self.fill.plane, "n_frames": self.fill.n_frames}


@dataclass
class DicomImport:
    case: Case
    pair: Pair
    provenance: dict


# ---- reading headers ------------------------------------------------------------------------------------------

def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a dependency of the package
        raise DRGSInputError("DICOM import needs pydicom", "pydicom is not installed", "pydicom >= 3.0",
                             "pip install pydicom") from None
    return pydicom


def _files(sources) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file() and p.suffix.lower() == ".txt":
            out.extend(Path(line.strip()) for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        elif p.is_file():
            out.append(p)
        else:
            raise DRGSInputError("the DICOM source does not exist", str(p),
                                 "a folder of DICOM files, a DICOM file or a .txt list of files", "check the path")
    return list(dict.fromkeys(out))  # each file once, in order


def _get(item, keyword, default=None):
    value = getattr(item, keyword, None) if item is not None else None
    return default if value is None or value == "" else value


def _functional(ds, sequence: str, frame: int | None = None):
    """The first item of a functional-group macro sequence, per-frame first (frame given) then shared."""
    if frame is not None:
        per = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per is not None and frame < len(per):
            seq = _get(per[frame], sequence)
            if seq:
                return seq[0]
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        seq = _get(shared[0], sequence)
        if seq:
            return seq[0]
    return None


class _Where:
    """Builds DRGSInputErrors that name the file, the run and the rule."""

    def __init__(self, path, ds):
        self.path = str(path)
        self.uid = str(_get(ds, "SOPInstanceUID", "?"))

    def error(self, attribute: str, found: str, expected: str, fix: str = "") -> DRGSInputError:
        return DRGSInputError(f"{self.path}: run {self.uid}: {attribute} {found}", "", expected, fix)


def _float_list(value) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return [float(value)]
    return [float(v) for v in value]


def _classic_angles(ds, n: int, where: _Where, warnings: list) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-frame (primary, secondary) angles in degrees of a classic XA instance and the rule used."""
    motion = str(_get(ds, "PositionerMotion", "")).upper()
    angles, rules = [], []
    for name in ("Primary", "Secondary"):
        base_kw, inc_kw = f"Positioner{name}Angle", f"Positioner{name}AngleIncrement"
        base = _get(ds, base_kw)
        if base is None:
            raise where.error(base_kw, "is missing", f"the {name.lower()} angle of the first frame in degrees "
                              "(PS3.3 C.8.7.5, Type 2)", "export the run with its positioner attributes")
        base = float(base)
        inc = _float_list(_get(ds, inc_kw))
        if not inc:
            if name == "Primary" and motion == "DYNAMIC":
                raise where.error(inc_kw, "is missing", "one value per frame, or one constant step "
                                  "(PS3.3 C.8.7.5.1.3, required when PositionerMotion is DYNAMIC)")
            angles.append(np.full(n, base))
            rules.append(f"{name.lower()}: constant {base:g}")
        elif len(inc) == 1:
            angles.append(base + inc[0] * np.arange(n))
            rules.append(f"{name.lower()}: base + k * constant step {inc[0]:g} (PS3.3 C.8.7.5.1.3)")
        elif len(inc) == n:
            inc = np.asarray(inc)
            if base == 0.0 and inc[0] != 0.0:
                angles.append(inc)
                rules.append(f"{name.lower()}: increments are absolute angles, base 0 (Siemens style)")
                warnings.append(f"{inc_kw} holds absolute angles with {base_kw} 0 (Siemens style); "
                                "used as absolute angles")
            elif inc[0] != 0.0 and np.isclose(inc[0], base, atol=1e-3):
                angles.append(inc)
                rules.append(f"{name.lower()}: increments are absolute angles (first equals the base)")
                warnings.append(f"{inc_kw}[0] = {base_kw} = {base:g}: the increments look like absolute angles; "
                                "used as absolute angles")
            else:
                if inc[0] != 0.0:
                    warnings.append(f"{inc_kw}[0] = {inc[0]:g} and {base_kw} = {base:g} are both non-zero; "
                                    "used as offsets from the first frame as PS3.3 C.8.7.5.1.3 says")
                angles.append(base + inc)
                rules.append(f"{name.lower()}: base + offset from the first frame (PS3.3 C.8.7.5.1.3)")
        else:
            raise where.error(inc_kw, f"has {len(inc)} values but NumberOfFrames is {n}",
                              f"PS3.3 C.8.7.5.1.3 allows 1 or {n}",
                              "the file is damaged or was cut; export the run again")
    primary, secondary = angles
    moving = np.ptp(primary) > 1e-6 or np.ptp(secondary) > 1e-6
    if motion == "STATIC":
        if not moving:
            raise where.error("PositionerMotion", "is STATIC and the angles do not change",
                              "DYNAMIC for a rotational run (PS3.3 C.8.7.5.1.1)", "choose the rotational run")
        warnings.append("PositionerMotion is STATIC but the angle increments move (as GE writes L-arm "
                        "rotations); using the increments")
    return primary, secondary, "; ".join(rules)


def _enhanced_angles(ds, n: int, where: _Where) -> tuple[np.ndarray, np.ndarray, str]:
    primary, secondary = [], []
    for k in range(n):
        item = _functional(ds, "PositionerPositionSequence", k)
        a, b = _get(item, "PositionerPrimaryAngle"), _get(item, "PositionerSecondaryAngle")
        if a is None or b is None:
            relation = str(_get(ds, "CArmPositionerTabletopRelationship", "absent"))
            raise where.error("PositionerPositionSequence", f"gives no positioner angles for frame {k + 1} "
                              f"(CArmPositionerTabletopRelationship {relation})",
                              "per-frame or shared positioner angles (PS3.3 C.8.19.6; they are only required "
                              "when CArmPositionerTabletopRelationship is YES)",
                              "this Enhanced XA export carries no geometry: export the run as classic XA, or "
                              "with positioner data, or give a calibrated geometry")
        primary.append(float(a))
        secondary.append(float(b))
    return np.asarray(primary), np.asarray(secondary), "per-frame PositionerPositionSequence (PS3.3 C.8.19.6)"


def _distances(ds, enhanced: bool, where: _Where, warnings: list) -> tuple[float, float]:
    if enhanced:
        item = _functional(ds, "XRayGeometrySequence", 0)
        sid, sod = _get(item, "DistanceSourceToDetector"), _get(item, "DistanceSourceToIsocenter")
        names = ("XRayGeometrySequence.DistanceSourceToDetector", "XRayGeometrySequence.DistanceSourceToIsocenter")
    else:
        sid, sod = _get(ds, "DistanceSourceToDetector"), _get(ds, "DistanceSourceToPatient")
        names = ("DistanceSourceToDetector", "DistanceSourceToPatient")
    for value, name in zip((sid, sod), names):
        if value is None:
            raise where.error(name, "is missing", "the distance in mm (PS3.3 C.8.7.5 / C.8.19.6)",
                              "export the run with its geometry attributes")
    sid, sod = float(sid), float(sod)
    if not 0 < sod < sid:
        raise where.error("distances", f"are inconsistent: SOD {sod:g} mm, SID {sid:g} mm",
                          "0 < source-isocentre < source-detector distance")
    emf = _get(ds, "EstimatedRadiographicMagnificationFactor")
    if emf is not None and float(emf) > 0:
        if abs(float(emf) - sid / sod) > MAGNIFICATION_TOLERANCE * sid / sod:
            raise where.error("EstimatedRadiographicMagnificationFactor", f"is {float(emf):.4g} but SID/SOD is "
                              f"{sid / sod:.4g}", f"SID/SOD within {MAGNIFICATION_TOLERANCE:.0%} (PS3.3 C.8.7.5)",
                              "the distances do not describe this run: check the export")
    return sid, sod


def _spacing(ds, enhanced: bool, where: _Where) -> tuple[float, float]:
    source = _functional(ds, "FramePixelDataPropertiesSequence", 0) if enhanced else ds
    value = _float_list(_get(source, "ImagerPixelSpacing"))
    if len(value) != 2 or min(value) <= 0:
        raise where.error("ImagerPixelSpacing", "is missing or invalid" if not value else f"is {value}",
                          "two positive values in mm (row spacing, column spacing) at the detector; PixelSpacing "
                          "is not a substitute", "export the run with ImagerPixelSpacing")
    return value[0], value[1]


def _intensity(ds, enhanced: bool, where: _Where, warnings: list) -> str:
    source = _functional(ds, "FramePixelDataPropertiesSequence", 0) if enhanced else ds
    rel = str(_get(source, "PixelIntensityRelationship", "")).upper()
    if rel == "DISP":
        raise where.error("PixelIntensityRelationship", "is DISP", "LIN or LOG: display-processed intensities "
                          "cannot give line integrals", "export the unprocessed (LIN) run from the modality")
    if rel == "LOG" and not (_get(ds, "ModalityLUTSequence") or _get(ds, "RescaleSlope")):
        raise where.error("PixelIntensityRelationship", "is LOG but there is no Modality LUT",
                          "a ModalityLUTSequence (or rescale) that maps the stored values back to linear",
                          "export the run as LIN, or with its Modality LUT")
    if not rel:
        warnings.append("PixelIntensityRelationship is absent; assuming LIN")
        rel = "LIN"
    return rel


def _split_rotations(primary: np.ndarray) -> list[tuple[int, int]]:
    """Frame ranges of the rotations in one angle sequence: split where it reverses or jumps back."""
    n = primary.size
    if n < 3:
        return [(0, n)]
    steps = np.diff(primary)
    median = float(np.median(np.abs(steps))) or 1e-9
    main = np.sign(steps[0]) or 1.0
    for i, s in enumerate(steps):
        if abs(s) <= 1e-6 * median or np.sign(s) != main or abs(s) > 5 * median:
            k = i + 1  # a repeated turning frame, a reversal or a jump back starts the second rotation
            break
    else:
        return [(0, n)]
    # two rotations of one acquisition have the same frame count; anything else is a glitch in one rotation
    return [(0, k), (k, n)] if 2 * k == n else [(0, n)]


def _check_sequence(run: Run, where: _Where) -> None:
    """Angle-sequence rules for one rotation: monotonic, evenly spaced, a real rotation, small secondary."""
    a = run.primary_deg
    steps = np.diff(a)
    if steps.size == 0:
        raise where.error("NumberOfFrames", "is 1", "a multi-frame rotational run")
    if not (np.all(steps > 0) or np.all(steps < 0)):
        k = int(np.argmax(np.sign(steps) != np.sign(np.median(steps))))
        raise where.error("positioner primary angles", f"are not monotonic (frame {k + 1} -> {k + 2}: "
                          f"{a[k]:.2f} -> {a[k + 1]:.2f} deg)", "a steadily turning rotation",
                          "check the angle increments of the export; choose another run")
    median = float(np.median(np.abs(steps)))
    worst = int(np.argmax(np.abs(np.abs(steps) - median)))
    if abs(abs(steps[worst]) - median) > UNEVEN_TOLERANCE * median:
        raise where.error("positioner primary angles", f"are unevenly spaced (step {worst + 1}: "
                          f"{abs(steps[worst]):.3g} deg, median {median:.3g} deg)",
                          f"steps within {UNEVEN_TOLERANCE:.0%} of the median", "the run has dropped or "
                          "repeated frames: export the complete run")
    span = abs(float(a[-1] - a[0]))
    if span < MIN_SPAN_DEG:
        raise where.error("positioner primary angles", f"span only {span:.1f} deg",
                          f"a rotational run of at least {MIN_SPAN_DEG:g} deg", "choose a rotational (3D) run")
    b = np.abs(run.secondary_deg)
    if b.max() > MAX_SECONDARY_DEG:
        raise where.error("PositionerSecondaryAngle", f"reaches {b.max():.1f} deg",
                          f"at most {MAX_SECONDARY_DEG:g} deg (a nearly planar orbit)",
                          "choose a run acquired without strong cranial/caudal angulation")
    if b.max() > WARN_SECONDARY_DEG:
        run.warnings.append(f"secondary angle up to {b.max():.1f} deg: the FDK initialisation assumes a planar "
                            "orbit (the splatting model uses the true per-frame geometry)")


def _time(ds) -> str:
    date = str(_get(ds, "AcquisitionDate", _get(ds, "ContentDate", "")))
    t = str(_get(ds, "AcquisitionTime", _get(ds, "ContentTime", "")))
    dt = str(_get(ds, "AcquisitionDateTime", ""))
    return dt or (date + t)


def _plane(ds) -> str:
    """'A' or 'B' for one plane of a biplane acquisition (ImageType value 3, PS3.3 C.8.7.1.1.1), else ''."""
    value = _get(ds, "ImageType", [])
    for v in [value] if isinstance(value, str) else list(value):
        v = str(v).upper()
        if v.startswith("BIPLANE"):
            return v.split()[-1]
    return ""


def runs_in_dataset(ds, path) -> list[Run]:
    """The rotations of one dataset (header only).  Returns [] for anything that is not a multi-frame XA run;
    an unusable run comes back with `problem` set (the DRGSInputError message)."""
    sop_class = str(_get(ds, "SOPClassUID", ""))
    if sop_class not in KINDS:
        return []
    n = int(_get(ds, "NumberOfFrames", 1))
    if n < 2:
        return []
    enhanced = sop_class == ENHANCED_XA
    where = _Where(path, ds)
    uid = str(_get(ds, "SOPInstanceUID", ""))
    base = dict(path=str(path), kind=KINDS[sop_class], sop_uid=uid, series_uid=str(_get(ds, "SeriesInstanceUID", "")),
                study_uid=str(_get(ds, "StudyInstanceUID", "")),
                frame_of_reference_uid=str(_get(ds, "FrameOfReferenceUID", "")),
                series_description=str(_get(ds, "SeriesDescription", "")),
                series_number=int(_get(ds, "SeriesNumber")) if _get(ds, "SeriesNumber") is not None else None,
                acquisition_time=_time(ds), vendor=str(_get(ds, "Manufacturer", "")),
                model=str(_get(ds, "ManufacturerModelName", "")), plane=_plane(ds),
                rows=int(_get(ds, "Rows", 0)), columns=int(_get(ds, "Columns", 0)))
    warnings: list[str] = []
    try:
        if enhanced:
            primary, secondary, rule = _enhanced_angles(ds, n, where)
        else:
            primary, secondary, rule = _classic_angles(ds, n, where, warnings)
        primary = np.degrees(np.unwrap(np.radians(primary)))
        primary -= 360.0 * np.round(np.mean(primary) / 360.0)  # a run crossing +-180 deg stays continuous
        sid, sod = _distances(ds, enhanced, where, warnings)
        spacing = _spacing(ds, enhanced, where)
        intensity = _intensity(ds, enhanced, where, warnings)
        motion = str(_get(ds, "TableMotion", "")).upper()
        if motion == "DYNAMIC":
            raise where.error("TableMotion", "is DYNAMIC", "STATIC: the table must not move during the rotation",
                              "choose a run acquired without table motion")
    except DRGSInputError as exc:
        return [Run(id=uid, frames=(0, n), problem=str(exc), error=exc, warnings=warnings, **base)]
    parts = _split_rotations(primary)
    runs = []
    for i, (start, stop) in enumerate(parts):
        run = Run(id=uid if len(parts) == 1 else f"{uid}#{i + 1}", frames=(start, stop),
                  primary_deg=primary[start:stop], secondary_deg=secondary[start:stop],
                  angle_rule=rule + ("" if len(parts) == 1 else f"; rotation {i + 1} of 2 in one instance"),
                  sid=sid, sod=sod, spacing=spacing, intensity=intensity, warnings=list(warnings), **base)
        try:
            _check_sequence(run, where)
        except DRGSInputError as exc:
            run.problem, run.error = str(exc), exc
        runs.append(run)
    return runs


def list_runs(sources) -> list[Run]:
    """All multi-frame XA / Enhanced XA rotations under `sources` (usable or not), ordered by study and time."""
    pydicom = _pydicom()
    runs: list[Run] = []
    for path in _files(sources):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (or unreadable): skipped, as any viewer would
            log.debug("skipping %s: not a DICOM file", path)
            continue
        meta = getattr(ds, "file_meta", None)
        if str(_get(meta, "MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY:
            continue  # DICOMDIR: the files are found by the scan itself
        runs.extend(runs_in_dataset(ds, path))
    runs.sort(key=lambda r: (r.study_uid, r.acquisition_time, r.series_number or 0, r.id))
    log.info("found %d XA runs (%d usable) in %s", len(runs), sum(r.usable for r in runs), sources)
    return runs


# ---- pairing --------------------------------------------------------------------------------------------------

def _mismatch(mask: Run, fill: Run) -> str | None:
    """Why two runs cannot be mask and fill of one acquisition (None: they can)."""
    if mask.study_uid != fill.study_uid:
        return f"StudyInstanceUID differs ({mask.study_uid} vs {fill.study_uid})"
    if mask.frame_of_reference_uid and fill.frame_of_reference_uid and \
            mask.frame_of_reference_uid != fill.frame_of_reference_uid:
        return "FrameOfReferenceUID differs"
    if mask.n_frames != fill.n_frames:
        return f"frame counts differ ({mask.n_frames} vs {fill.n_frames})"
    if (mask.rows, mask.columns) != (fill.rows, fill.columns):
        return f"detector sizes differ ({mask.rows}x{mask.columns} vs {fill.rows}x{fill.columns})"
    if abs(mask.sid - fill.sid) > 1.0 or abs(mask.sod - fill.sod) > 1.0:
        return f"SID/SOD differ ({mask.sid:g}/{mask.sod:g} vs {fill.sid:g}/{fill.sod:g} mm)"
    if not np.allclose(mask.spacing, fill.spacing, rtol=1e-3):
        return f"ImagerPixelSpacing differs ({list(mask.spacing)} vs {list(fill.spacing)})"
    if mask.plane != fill.plane:
        return f"biplane planes differ ({mask.plane or 'single'} vs {fill.plane or 'single'})"
    return None


def _frame_order(mask: Run, fill: Run) -> np.ndarray | None:
    """order[k] = the mask frame at fill frame k's angle, when every fill frame has a mask frame within half a
    step and they are all different; None otherwise."""
    half = 0.5 * max(fill.step_deg, 1e-9)
    diff = np.abs((fill.primary_deg[:, None] - mask.primary_deg[None, :] + 180.0) % 360.0 - 180.0)
    order = np.argmin(diff, axis=1)
    if np.any(diff[np.arange(order.size), order] > half) or np.unique(order).size != order.size:
        return None
    if np.any(np.abs(fill.secondary_deg - mask.secondary_deg[order]) > half):
        return None
    return order


def _pair(mask: Run, fill: Run) -> Pair | None:
    if _mismatch(mask, fill) is not None:
        return None
    order = _frame_order(mask, fill)
    if order is None:
        return None
    return Pair(mask, fill, order, bool(order[0] > order[-1]))


def _acquired_first(a: Run, b: Run) -> bool:
    return (a.acquisition_time, a.series_number or 0, a.frames[0]) <= \
        (b.acquisition_time, b.series_number or 0, b.frames[0])


def find_pairs(runs: list[Run]) -> list[Pair]:
    """Compatible (mask, fill) pairs among the usable runs: same study (and frame of reference), frame count,
    detector, SID/SOD, spacing and plane, angles within half a step (in either order).  The mask is the run
    acquired first.  Best first: plane A / single plane before plane B, then the shortest time between runs."""
    usable = [r for r in runs if r.usable]
    pairs = []
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            mask, fill = (a, b) if _acquired_first(a, b) else (b, a)
            p = _pair(mask, fill)
            if p is not None:
                pairs.append(p)
    pairs.sort(key=lambda p: (p.fill.plane == "B", p.fill.study_uid, p.fill.acquisition_time))
    return pairs


def _resolve(runs: list[Run], key: str, role: str) -> Run:
    """A run chosen by its id (SOP Instance UID, with #1/#2 for one of two rotations of an instance) or by its
    series UID when the series holds a single rotation."""
    hits = [r for r in runs if r.id == key] or [r for r in runs if r.sop_uid == key] or \
        [r for r in runs if r.series_uid == key]
    if not hits:
        raise DRGSInputError(f"no {role} run with UID {key}", f"{len(runs)} XA runs found: "
                             + ", ".join(r.id for r in runs[:8]), "the UID of a listed run",
                             "list the runs with `drgs4d import-dicom DIR --list` and copy the id")
    if len(hits) > 1:
        raise DRGSInputError(f"the {role} UID {key} matches {len(hits)} runs", ", ".join(r.id for r in hits),
                             "exactly one run", "give the run id (SOP Instance UID, with #1 or #2 for one "
                             "rotation of an instance that holds two)")
    run = hits[0]
    if not run.usable:
        e = run.error
        raise DRGSInputError(f"the {role} run cannot be used: {e.what}", e.found, e.expected, e.fix)
    return run


def _no_pair_error(runs: list[Run]) -> DRGSInputError:
    """The most useful explanation of why no pair was found: a bad file's own error, or why runs differ."""
    usable = [r for r in runs if r.usable]
    bad = [r for r in runs if not r.usable]
    fix = "check the listing (drgs4d import-dicom DIR --list) and give --fill and --mask explicitly"
    if len(usable) < 2 and bad:
        e = bad[0].error
        others = f" ({len(bad) - 1} more unusable runs in the listing)" if len(bad) > 1 else ""
        return DRGSInputError(f"no usable mask/fill pair: {e.what}{others}", e.found, e.expected, e.fix or fix)
    reasons = []
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            why = _mismatch(a, b) or "their angles do not match frame for frame within half a step"
            reasons.append(f"{a.id} / {b.id}: {why}")
    return DRGSInputError("no mask/fill pair of rotational runs was found",
                          f"{len(runs)} XA runs, {len(usable)} usable" + ("; " if reasons else "")
                          + "; ".join(reasons[:6]), "two rotations of one acquisition (same study, frame count, "
                          "detector, SID/SOD, spacing and plane; angles within half a step)", fix)


def choose_pair(runs: list[Run], fill: str | None = None, mask: str | None = None) -> Pair:
    """The (mask, fill) pair to import: the given UIDs (checked), or the best automatic pair."""
    if fill is not None and mask is not None:
        f, m = _resolve(runs, fill, "fill"), _resolve(runs, mask, "mask")
        why = _mismatch(m, f)
        if why is None and _frame_order(m, f) is None:
            why = "their angles do not match frame for frame within half a step"
        if why is not None:
            raise DRGSInputError(f"fill run {f.id} and mask run {m.id} do not belong together: {why}", "",
                                 "two rotations of one acquisition (same study, frames, detector, distances, "
                                 "angles within half a step)", "choose the matching mask run (see --list)")
        return _pair(m, f)
    pairs = find_pairs(runs)
    if fill is not None or mask is not None:
        key, role = (fill, "fill") if fill is not None else (mask, "mask")
        chosen = _resolve(runs, key, role)
        pairs = [p for p in pairs if (p.fill if role == "fill" else p.mask) is chosen]
        if not pairs:
            raise DRGSInputError(f"no matching partner for the {role} run {chosen.id}", "", "a second rotation "
                                 "of the same acquisition", "give both --fill and --mask (see --list)")
        return pairs[0]
    if not pairs:
        raise _no_pair_error(runs)
    best = pairs[0]
    if best.fill.plane == "B":
        raise DRGSInputError("the only mask/fill pair found is biplane plane B", f"fill {best.fill.id}, mask "
                             f"{best.mask.id}", "plane A or a single-plane run, or an explicit choice",
                             "pass --fill and --mask to use plane B deliberately")
    return best


def pair_geometry(pair: Pair) -> dict:
    """What the import will derive for a pair, from the headers alone (engine conventions; mm, degrees)."""
    f = pair.fill
    alpha, beta = engine_angles(f.primary_deg, f.secondary_deg)
    row_spacing, col_spacing = f.spacing
    geometry = ConeBeamGeometry(f.sod, f.sid, (f.rows, f.columns), (col_spacing, row_spacing), alpha, beta)
    grid = default_grid(geometry)
    return {"n_frames": f.n_frames, "detector_shape": [f.rows, f.columns],
            "detector_spacing_mm": [col_spacing, row_spacing], "sad_mm": f.sod, "sid_mm": f.sid,
            "primary_deg": [float(np.degrees(alpha[0])), float(np.degrees(alpha[-1]))],
            "secondary_deg": [float(np.degrees(beta.min())), float(np.degrees(beta.max()))],
            "dicom_primary_deg": [float(f.primary_deg[0]), float(f.primary_deg[-1])],
            "dicom_secondary_deg": [float(f.secondary_deg.min()), float(f.secondary_deg.max())],
            "step_deg": f.step_deg, "mask_reversed": pair.reversed,
            "volume_resolution": list(grid.resolution), "volume_spacing_mm": list(grid.spacing),
            "angle_rule": f.angle_rule, "warnings": [f"fill: {w}" for w in f.warnings]
            + [f"mask: {w}" for w in pair.mask.warnings]}


def listing(sources) -> dict:
    """Runs and candidate pairs under `sources` as JSON-ready data (headers only: quick), for listings and the
    Slicer panel: {"runs": [Run.summary()], "pairs": [Pair.summary() + "geometry"], "preselected": index|None}."""
    runs = list_runs(sources)
    pairs = find_pairs(runs)
    out = []
    for p in pairs:
        item = p.summary()
        item["geometry"] = pair_geometry(p)
        out.append(item)
    preselected = 0 if pairs and pairs[0].fill.plane != "B" else None
    return {"runs": [r.summary() for r in runs], "pairs": out, "preselected": preselected}


# ---- pixels ---------------------------------------------------------------------------------------------------

def _frames(run: Run, decoded: dict | None = None) -> np.ndarray:
    """The run's frames [n, H, W] as linear float32 intensities (exact for 16-bit data), in DICOM pixel
    orientation.  decoded: {path: all frames} shared by the runs of one instance (both rotations in one file),
    so that its pixel data is decoded once."""
    if decoded is not None and run.path in decoded:
        start, stop = run.frames
        return np.array(decoded[run.path][start:stop], dtype=np.float32)
    pydicom = _pydicom()
    ds = pydicom.dcmread(run.path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder and damaged data look alike here
        syntax = str(_get(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?"))
        raise DRGSInputError(f"{run.path}: the pixel data cannot be decoded", f"transfer syntax {syntax}: {exc}",
                             "uncompressed pixel data or an installed decoder",
                             "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)") from None
    if run.intensity == "LOG":
        from pydicom.pixels import apply_modality_lut

        pixels = apply_modality_lut(pixels, ds)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if decoded is not None:
        decoded[run.path] = pixels
    start, stop = run.frames
    return np.array(pixels[start:stop], dtype=np.float32)


def _sanity(fill: np.ndarray, mask: np.ndarray, valid: np.ndarray, pair: Pair) -> None:
    """log(mask) - log(fill) must be mostly >= 0 with sparse positive vessels; otherwise the runs are swapped
    or misaligned."""
    step = max(1, fill.shape[0] // 16)  # a sample of frames is enough, and bounds the float64 temporaries
    keep = valid[::step]
    d = np.log(mask[::step][keep].astype(np.float64)) - np.log(fill[::step][keep].astype(np.float64))
    if d.size == 0:
        raise DRGSInputError("every pixel of the runs is blanked (<= 0)", "", "positive linear intensities")
    med = np.median(d)
    noise = 1.4826 * np.median(np.abs(d - med)) + 1e-6
    t = 3 * noise
    pos, neg = float(d[d > t].sum()), float(-d[d < -t].sum())
    if neg > pos:
        raise DRGSInputError(f"log(mask) - log(fill) is mostly negative for fill {pair.fill.id} and mask "
                             f"{pair.mask.id}", f"negative contrast {neg:.3g} vs positive {pos:.3g}",
                             "sparse positive vessel contrast", "the runs look swapped or misaligned: exchange "
                             "--fill and --mask, or choose the matching runs")


def default_grid(geometry: ConeBeamGeometry, max_voxels: int = 256) -> VolumeGrid:
    """A cube inside the field of view at the isocentre, voxels no finer than a detector pixel there."""
    scale = geometry.sad / geometry.sid
    sx, sy = geometry.detector_spacing
    side = min(geometry.width * sx, geometry.height * sy) * scale
    voxel = max(side / max_voxels, max(sx, sy) * scale)
    n = max(8, int(round(side / voxel)))
    return VolumeGrid((n, n, n), (side / n,) * 3)


def engine_angles(primary_deg, secondary_deg) -> tuple[np.ndarray, np.ndarray]:
    """DICOM positioner angles (degrees) -> engine (primary, secondary) radians, primary centred on (-pi, pi]."""
    alpha = np.radians(np.asarray(primary_deg, float) + 90.0)
    shift = 2 * np.pi * np.round(np.mean(alpha) / (2 * np.pi))
    return alpha - shift, -np.radians(np.asarray(secondary_deg, float))


def import_dicom(sources, fill: str | None = None, mask: str | None = None, grid: VolumeGrid | None = None,
                 use_secondary: bool = True) -> DicomImport:
    """Read a mask/fill pair of rotational XA runs into a `Case` (see the module docstring for the rules).

    fill, mask: run ids or UIDs (default: the best automatic pair).  grid: the reconstruction grid (default
    `default_grid`).  Frames follow the fill run; mask frames are matched to them by angle.
    """
    runs = list_runs(sources)
    pair = choose_pair(runs, fill=fill, mask=mask)
    f, m = pair.fill, pair.mask
    decoded = {}
    fill_px = _frames(f, decoded)
    mask_px = _frames(m, decoded)[pair.order]
    del decoded
    if fill_px.shape != mask_px.shape or fill_px.shape[1:] != (f.rows, f.columns):
        raise DRGSInputError("the pixel data does not match the headers", f"fill {list(fill_px.shape)}, "
                             f"mask {list(mask_px.shape)}, Rows x Columns {f.rows} x {f.columns}",
                             "frames of Rows x Columns in both runs")
    valid = (fill_px > 0) & (mask_px > 0) & np.isfinite(fill_px) & np.isfinite(mask_px)
    _sanity(fill_px, mask_px, valid, pair)
    warnings = [f"fill: {w}" for w in f.warnings] + [f"mask: {w}" for w in m.warnings]
    blanked = float(1.0 - valid.mean())
    if blanked > 0:
        warnings.append(f"{blanked:.2%} of the pixels are blanked (<= 0) in a run: their DSA is set to 0")
        fill_px[~valid] = 1.0
        mask_px[~valid] = 1.0
    # DICOM columns run towards the patient's left at LAO 0; the engine's u axis the other way (docs/DICOM.md)
    fill_run = np.ascontiguousarray(fill_px[:, :, ::-1])
    mask_run = np.ascontiguousarray(mask_px[:, :, ::-1])
    primary, secondary = engine_angles(f.primary_deg, f.secondary_deg)
    row_spacing, col_spacing = f.spacing
    geometry = ConeBeamGeometry(f.sod, f.sid, (f.rows, f.columns), (col_spacing, row_spacing), primary,
                                secondary if use_secondary else None)
    grid = grid or default_grid(geometry)
    n = f.n_frames
    for w in warnings:
        log.warning("%s", w)
    provenance = {
        "importer": "drgs_core.io.dicom", "mapping": MAPPING,
        "fill": f.summary(), "mask": m.summary(), "mask_frame_for_fill_frame": [int(i) for i in pair.order],
        "mask_reversed": pair.reversed, "vendor": f.vendor, "model": f.model,
        "angle_rule": {"fill": f.angle_rule, "mask": m.angle_rule}, "warnings": warnings,
        "blanked_fraction": blanked, "columns_mirrored": True, "secondary_used": bool(use_secondary),
    }
    case = Case(dsa=dsa_from_runs(fill_run, mask_run), geometry=geometry, grid=grid, times=frame_times(n),
                fill=fill_run, mask=mask_run, name=(f.series_description or "dicom").replace(" ", "_"),
                source=Path(f.path).parent, meta={"dicom": provenance})
    return DicomImport(case, pair, provenance)


def write_import(result: DicomImport, folder) -> Path:
    """Write the imported case as a public case folder plus provenance.json.  The folder is assembled next to
    its destination and moved into place only when complete; an existing non-empty folder is not touched."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DRGSInputError("the output case folder already exists and is not empty", str(folder),
                             "a new or empty folder", "choose another --out or remove the folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_case(result.case, tmp)
        (tmp / "provenance.json").write_text(json.dumps(result.provenance, indent=2, default=_json_default) + "\n",
                                             encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote DICOM import to %s", folder)
    return folder


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
