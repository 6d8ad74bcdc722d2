"""Shared fixtures for the drgs_core.io tests: a tiny anisotropic case (fast, catches transposes)."""

import numpy as np
import pytest

from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
from drgs_core.io import Case

N_FRAMES, HEIGHT, WIDTH = 6, 8, 10


@pytest.fixture
def grid():
    return VolumeGrid((6, 5, 4), (0.5, 0.6, 0.7))


@pytest.fixture
def small_case(grid):
    rng = np.random.default_rng(0)
    dsa = rng.uniform(0.0, 3.0, (N_FRAMES, HEIGHT, WIDTH)).astype(np.float32)
    dsa[:, 0, :] = 0.0  # background rows
    primary = np.linspace(-1.7, 1.8, N_FRAMES)
    secondary = np.linspace(-0.1, 0.2, N_FRAMES)
    geom = ConeBeamGeometry(750.0, 1200.0, (HEIGHT, WIDTH), (0.31, 0.37), primary, secondary)
    return Case(dsa=dsa, geometry=geom, grid=grid, name="tiny")
