"""Each bad input raises DRGSInputError with a message that says what, where, found, expected and what to do."""

import json
import logging

import numpy as np
import pytest

from drgs_core.errors import DRGSInputError
from drgs_core.io import read_case, read_runs, write_case, write_stack

SPACING = (0.31, 0.37)


@pytest.fixture
def folder(small_case, tmp_path):
    return write_case(small_case, tmp_path / "case")


def _edit_json(folder, edit):
    path = folder / "transforms.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _message(folder, **kw):
    with pytest.raises(DRGSInputError) as err:
        read_case(folder, **kw)
    return str(err.value)


def _has(msg, *words):
    low = msg.lower()
    missing = [w for w in words if w.lower() not in low]
    assert not missing, f"{missing} not in: {msg}"


def test_missing_folder(tmp_path):
    _has(_message(tmp_path / "nowhere"), "does not exist", "nowhere", "fill_run.nii.gz", "what to do")


def test_missing_run_names_file_and_lists_folder(folder):
    (folder / "mask_run.nii.gz").unlink()
    _has(_message(folder), "mask_run", "folder contents", "fill_run.nii.gz", "transforms.json", "expected")


def test_missing_transforms(folder):
    (folder / "transforms.json").unlink()
    _has(_message(folder), "transforms.json", "fill_run.nii.gz", "what to do")


def test_shapes_differ(folder, small_case):
    write_stack(folder / "mask_run.nii.gz", np.ones((6, 8, 9), np.float32), SPACING)
    _has(_message(folder), "different shapes", "[6, 8, 10]", "[6, 8, 9]")


def test_image_count_mismatch(folder, small_case):
    for stem in ("fill_run", "mask_run"):
        write_stack(folder / f"{stem}.nii.gz", np.ones((5, 8, 10), np.float32), SPACING)
    _has(_message(folder), "number of frames", "5 images", "6 entries", "N_views = 6")


def test_n_views_differs_from_frames(folder):
    _edit_json(folder, lambda d: d.update(N_views=7))
    _has(_message(folder), "N_views", "7", "len(frames) = 6")


def test_proj_resolution_mismatch_and_swapped_hint(folder):
    _edit_json(folder, lambda d: d.update(proj_resolution=[8, 10]))
    _has(_message(folder), "proj_resolution", "swapped", "[W, H]", "10 x 8", "[10, 8]")
    _edit_json(folder, lambda d: d.update(proj_resolution=[12, 8]))
    _has(_message(folder), "proj_resolution", "[12, 8]", "10 x 8")


@pytest.mark.parametrize("key", ["sad", "frames", "volume_resolution"])
def test_missing_key(folder, key):
    _edit_json(folder, lambda d: d.pop(key))
    _has(_message(folder), f"'{key}' is missing", "keys present", "transforms.json")


def test_missing_spacing_and_phy(folder):
    _edit_json(folder, lambda d: (d.pop("volume_spacing"), d.pop("volume_phy")))
    _has(_message(folder), "volume_spacing", "volume_phy", "missing")


def test_ill_typed_keys(folder):
    _edit_json(folder, lambda d: d.update(sid="1200"))
    _has(_message(folder), "'sid'", "wrong type", "string", "'1200'", "number")
    _edit_json(folder, lambda d: d.update(sid=1200.0, volume_resolution=[6, 5]))
    _has(_message(folder), "volume_resolution", "list", "3", "integers")
    _edit_json(folder, lambda d: d.update(volume_resolution=[6, 5, 4]))
    _edit_json(folder, lambda d: d["frames"][2].update(PrimaryAngle=None))
    _has(_message(folder), "frames[2].PrimaryAngle", "null", "number")
    _edit_json(folder, lambda d: d["frames"][2].pop("PrimaryAngle"))
    _has(_message(folder), "frames[2].PrimaryAngle", "missing")


def test_inconsistent_phy(folder):
    _edit_json(folder, lambda d: d.update(volume_phy=[30.0, 3.0, 2.8]))
    _has(_message(folder), "volume_phy", "disagree", "30.0")


