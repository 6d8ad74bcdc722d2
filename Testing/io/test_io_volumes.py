"""Volumes, label maps, sequences and stacks land at the right LPS coordinates for SimpleITK, nibabel and pynrrd."""

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.io import (read_sequence_nrrd, read_volume, write_labelmap, write_sequence_nrrd, write_stack,
                          write_volume)

PROBE = (4, 1, 2)  # a voxel (i, j, k) = (x, y, z) with a unique value


@pytest.fixture
def volume(grid):
    arr = np.arange(np.prod(grid.resolution), dtype=np.float32).reshape(grid.resolution) / 10.0
    arr[PROBE] = 99.5
    return arr


def _check_sitk(path, arr, grid):
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetOrigin(), grid.first_voxel_centre, atol=1e-5)
    np.testing.assert_allclose(img.GetSpacing(), grid.spacing, atol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), np.eye(3), atol=1e-6)
    assert img.GetSize() == grid.resolution  # (nx, ny, nz)
    assert img.GetPixel(PROBE) == pytest.approx(99.5)  # SimpleITK pixel index is (i, j, k)
    world = img.TransformIndexToPhysicalPoint(PROBE)
    np.testing.assert_allclose(world, grid.index_to_world(np.array(PROBE, float)), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img).transpose(2, 1, 0), arr, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_lps_for_sitk_and_ras_for_nibabel(volume, grid, tmp_path, suffix):
    path = write_volume(tmp_path / f"vol{suffix}", volume, grid)
    _check_sitk(path, volume, grid)
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    assert data.shape == grid.resolution and data[PROBE] == pytest.approx(99.5)
    lps = grid.index_to_world(np.array(PROBE, float))
    ras = img.affine @ np.r_[PROBE, 1.0]
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # i, j, k run towards L, P, S
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
def test_nrrd_for_pynrrd_and_sitk(volume, grid, tmp_path, suffix):
    path = write_volume(tmp_path / f"vol{suffix}", volume, grid)
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"], np.diag(grid.spacing))
    np.testing.assert_allclose(header["space origin"], grid.first_voxel_centre)
    assert list(header["kinds"]) == ["domain"] * 3
    assert data.shape == grid.resolution and data[PROBE] == pytest.approx(99.5)
    _check_sitk(path, volume, grid)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["vol.nhdr", "vol.raw.gz"] if suffix == ".nhdr" else ["vol.nrrd"])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".nhdr"])
def test_read_volume_round_trip(volume, grid, tmp_path, suffix):
    path = write_volume(tmp_path / f"v{suffix}", torch.as_tensor(volume), grid)
    arr, info = read_volume(path)
    np.testing.assert_allclose(arr, volume)
    assert info.grid == grid
    np.testing.assert_allclose(info.index_to_world(PROBE), grid.index_to_world(np.array(PROBE, float)))
    np.testing.assert_allclose(info.world_to_index(info.index_to_world(PROBE)), PROBE, atol=1e-9)


