"""Speck removal (drgs_core.specks): small components go, the vessel stays, the report counts what went."""

import numpy as np
import pytest

from drgs_core.errors import DRGSInputError
from drgs_core.geometry import VolumeGrid
from drgs_core.metrics import chamfer_hd95, mesh_from_volume
from drgs_core.specks import drop_specks, speck_size


def _volume():
    v = np.zeros((40, 40, 40), np.float32)
    v[5:35, 18:22, 18:22] = 1.0          # a vessel: 480 voxels
    v[3, 3, 3] = 1.0                     # a one-voxel speck
    v[30:32, 5:7, 30:32] = 0.8           # an 8-voxel speck
    v[10, 30, 10] = 0.9                  # diagonal neighbours are one component (26-connectivity): 2 voxels
    v[11, 31, 11] = 0.9
    return v


def test_small_components_are_dropped_and_counted():
    v = _volume()
    clean, seg, info = drop_specks(v, 0.5, min_voxels=10)
    assert info["components"] == 4
    assert (info["dropped_components"], info["dropped_voxels"]) == (3, 11)
    assert info["dropped_fraction"] == pytest.approx(11 / 491)
    assert seg.sum() == 480 and seg[5:35, 18:22, 18:22].all()
    assert clean[3, 3, 3] == 0 and clean[20, 20, 20] == 1.0
    assert v[3, 3, 3] == 1.0  # the input is not modified


def test_threshold_and_auto_size():
    v = _volume()
    _, seg, info = drop_specks(v, 0.5, min_voxels=2)  # only the single voxel is below 2
    assert info["dropped_voxels"] == 1 and seg.sum() == 490
    _, seg, info = drop_specks(v, 0.5, min_voxels=0)
    assert info["dropped_voxels"] == 0 and seg.sum() == 491
    assert speck_size("auto", 491) == 4 and speck_size("auto", 100_000) == 200
    assert speck_size("12", 5) == 12
    with pytest.raises(DRGSInputError, match="min_speck_voxels"):
        speck_size("many", 5)


def test_specks_far_from_the_vessel_dominate_hd95_until_dropped():
    grid = VolumeGrid((40, 40, 40), (1.0, 1.0, 1.0))
    v = _volume()
    truth = np.zeros_like(v)
    truth[5:35, 18:22, 18:22] = 1.0
    tv, _ = mesh_from_volume(truth, grid, 0.5)
    raw, _ = mesh_from_volume(v, grid, 0.5)
    clean, _, _ = drop_specks(v, 0.5, min_voxels=10)
    cv, _ = mesh_from_volume(clean, grid, 0.5)
    d_raw, d_clean = chamfer_hd95(raw, tv), chamfer_hd95(cv, tv)
    assert d_clean["cd"] < 1e-9 and d_clean["hd95"] < 1e-9
    assert d_raw["cd"] > 0.5
