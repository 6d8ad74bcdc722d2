"""FDK of the static vessel phantom (exact analytic projections) from all frames: correlation with the true
volume and vessels at the right world coordinates."""

import numpy as np
import torch

from drgs_core.ct import fdk
from drgs_core.metrics import chamfer_hd95, correlation, mesh_from_volume, robust_iso_level
from drgs_core.phantom import make_phantom, preset


def test_fdk_of_the_static_phantom_from_all_frames():
    ph = make_phantom(preset("demo", seed=2, static=True, noise=False, include_veins=False))
    case = ph.case
    vol = fdk(torch.as_tensor(case.dsa), case.geometry, case.grid).clamp_min(0).numpy()
    r = correlation(vol, ph.truth_volume)
    verts, _ = mesh_from_volume(vol, case.grid, robust_iso_level(vol))
    d = chamfer_hd95(verts, ph.truth_mesh[0])
    print(f"FDK all {case.n_frames} frames: r = {r:.3f}, CD = {d['cd']:.2f} mm, HD95 = {d['hd95']:.2f} mm")
    assert r >= 0.9
    voxel = case.grid.min_spacing  # 2 mm
    assert d["cd"] <= 1.5 * voxel
    # The brightest FDK voxel lies inside a true vessel (no flip or shift of the world frame).
    peak = np.unravel_index(np.argmax(vol), vol.shape)
    assert ph.truth_mask[peak]