def test_read_volume_reorients_flipped_nifti(volume, grid, tmp_path):
    """A NIfTI stored with +R/+A axes (flipped x, y) reads back as the original LPS-ordered array."""
    flipped = volume[::-1, ::-1, :].copy()
    affine = np.diag([*grid.spacing, 1.0])
    o = grid.first_voxel_centre
    n = np.asarray(grid.resolution)
    affine[:3, 3] = [-(o[0] + (n[0] - 1) * grid.spacing[0]), -(o[1] + (n[1] - 1) * grid.spacing[1]), o[2]]
    nib.save(nib.Nifti1Image(flipped, affine), str(tmp_path / "ras.nii.gz"))
    arr, info = read_volume(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(arr, volume)
    assert info.grid == grid
    raw, raw_info = read_volume(tmp_path / "ras.nii.gz", reorient=False)
    np.testing.assert_allclose(raw, flipped)
    assert raw_info.grid is None
    # stored voxel (0, 0, 0) is the original voxel (nx-1, ny-1, 0)
    np.testing.assert_allclose(raw_info.index_to_world([0, 0, 0]), info.index_to_world([n[0] - 1, n[1] - 1, 0]),
                               atol=1e-6)


def test_labelmap(grid, tmp_path):
    mask = np.zeros(grid.resolution, bool)
    mask[2:4, 1:3, 1:2] = True
    for suffix in (".nii.gz", ".nrrd"):
        path = write_labelmap(tmp_path / f"seg{suffix}", mask, grid)
        arr, info = read_volume(path)
        assert arr.dtype == np.uint8 and info.grid == grid
        np.testing.assert_array_equal(arr, mask.astype(np.uint8))
    assert nib.load(str(tmp_path / "seg.nii.gz")).header.get_intent()[0] == "label"
    with pytest.raises(DRGSInputError, match="0..255"):
        write_labelmap(tmp_path / "bad.nrrd", np.full(grid.resolution, 300), grid)
    with pytest.raises(DRGSInputError, match="non-integer"):
        write_labelmap(tmp_path / "bad.nrrd", np.full(grid.resolution, 0.5), grid)


def test_wrong_shape_and_extension(volume, grid, tmp_path):
    with pytest.raises(DRGSInputError, match=r"transpose"):
        write_volume(tmp_path / "v.nii.gz", volume.transpose(2, 1, 0), grid)
    with pytest.raises(DRGSInputError, match=r"\.nii, \.nii\.gz, \.nrrd or \.nhdr"):
        write_volume(tmp_path / "v.mhd", volume, grid)
    assert list(tmp_path.iterdir()) == []


def test_sequence_nrrd(volume, grid, tmp_path):
    vols = np.stack([volume * (t + 1) for t in range(3)])
    times = np.array([0.0, 1 / 3, 2 / 3])
    path = write_sequence_nrrd(tmp_path / "v.seq.nrrd", vols, grid, times, index_unit="s")
    data, header = nrrd.read(str(path))
    assert data.shape == (3, *grid.resolution)
    np.testing.assert_allclose(data[2][PROBE], 3 * 99.5)
    assert list(header["kinds"]) == ["list", "domain", "domain", "domain"]
    assert header["labels"] == ["time", "", "", ""] and header["units"] == ["s", "", "", ""]
    sd = np.asarray(header["space directions"], float)
    assert np.all(np.isnan(sd[0])) and np.allclose(sd[1:], np.diag(grid.spacing))
    np.testing.assert_allclose(header["space origin"], grid.first_voxel_centre)
    assert header["space"] == "left-posterior-superior"
    assert header["axis 0 index type"] == "numeric"
    np.testing.assert_allclose([float(v) for v in header["axis 0 index values"].split()], times)
    assert header["DataNodeClassName"] == "vtkMRMLScalarVolumeNode"
    text = path.read_bytes().split(b"\n\n")[0].decode()
    assert "space directions: none (" in text and "axis 0 index values:=" in text and "sizes: 3 6 5 4" in text
    back, info, t = read_sequence_nrrd(path)
    np.testing.assert_allclose(back, vols)
    np.testing.assert_allclose(t, times)
    assert info.grid == grid
    with pytest.raises(DRGSInputError, match="one finite time per volume"):
        write_sequence_nrrd(tmp_path / "w.seq.nrrd", vols, grid, times[:2])


def test_stack(tmp_path):
    stack = np.random.default_rng(1).random((3, 8, 10)).astype(np.float32)
    for suffix in (".nii.gz", ".nrrd"):
        path = write_stack(tmp_path / f"proj{suffix}", stack, (0.31, 0.37))
        img = sitk.ReadImage(str(path))
        assert img.GetSize() == (10, 8, 3)
        np.testing.assert_allclose(img.GetSpacing(), (0.31, 0.37, 1.0), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), stack)
