"""Synthetic rotational XA DICOM: what the tests (and `drgs4d phantom --dicom`) write with pydicom.

    write_xa_run(path, frames, primary_deg, secondary_deg, ...)   # one multi-frame XA / Enhanced XA instance
    case_to_dicom(case, folder, ...)                                # a Case's mask and fill runs as DICOM files

Frames are linear detector intensities [N, H, W] in DICOM pixel orientation (see drgs_core.io.dicom: columns run
towards the patient's left at LAO 0); angles are DICOM positioner angles in degrees.  Vendor styles of the
primary/secondary angle encoding (PS3.3 C.8.7.5.1.3):

- "ge": PositionerPrimaryAngle = first frame, increments = offsets from the first frame (one per frame);
- "siemens": PositionerPrimaryAngle = 0, increments = absolute angles;
- "constant": one increment value = a constant step;
- "enhanced": Enhanced XA with per-frame PositionerPositionSequence.

Nothing here is read back by the importer's own code paths: the files are plain pydicom datasets.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from .dicom import ENHANCED_XA, XA

STYLES = ("ge", "siemens", "constant", "enhanced")
VENDORS = {"ge": "GE MEDICAL SYSTEMS", "siemens": "SIEMENS", "constant": "Philips", "enhanced": "Canon"}
MAX_STORED = 65000  # uint16 head room for LIN pixel data


def _wrap(deg):
    """Angles into [-180, 180) degrees, as a modality writes them."""
    return (np.asarray(deg, float) + 180.0) % 360.0 - 180.0


def _uid():
    from pydicom.uid import generate_uid

    return generate_uid()


def write_xa_run(path, frames, primary_deg, secondary_deg, *, sid: float, sod: float, spacing, style: str = "ge",
                 intensity: str = "LIN", scale: float | None = None, study_uid: str | None = None,
                 series_uid: str | None = None, frame_of_reference_uid: str | None = None,
                 description: str = "3D rotational run", time: str = "120000", series_number: int = 1,
                 plane: str = "", log_range: tuple | None = None, attributes: dict | None = None,
                 drop: tuple = ()) -> Path:
    """Write one multi-frame run.

    frames: [N, H, W] linear intensities > 0; spacing: ImagerPixelSpacing (row, column) mm.  `scale` multiplies
    the intensities before they are rounded to uint16 (default: the largest fits in MAX_STORED; give both runs of
    a pair the same scale).  intensity "LOG": 12-bit log-encoded values with a Modality LUT back to linear.
    `attributes` set (or override) top-level keywords, `drop` removes them: for invalid variants in tests.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    if style not in STYLES:
        raise DRGSInputError("unknown DICOM style", repr(style), "one of " + ", ".join(STYLES))
    frames = np.asarray(frames, dtype=np.float64)
    n, h, w = frames.shape
    a = np.asarray(primary_deg, float)
    b = np.asarray(secondary_deg, float)
    enhanced = style == "enhanced"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_XA if enhanced else XA
    meta.MediaStorageSOPInstanceUID = _uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or _uid()
    ds.SeriesInstanceUID = series_uid or _uid()
    ds.FrameOfReferenceUID = frame_of_reference_uid or _uid()
    ds.Modality = "XA"
    ds.Manufacturer = VENDORS[style]
    ds.ManufacturerModelName = "synthetic"
    ds.PatientName = "Phantom^DRGS4D"
    ds.PatientID = "DRGS4D-PHANTOM"
    ds.PatientPosition = "HFS"
    today = datetime.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyDate = ds.AcquisitionDate = ds.ContentDate = today
    ds.AcquisitionTime = ds.ContentTime = time
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", f"BIPLANE {plane}" if plane else "SINGLE PLANE"]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0

    if intensity == "LOG":
        lo, hi = log_range if log_range is not None else (np.log(frames.min()), np.log(frames.max()))
        hi = max(hi, lo + 1e-6)
        stored = np.round(4095 * (np.log(frames) - lo) / (hi - lo))
        out_scale = MAX_STORED / frames.max() if scale is None else scale
        lut = np.round(np.exp(lo + np.arange(4096) / 4095 * (hi - lo)) * out_scale).astype(np.uint16)
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.ModalityLUTType = "US"
        item.add_new("LUTData", "US", [int(v) for v in lut])
        ds.ModalityLUTSequence = Sequence([item])
        ds.BitsStored, ds.HighBit = 12, 11
    else:
        stored = np.round(frames * (MAX_STORED / frames.max() if scale is None else scale))
        ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelData = np.clip(stored, 0, 65535).astype("<u2").tobytes()

    if enhanced:
        def group(**sequences):
            item = Dataset()
            for name, fields in sequences.items():
                inner = Dataset()
                for key, value in fields.items():
                    setattr(inner, key, value)
                setattr(item, name, Sequence([inner]))
            return item

        ds.CArmPositionerTabletopRelationship = "NO"
        ds.SharedFunctionalGroupsSequence = Sequence([group(
            XRayGeometrySequence={"DistanceSourceToIsocenter": float(sod), "DistanceSourceToDetector": float(sid)},
            FramePixelDataPropertiesSequence={"ImagerPixelSpacing": [float(spacing[0]), float(spacing[1])],
                                              "PixelIntensityRelationship": intensity})])
        ds.PerFrameFunctionalGroupsSequence = Sequence([group(
            PositionerPositionSequence={"PositionerPrimaryAngle": float(_wrap(a[k])),
                                        "PositionerSecondaryAngle": float(b[k])},
            FrameContentSequence={"FrameAcquisitionNumber": k + 1}) for k in range(n)])
    else:
        ds.PositionerMotion = "DYNAMIC"
        ds.TableMotion = "STATIC"
        ds.DistanceSourceToDetector = float(sid)
        ds.DistanceSourceToPatient = float(sod)
        ds.EstimatedRadiographicMagnificationFactor = float(sid) / float(sod)
        ds.ImagerPixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.PixelIntensityRelationship = intensity
        if style == "siemens":
            ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = 0.0, 0.0
            ds.PositionerPrimaryAngleIncrement = [float(v) for v in _wrap(a)]
            ds.PositionerSecondaryAngleIncrement = [float(v) for v in b]
        elif style == "constant":
            ds.PositionerPrimaryAngle = float(_wrap(a[0]))
            ds.PositionerSecondaryAngle = float(b[0])
            ds.PositionerPrimaryAngleIncrement = float(np.mean(np.diff(a)))
            ds.PositionerSecondaryAngleIncrement = float(np.mean(np.diff(b)))
        else:
            ds.PositionerPrimaryAngle = float(_wrap(a[0]))
            ds.PositionerSecondaryAngle = float(b[0])
            ds.PositionerPrimaryAngleIncrement = [float(v) for v in a - a[0]]
            ds.PositionerSecondaryAngleIncrement = [float(v) for v in b - b[0]]
    for key, value in (attributes or {}).items():
        setattr(ds, key, value)
    for key in drop:
        if key in ds:
            delattr(ds, key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dicom_angles(case) -> tuple[np.ndarray, np.ndarray]:
    """A case's engine angles (radians) as DICOM positioner angles (degrees): the inverse of the import mapping."""
    g = case.geometry
    return np.degrees(g.primary_angles) - 90.0, -np.degrees(g.secondary_angles)


def case_runs(case, i0: float = 1.0e4) -> tuple[np.ndarray, np.ndarray]:
    """(mask, fill) linear intensities [N, H, W] of a case in DICOM pixel orientation (columns mirrored)."""
    if case.fill is not None and case.mask is not None:
        mask, fill = np.asarray(case.mask, float), np.asarray(case.fill, float)
    else:
        mask = np.full(case.dsa.shape, i0)
        fill = i0 * np.exp(-np.asarray(case.dsa, float))
    return mask[:, :, ::-1], fill[:, :, ::-1]


def case_to_dicom(case, folder, *, style: str = "ge", intensity: str = "LIN", one_instance: str | None = None,
                  mask_reversed: bool = False, plane: str = "", description: str = "DRGS4D phantom") -> dict:
    """Write `case` as a mask run then a fill run (two instances of two series of one study), or both rotations
    in one instance (`one_instance` "jump": the second rotation starts again at the first angle; "reverse": it
    turns back, so its frames come in reverse order).  mask_reversed: the mask rotation runs the other way.
    Returns {"mask": path, "fill": path or the same path, "study_uid": ..., "folder": ...}."""
    folder = Path(folder)
    mask, fill = case_runs(case)
    a, b = dicom_angles(case)
    g = case.geometry
    common = dict(sid=g.sid, sod=g.sad, spacing=(g.detector_spacing[1], g.detector_spacing[0]), style=style,
                  intensity=intensity, scale=MAX_STORED / max(mask.max(), fill.max()), study_uid=_uid(),
                  frame_of_reference_uid=_uid(), plane=plane,
                  log_range=(float(np.log(min(mask.min(), fill.min()))), float(np.log(max(mask.max(), fill.max())))))
    if one_instance is not None:
        if one_instance == "reverse":
            frames = np.concatenate([mask, fill[::-1]])
            pa, pb = np.concatenate([a, a[::-1]]), np.concatenate([b, b[::-1]])
        else:
            frames, pa, pb = np.concatenate([mask, fill]), np.concatenate([a, a]), np.concatenate([b, b])
        path = write_xa_run(folder / "run_0001", frames, pa, pb, description=f"{description} (mask+fill)",
                            **common)
        return {"mask": path, "fill": path, "study_uid": common["study_uid"], "folder": folder}
    m_idx = np.arange(case.n_frames)[::-1] if mask_reversed else np.arange(case.n_frames)
    mask_path = write_xa_run(folder / "IMG0001", mask[m_idx], a[m_idx], b[m_idx], description=f"{description} mask",
                             time="120000", series_number=1, **common)
    fill_path = write_xa_run(folder / "sub" / "IMG0002", fill, a, b, description=f"{description} fill",
                             time="120130", series_number=2, **common)
    return {"mask": mask_path, "fill": fill_path, "study_uid": common["study_uid"], "folder": folder}
