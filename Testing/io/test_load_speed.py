"""The fast loading paths give the same results as the straightforward ones they replaced."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drgs_core.ct.registration import _smooth, estimate_shifts
from drgs_core.errors import DRGSInputError
from drgs_core.io.case_folder import dsa_from_runs
from drgs_core.io.validation import sanitise_intensities


def _reference_dsa(fill, mask):
    return np.maximum(np.log(mask.astype(np.float64)) - np.log(fill.astype(np.float64)), 0).astype(np.float32)


def test_float32_dsa_matches_the_float64_logarithms():
    rng = np.random.default_rng(0)
    mask = rng.poisson(1e5, (5, 40, 30)).astype(np.float32) + 1
    fill = (mask * np.exp(-rng.random((5, 40, 30)) * 0.5)).astype(np.float32) + rng.poisson(3, (5, 40, 30))
    got = dsa_from_runs(fill, mask)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_dsa(fill, mask), rtol=0, atol=2e-7)


def test_a_ratio_beyond_float32_falls_back_to_float64():
    fill = np.full((2, 4, 4), 1e-30, np.float32)
    mask = np.full((2, 4, 4), 1e30, np.float32)  # mask / fill = 1e60 overflows float32
    got = dsa_from_runs(fill, mask)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _reference_dsa(fill, mask), rtol=1e-6)


def test_swapped_runs_are_still_refused():
    rng = np.random.default_rng(1)
    mask = rng.poisson(1e4, (3, 16, 16)).astype(np.float32) + 1
    fill = mask * 0.5
    dsa_from_runs(fill, mask)
    with pytest.raises(DRGSInputError, match="swapped"):
        dsa_from_runs(mask, fill)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -3.0])
def test_the_fast_clean_check_does_not_hide_invalid_pixels(bad):
    run = np.full((3, 8, 8), 100.0, np.float32)
    run[1, 2, 3] = bad
    out, report = sanitise_intensities(run.copy(), "run")
    assert report["replaced"] == 1 and report["frames"] == [1] and out[1, 2, 3] == 100.0
    clean, report = sanitise_intensities(np.full((3, 8, 8), 5.0, np.float32), "run")
    assert report["replaced"] == 0


def test_separable_smoothing_matches_a_convolution():
    x = torch.rand(3, 37, 29, dtype=torch.float64)
    r, sigma = 3, 1.0
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    ref = F.conv2d(F.pad(x[:, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    torch.testing.assert_close(_smooth(x, sigma), ref, rtol=0, atol=1e-12)


def test_registration_recovers_a_known_shift():
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)
    mask = 1e4 * np.exp(-0.02 * ((xx - 20) ** 2 + (yy - 26) ** 2) / 4) + 2e3
    shifted = 1e4 * np.exp(-0.02 * ((xx - 21.5) ** 2 + (yy - 25.2) ** 2) / 4) + 2e3
    d, energy = estimate_shifts(shifted[None], mask[None])
    np.testing.assert_allclose(d[0], [-1.5, 0.8], atol=0.1)
    assert energy["residual_after"] < 0.05 * energy["residual_before"]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "crc"])
def test_read_volume_still_refuses_a_damaged_gzip(tmp_path, damage):
    from drgs_core.geometry import VolumeGrid
    from drgs_core.io import read_volume, write_volume

    grid = VolumeGrid((20, 18, 16), (1.0, 1.0, 1.0))
    vol = np.random.default_rng(5).random(grid.resolution).astype(np.float32)
    path = write_volume(tmp_path / "v.nii.gz", vol, grid)
    back, info = read_volume(path)
    assert np.array_equal(back, vol) and info.grid == grid
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "corrupt":
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    else:
        data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DRGSInputError, match="truncated or corrupt"):
        read_volume(path)