def test_sad_not_less_than_sid(folder):
    _edit_json(folder, lambda d: d.update(sad=2000.0))
    _has(_message(folder), "transforms.json", "sad", "sid", "0 < sad < sid")


def test_angles_in_degrees(folder):
    _edit_json(folder, lambda d: [f.update(PrimaryAngle=f["PrimaryAngle"] * 180 / np.pi) for f in d["frames"]])
    _has(_message(folder), "PrimaryAngle", "degrees", "radians", "pi / 180", "frame")


def test_invalid_json_syntax_names_line(folder):
    lines = (folder / "transforms.json").read_text().splitlines()
    lines.insert(5, '  "oops" 1,')  # becomes line 6: missing colon
    (folder / "transforms.json").write_text("\n".join(lines))
    _has(_message(folder), "not valid JSON", "line 6", "column", "oops")


def _write_runs(folder, fill, mask, suffix=".nii.gz"):
    for stem, run in (("fill_run", fill), ("mask_run", mask)):
        for old in folder.glob(f"{stem}.*"):
            old.unlink()
        write_stack(folder / f"{stem}{suffix}", run, SPACING)


def test_non_positive_intensities_are_replaced_with_warning(folder, small_case, caplog):
    back = read_case(folder)
    fill, mask = back.fill.copy(), back.mask.copy()
    fill[1, 2, 3] = 0.0
    fill[4, 0, 0] = np.nan
    fill[4, 1, 1] = -np.inf
    # NRRD keeps NaN (ITK's NIfTI reader turns NaN into 0, which the same policy then catches as <= 0)
    _write_runs(folder, fill, mask, ".nrrd")
    with caplog.at_level(logging.WARNING):
        case = read_case(folder)
    _has(caplog.text, "3 of 480", "2 non-finite", "1 <= 0", "frame indices 1, 4", "smallest positive")
    assert np.all(np.isfinite(case.dsa)) and case.dsa.min() >= 0
    floor = np.nanmin(np.where(fill > 0, fill, np.nan))
    assert case.fill[1, 2, 3] == pytest.approx(floor) and case.fill[4, 0, 0] == pytest.approx(floor)
    assert case.meta["sanitised"]["fill"]["replaced"] == 3
    # strict mode raises with the same facts
    _has(_message(folder, strict=True), "fill run", "3 of 480", "frame indices 1, 4", "strict=False")


def test_whole_run_non_positive(folder, small_case):
    back = read_case(folder)
    _write_runs(folder, back.fill, np.zeros_like(back.mask))
    _has(_message(folder), "mask run", "no positive finite intensity", "DSA or log image")


def test_unreadable_image(folder):
    (folder / "fill_run.nii.gz").write_bytes(b"not an image at all")
    _has(_message(folder), "fill run", "could not be read", "fill_run.nii.gz")


def test_read_runs_missing_file_lists_folder(folder):
    with pytest.raises(DRGSInputError) as err:
        read_runs(folder / "fill_run.nii.gz", folder / "mask_run.nii.gz", folder / "geometry.json")
    _has(str(err.value), "geometry file", "geometry.json", "does not exist", "transforms.json")


def test_inconsistent_proj_phy(folder):
    _edit_json(folder, lambda d: d.update(proj_phy=[5.0, 2.96]))
    _has(_message(folder), "proj_phy", "proj_spacing", "disagree", "5.0")


def test_optional_keys_may_be_absent(folder, small_case):
    _edit_json(folder, lambda d: (d.pop("N_views"), d.pop("proj_resolution"), d.pop("volume_phy"),
                                  [f.pop("file") for f in d["frames"]]))
    case = read_case(folder)
    assert case.n_frames == 6 and case.grid == small_case.grid
    assert case.meta["frame_files"][5] == "frame_0005"


def test_top_level_not_object(folder):
    (folder / "transforms.json").write_text("[1, 2, 3]")
    _has(_message(folder), "does not hold a JSON object", "list")
