"""Every invalid DICOM variant of issue 11 item 2 gives a DRGSInputError naming the file, the attribute and the
rule, and nothing is written."""

import numpy as np
import pytest

from drgs_core.cli import main
from drgs_core.errors import DRGSInputError
from drgs_core.io.dicom import import_dicom, list_runs
from drgs_core.io.dicom_write import write_xa_run

N, H, W = 24, 8, 10
ANGLES = np.linspace(-100.0, 100.0, N)


def runs():
    """(mask, fill) linear intensities with a sparse positive 'vessel' in the DSA."""
    mask = np.full((N, H, W), 1.0e4)
    fill = mask.copy()
    fill[:, 3:5, 2:8] *= np.exp(-1.5)
    return mask, fill


def write_pair(folder, fill_attrs=None, fill_drop=(), mask_attrs=None, fill_angles=ANGLES, style="ge",
               secondary=0.0, plane="", fill_frames=None):
    mask, fill = runs()
    if fill_frames is not None:
        fill = fill[:fill_frames]
    common = dict(sid=1200.0, sod=750.0, spacing=(0.4, 0.4), scale=6.0, study_uid="1.2.3", style=style,
                  frame_of_reference_uid="1.2.3.9", plane=plane)
    b = np.full(N, secondary)
    m = write_xa_run(folder / "mask.dcm", mask, ANGLES, b, time="100000", series_number=1,
                     attributes=mask_attrs, **common)
    f = write_xa_run(folder / "fill.dcm", fill, fill_angles, b[:len(fill_angles)], time="100100", series_number=2,
                     attributes=fill_attrs, drop=fill_drop, **common)
    return m, f


def offsets(angles):
    return [float(v) for v in np.asarray(angles) - angles[0]]


CASES = {
    "increment count": (dict(fill_attrs={"PositionerPrimaryAngleIncrement": offsets(ANGLES)[:-1]}),
                        ["PositionerPrimaryAngleIncrement has 23 values but NumberOfFrames is 24",
                         "C.8.7.5.1.3 allows 1 or 24"]),
    "missing SID": (dict(fill_drop=("DistanceSourceToDetector",)), ["DistanceSourceToDetector is missing"]),
    "missing spacing": (dict(fill_drop=("ImagerPixelSpacing",)), ["ImagerPixelSpacing", "PixelSpacing"]),
    "missing angle": (dict(fill_drop=("PositionerPrimaryAngle",)), ["PositionerPrimaryAngle is missing",
                                                                    "C.8.7.5"]),
    "static": (dict(fill_attrs={"PositionerMotion": "STATIC", "PositionerPrimaryAngleIncrement": [0.0] * N}),
               ["PositionerMotion is STATIC", "C.8.7.5.1.1"]),
    "non-monotonic": (dict(fill_angles=np.r_[ANGLES[:10], ANGLES[11], ANGLES[10], ANGLES[12:]]),
                      ["not monotonic", "frame 11"]),
    "uneven": (dict(fill_angles=np.r_[ANGLES[:12], ANGLES[12:] + 9.0]), ["unevenly spaced"]),
    "large secondary": (dict(secondary=40.0), ["PositionerSecondaryAngle reaches 40.0 deg", "planar orbit"]),
    "magnification": (dict(fill_attrs={"EstimatedRadiographicMagnificationFactor": 2.2}),
                      ["EstimatedRadiographicMagnificationFactor is 2.2", "SID/SOD is 1.6"]),
    "DISP": (dict(fill_attrs={"PixelIntensityRelationship": "DISP"}), ["PixelIntensityRelationship is DISP"]),
    "LOG without LUT": (dict(fill_attrs={"PixelIntensityRelationship": "LOG"}), ["LOG but there is no Modality LUT"]),
    "table motion": (dict(fill_attrs={"TableMotion": "DYNAMIC"}), ["TableMotion is DYNAMIC"]),
    "mismatched SID": (dict(mask_attrs={"DistanceSourceToDetector": 1100.0,
                                        "EstimatedRadiographicMagnificationFactor": 1100.0 / 750.0}),
                       ["no mask/fill pair"]),
    "enhanced without positioner": (dict(style="enhanced", fill_drop=("PerFrameFunctionalGroupsSequence",)),
                                    ["PositionerPositionSequence gives no positioner angles",
                                     "CArmPositionerTabletopRelationship"]),
    "biplane B": (dict(plane="B"), ["biplane plane B"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_variant_is_refused_and_nothing_is_written(tmp_path, name, capsys):
    kwargs, needles = CASES[name]
    mask, fill = write_pair(tmp_path / "dicom", **kwargs)
    with pytest.raises(DRGSInputError) as info:
        import_dicom(tmp_path / "dicom")
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    if name not in ("mismatched SID", "biplane B"):  # a rule about a file: the file is named
        assert str(fill) in message or (name == "large secondary" and str(mask) in message)
    out = tmp_path / "case"
    assert main(["import-dicom", str(tmp_path / "dicom"), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".case.*"))
    assert "error:" in capsys.readouterr().err


def test_explicit_mismatched_pair_names_the_reason(tmp_path):
    write_pair(tmp_path / "a")
    write_pair(tmp_path / "b", fill_frames=20, fill_angles=ANGLES[:20])
    listed = {r.path.split("/")[-2] + "/" + r.path.split("/")[-1]: r for r in list_runs(tmp_path)}
    fill, mask = listed["b/fill.dcm"], listed["a/mask.dcm"]
    with pytest.raises(DRGSInputError, match="do not belong together: frame counts differ"):
        import_dicom(tmp_path, fill=fill.id, mask=mask.id)


def test_swapped_runs_are_detected(tmp_path):
    m, f = write_pair(tmp_path / "dicom")
    runs_ = {r.path: r for r in list_runs(tmp_path / "dicom")}
    with pytest.raises(DRGSInputError, match="swapped or misaligned"):
        import_dicom(tmp_path / "dicom", fill=runs_[str(m)].id, mask=runs_[str(f)].id)


def test_ge_static_with_moving_increments_is_used_with_a_warning(tmp_path):
    write_pair(tmp_path / "dicom", fill_attrs={"PositionerMotion": "STATIC"})
    result = import_dicom(tmp_path / "dicom")
    assert any("STATIC but the angle increments move" in w for w in result.provenance["warnings"])


def test_both_nonzero_base_and_first_increment_warns(tmp_path):
    inc = [v + 0.5 for v in offsets(ANGLES)]   # the first offset is not 0: still offsets, as the standard says
    write_pair(tmp_path / "dicom", fill_attrs={"PositionerPrimaryAngleIncrement": inc})
    result = import_dicom(tmp_path / "dicom")  # 0.5 deg is within half a step of the mask's angles
    assert any("are both non-zero" in w for w in result.provenance["warnings"])
    np.testing.assert_allclose(np.degrees(result.case.geometry.primary_angles), ANGLES + 90.5, atol=1e-6)
