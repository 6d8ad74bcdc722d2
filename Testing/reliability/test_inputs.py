"""Inputs are read strictly: damaged files, invalid pixels, swapped runs and impossible geometry are errors
(or, where a real acquisition could look like that, warnings) - never a silently wrong reconstruction."""

import gzip
import logging
import math

import numpy as np
import pytest

from drgs_core.errors import DRGSInputError
from drgs_core.io import read_case, read_stack, write_stack
from drgs_core.pipeline import ReconstructConfig, run_reconstruction

from .conftest import copy_case, edit_transforms


def test_truncated_gzip_run_is_an_error(tiny_case, tmp_path):
    case = copy_case(tiny_case, tmp_path / "c")
    data = (case / "fill_run.nii.gz").read_bytes()
    (case / "fill_run.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DRGSInputError, match="truncated or corrupt"):
        read_case(case)


def test_corrupt_gzip_run_is_an_error(tiny_case, tmp_path):
    case = copy_case(tiny_case, tmp_path / "c")
    data = bytearray((case / "mask_run.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # a damaged block: the CRC or the inflate stream fails
    (case / "mask_run.nii.gz").write_bytes(bytes(data))
    with pytest.raises(DRGSInputError, match="truncated or corrupt"):
        read_case(case)


def test_truncated_nrrd_stack_is_an_error(tmp_path):
    path = write_stack(tmp_path / "s.nrrd", np.random.default_rng(0).random((6, 16, 16)), (1.0, 1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(DRGSInputError):
        read_stack(path)


def test_nan_and_inf_pixels_are_counted_before_any_conversion(tiny_case, tmp_path):
    case = copy_case(tiny_case, tmp_path / "c")
    fill = read_stack(case / "fill_run.nii.gz")
    fill[2, 3, 4:9] = np.nan
    fill[5, 0, :3] = np.inf
    fill[6, 1, 1] = -1.0
    write_stack(case / "fill_run.nii.gz", fill, (1.0, 1.0))
    report = read_case(case).meta["sanitised"]["fill"]
    assert report["non_finite"] == 8 and report["non_positive"] == 1 and report["frames"] == [2, 5, 6]


def test_a_whole_invalid_frame_is_an_error(tiny_case, tmp_path):
    case = copy_case(tiny_case, tmp_path / "c")
    mask = read_stack(case / "mask_run.nii.gz")
    mask[3] = np.nan
    write_stack(case / "mask_run.nii.gz", mask, (1.0, 1.0))
    with pytest.raises(DRGSInputError, match="frames without any valid intensity") as exc:
        read_case(case)
    assert "frames 3" in str(exc.value)


def test_swapped_fill_and_mask_is_an_error(tiny_case, tmp_path):
    case = copy_case(tiny_case, tmp_path / "c")
    (case / "fill_run.nii.gz").rename(case / "tmp.nii.gz")
    (case / "mask_run.nii.gz").rename(case / "fill_run.nii.gz")
    (case / "tmp.nii.gz").rename(case / "mask_run.nii.gz")
    with pytest.raises(DRGSInputError, match="swapped"):
        read_case(case)
    read_case(tiny_case)  # the original order passes


def _set_angles(values):
    def change(data):
        for frame, a in zip(data["frames"], values(len(data["frames"]))):
            frame["PrimaryAngle"] = float(a)
    return change


def test_all_angles_equal_is_an_error(tiny_case, tmp_path):
    case = edit_transforms(copy_case(tiny_case, tmp_path / "c"), _set_angles(lambda n: [0.3] * n))
    with pytest.raises(DRGSInputError, match="same direction"):
        read_case(case)


@pytest.mark.parametrize("how, words", [
    ("duplicated", "repeat the angles"),
    ("shuffled", "not monotonic"),
])
def test_repeated_or_unsorted_angles_warn(tiny_case, tmp_path, caplog, how, words):
    rng = np.random.default_rng(1)

    def angles(n):
        a = np.linspace(-1.6, 1.6, n)
        if how == "duplicated":
            a[1] = a[0]
        else:
            rng.shuffle(a)
        return a

    case = edit_transforms(copy_case(tiny_case, tmp_path / "c"), _set_angles(angles))
    with caplog.at_level(logging.WARNING):
        read_case(case)
    assert words in caplog.text


def test_source_inside_the_volume_is_an_error(tiny_case, tmp_path):
    def tiny_distances(data):
        data["sad"], data["sid"] = 0.001, 0.002
    case = edit_transforms(copy_case(tiny_case, tmp_path / "c"), tiny_distances)
    with pytest.raises(DRGSInputError, match="source would be inside"):
        read_case(case)


def test_a_volume_beyond_the_machine_memory_is_refused_with_its_size(tiny_case, tmp_path):
    def huge(data):
        data["volume_resolution"] = [200_000] * 3
        data.pop("volume_phy", None)
        data["volume_spacing"] = [1e-3] * 3
    case = edit_transforms(copy_case(tiny_case, tmp_path / "c"), huge)
    cfg = ReconstructConfig(out=str(tmp_path / "r"), case=str(case), preset="tiny", device="cpu", views=8)
    with pytest.raises(DRGSInputError, match="does not fit in this machine's memory") as exc:
        run_reconstruction(cfg)
    assert "GiB" in str(exc.value)


def test_gzip_check_reads_the_whole_stream(tmp_path):
    """The reader's check really inflates to the end: a valid stream with a wrong CRC is caught too."""
    raw = np.arange(4000, dtype=np.float32).tobytes()
    path = tmp_path / "x.gz"
    blob = bytearray(gzip.compress(raw))
    blob[-8] ^= 0xFF  # CRC32 of the trailer
    path.write_bytes(bytes(blob))
    from drgs_core.io.volumes import _check_gzip_stream

    with pytest.raises(DRGSInputError):
        _check_gzip_stream(path, "test file")
    assert math.isfinite(float(np.frombuffer(raw, np.float32).sum()))
