"""Round trips of the public case folder format and read_runs."""

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from drgs_core.errors import DRGSInputError
from drgs_core.geometry import frame_times
from drgs_core.io import DEFAULT_I0, check_views, read_case, read_runs, write_case, write_stack


def test_write_read_round_trip(small_case, tmp_path):
    folder = write_case(small_case, tmp_path / "case")
    assert sorted(p.name for p in folder.iterdir()) == ["fill_run.nii.gz", "mask_run.nii.gz", "transforms.json"]
    back = read_case(folder)
    np.testing.assert_allclose(back.dsa, small_case.dsa, atol=2e-6, rtol=0)
    assert back.dsa.dtype == np.float32 and back.dsa.shape == small_case.dsa.shape
    g0, g1 = small_case.geometry, back.geometry
    np.testing.assert_array_equal(g1.primary_angles, g0.primary_angles)
    np.testing.assert_array_equal(g1.secondary_angles, g0.secondary_angles)
    assert (g1.sad, g1.sid, g1.detector_shape) == (g0.sad, g0.sid, g0.detector_shape)
    np.testing.assert_allclose(g1.detector_spacing, g0.detector_spacing, rtol=1e-12)
    assert back.grid == small_case.grid
    np.testing.assert_allclose(back.times, frame_times(6))
    # raw runs are kept; synthesised mask is the constant I0
    assert back.fill.shape == back.mask.shape == small_case.dsa.shape
    np.testing.assert_allclose(back.mask, DEFAULT_I0)
    assert back.name == "case"
    assert back.meta["frame_files"][0] == "frame_0000"


def test_transforms_json_keys(small_case, tmp_path):
    write_case(small_case, tmp_path)
    data = json.loads((tmp_path / "transforms.json").read_text())
    for key in ["volume_resolution", "volume_phy", "volume_spacing", "sad", "sid", "proj_resolution", "proj_phy",
                "proj_spacing", "N_views", "frames"]:
        assert key in data
    assert data["proj_resolution"] == [10, 8]  # [W, H]
    assert data["volume_resolution"] == [6, 5, 4]
    assert data["N_views"] == 6 and len(data["frames"]) == 6
    assert data["frames"][3]["file"] == "frame_0003"
    assert set(data["frames"][0]) == {"file", "PrimaryAngle", "SecondaryAngle"}
    # the stored images read with SimpleITK as [N, H, W]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fill_run.nii.gz")))
    assert arr.shape == (6, 8, 10)


def test_rewrite_keeps_original_runs(small_case, tmp_path):
    back = read_case(write_case(small_case, tmp_path / "a"))
    back.fill = back.fill * 0.5  # same DSA with a different I0: consistent runs are written as they are
    back.mask = back.mask * 0.5
    again = read_case(write_case(back, tmp_path / "b"))
    np.testing.assert_allclose(again.mask, DEFAULT_I0 * 0.5)
    np.testing.assert_allclose(again.dsa, small_case.dsa, atol=2e-6)


def test_inconsistent_runs_are_replaced(small_case, tmp_path, caplog):
    small_case.fill = np.ones_like(small_case.dsa)
    small_case.mask = np.ones_like(small_case.dsa)
    with caplog.at_level(logging.WARNING):
        back = read_case(write_case(small_case, tmp_path))
    assert "do not reproduce the DSA" in caplog.text
    np.testing.assert_allclose(back.dsa, small_case.dsa, atol=2e-6)


def test_use_secondary_flag(small_case, tmp_path):
    write_case(small_case, tmp_path)
    assert np.any(read_case(tmp_path).geometry.secondary_angles != 0)
    ref = read_case(tmp_path, use_secondary=False)
    np.testing.assert_array_equal(ref.geometry.secondary_angles, 0.0)
    assert ref.meta["secondary_used"] is False


def test_read_case_accepts_json_path_and_nrrd_runs(small_case, tmp_path):
    write_case(small_case, tmp_path)
    back = read_case(tmp_path / "transforms.json")
    for stem in ("fill_run", "mask_run"):  # convert the runs to NRRD
        write_stack(tmp_path / f"{stem}.nrrd", getattr(back, stem.split("_")[0]), (0.31, 0.37))
        (tmp_path / f"{stem}.nii.gz").unlink()
    nrrd_case = read_case(tmp_path)
    np.testing.assert_allclose(nrrd_case.dsa, small_case.dsa, atol=2e-6)
    assert nrrd_case.meta["fill_path"].endswith("fill_run.nrrd")


def test_read_runs(small_case, tmp_path):
    write_case(small_case, tmp_path / "c")
    (tmp_path / "c" / "fill_run.nii.gz").rename(tmp_path / "contrast.nii.gz")
    (tmp_path / "c" / "mask_run.nii.gz").rename(tmp_path / "native.nii.gz")
    (tmp_path / "c" / "transforms.json").rename(tmp_path / "geometry.json")
    case = read_runs(tmp_path / "contrast.nii.gz", tmp_path / "native.nii.gz", tmp_path / "geometry.json")
    assert case.name == "contrast"
    np.testing.assert_allclose(case.dsa, small_case.dsa, atol=2e-6)
    with pytest.raises(DRGSInputError, match="mask run"):
        read_runs(tmp_path / "contrast.nii.gz", tmp_path / "nope.nii.gz", tmp_path / "geometry.json")


def test_spacing_derived_from_phy(small_case, tmp_path):
    """volume_spacing absent: derived from volume_phy / volume_resolution; proj_spacing from proj_phy."""
    write_case(small_case, tmp_path)
    data = json.loads((tmp_path / "transforms.json").read_text())
    del data["volume_spacing"], data["proj_spacing"]
    (tmp_path / "transforms.json").write_text(json.dumps(data))
    back = read_case(tmp_path)
    np.testing.assert_allclose(back.grid.spacing, small_case.grid.spacing, rtol=1e-12)
    np.testing.assert_allclose(back.geometry.detector_spacing, (0.31, 0.37), rtol=1e-12)


def test_check_views(small_case):
    np.testing.assert_array_equal(check_views(small_case, 3), [0, 2, 4])
    with pytest.raises(DRGSInputError) as err:
        check_views(small_case, 7)
    msg = str(err.value)
    assert "7 views" in msg and "6 frames" in msg and "tiny" in msg and "1..6" in msg
    with pytest.raises(DRGSInputError, match="whole number"):
        check_views(small_case, 2.5)
    with pytest.raises(DRGSInputError):
        check_views(small_case, 0)
