"""vessel_iso_level: the default surface level of Gaussian reconstructions."""

import numpy as np

from drgs_core.metrics import vessel_iso_level


def test_vessel_iso_level_is_a_fraction_of_the_robust_vessel_value_and_scale_equivariant():
    rng = np.random.default_rng(0)
    v = np.zeros((40, 40, 40), np.float32)
    v[10:30, 18:22, 18:22] = 1.0           # a bright vessel
    v[5:35, 5:7, 30:32] = 0.3              # a faint one, which the level must keep
    v += rng.uniform(0, 1e-4, v.shape).astype(np.float32)
    level = vessel_iso_level(v)
    assert abs(level - 0.2) < 1e-3         # 20 % of the 99.5th percentile of the vessel voxels (= 1.0)
    assert level < 0.3
    assert abs(vessel_iso_level(7.0 * v) - 7.0 * level) < 1e-5
