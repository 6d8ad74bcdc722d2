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


def test_pieces_of_a_broken_vessel_stay_floaters_go():
    """A thin vessel broken at the iso-level: its short piece lies within the gap of the tree and stays; a
    floater of the same size farther away goes; the gap is a distance in mm, so the voxel size matters."""
    v = np.zeros((40, 40, 40), np.float32)
    v[5:30, 18:22, 18:22] = 1.0          # the tree: 400 voxels
    v[32:34, 19:21, 19:21] = 1.0         # a piece after a 2-voxel break (8 voxels; 3 voxel steps from the tree)
    v[15:17, 3:5, 30:32] = 1.0           # a floater of the same size, 13+ voxels away
    _, seg, info = drop_specks(v, 0.5, min_voxels=10, spacing=(1.0, 1.0, 1.0), gap_mm=3.0)
    assert seg[32:34, 19:21, 19:21].all() and not seg[15:17, 3:5, 30:32].any()
    assert (info["kept_near"], info["dropped_components"], info["dropped_voxels"]) == (1, 1, 8)
    # 2 mm voxels: the break is 6 mm > 3 mm, so the piece is a speck too
    _, seg, info = drop_specks(v, 0.5, min_voxels=10, spacing=(2.0, 2.0, 2.0), gap_mm=3.0)
    assert not seg[32:34].any() and info["dropped_components"] == 2
    # gap 0: every small component goes, as before the distance test
    _, seg, info = drop_specks(v, 0.5, min_voxels=10, gap_mm=0.0)
    assert info["dropped_components"] == 2 and info["kept_near"] == 0
    with pytest.raises(DRGSInputError, match="speck_gap_mm"):
        drop_specks(v, 0.5, min_voxels=10, gap_mm=-1.0)


def test_haze_raises_the_automatic_level_until_the_tree_is_one_piece():
    """A tree at value 1 in faint haze blobs (value 0.25): at base level 0.2 the haze makes many small
    components; the level steps up past the haze (to 0.3 = 1.5 x base) and the tree is kept whole.  A clean
    volume keeps its base level."""
    from drgs_core.specks import HAZE_FRACTION, haze_aware_segmentation

    rng = np.random.default_rng(0)
    v = np.zeros((48, 48, 48), np.float32)
    v[4:44, 22:26, 22:26] = 1.0                       # the tree: 640 voxels
    clean_level, _, seg, info = haze_aware_segmentation(v, 0.2, spacing=(1.0,) * 3)
    assert clean_level == pytest.approx(0.2) and info["level_factor"] == 1.0 and seg.sum() == 640
    for x, y, z in rng.integers(2, 46, size=(60, 3)):   # haze: 60 isolated blobs of 2 voxels
        if abs(y - 24) > 6 or abs(z - 24) > 6:
            v[x, y, z:z + 2] = 0.25
    level, cleaned, seg, info = haze_aware_segmentation(v, 0.2, spacing=(1.0,) * 3)
    assert info["level_steps"][0][1] > HAZE_FRACTION                   # the base level saw the haze
    assert level == pytest.approx(0.3) and info["level_factor"] == 1.5  # the first step above 0.25
    assert seg.sum() == 640 and seg[4:44, 22:26, 22:26].all()
    # a user level is not raised: drop_specks at it removes the far blobs but keeps the level
    _, seg, info = drop_specks(v, 0.2, spacing=(1.0,) * 3)
    assert info["small_fraction"] > HAZE_FRACTION and seg.sum() == 640
