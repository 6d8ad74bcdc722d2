"""Detector binning of a case: block means of the DSA with a geometry that still matches the forward model."""

import numpy as np
import pytest
import torch

from drgs_core.ct.projector import forward_project
from drgs_core.errors import DRGSInputError
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
from drgs_core.io.case import Case


def _smooth_case(shape=(48, 60)):
    grid = VolumeGrid((32, 32, 32), (2.0, 2.0, 2.0))
    axes = [torch.as_tensor(a) for a in grid.axes()]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    vol = 0.02 * torch.exp(-((x - 5) ** 2 + y ** 2 + (z + 4) ** 2) / (2 * 12.0 ** 2))
    geo = ConeBeamGeometry(750.0, 1200.0, shape, (1.6, 1.6), np.array([0.0, 0.9, 2.1]))
    dsa = forward_project(vol, grid, geo).numpy()
    return Case(dsa, geo, grid), vol


def test_binned_case_matches_projecting_with_the_binned_geometry():
    case, vol = _smooth_case()
    b = case.binned(2)
    assert b.dsa.shape == (3, 24, 30) and b.geometry.detector_shape == (24, 30)
    assert b.meta["detector_binning"] == 2 and b.meta["detector_shape_unbinned"] == [48, 60]
    assert np.allclose(b.dsa[1, 3, 4], case.dsa[1, 6:8, 8:10].mean(), rtol=1e-6)
    direct = forward_project(vol, case.grid, b.geometry).numpy()
    # smooth object: the mean of 2 x 2 line integrals ~ the line integral through their mean centre
    err = np.abs(b.dsa - direct).max() / direct.max()
    assert err < 0.01, err
    # the check is sharp enough to see a misplaced pixel grid: one binned pixel off is far worse
    assert np.abs(np.roll(b.dsa, 1, axis=2) - direct).max() / direct.max() > 5 * err
    assert case.binned(1) is case


def test_reconstruct_config_checks_the_binning_setting(tmp_path):
    from drgs_core.pipeline import ReconstructConfig

    assert ReconstructConfig(out=str(tmp_path), case="x").detector_binning == "auto"
    assert ReconstructConfig(out=str(tmp_path), case="x", detector_binning="2").detector_binning == 2
    for bad in (0, "two", -1):
        with pytest.raises(DRGSInputError, match="detector_binning"):
            ReconstructConfig(out=str(tmp_path), case="x", detector_binning=bad)
