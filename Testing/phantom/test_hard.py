"""Hard-physics presets and what handles them: mask-to-fill registration, the bounded density control and
speck removal on a CPU-sized hard case."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from drgs_core.ct.registration import estimate_shifts, register_case, shift_images
from drgs_core.errors import DRGSInputError
from drgs_core.phantom import make_phantom, write_phantom
from drgs_core.phantom.presets import PRESETS, preset


def test_hard_presets_add_the_hard_physics():
    for name, size in (("hard", "paper"), ("hard-demo", "demo")):
        cfg = preset(name)
        base = preset(size)
        assert cfg.volume_resolution == base.volume_resolution and cfg.detector_shape == base.detector_shape
        assert cfg.photons == 1e4 and cfg.electronic_noise == 5.0 and cfg.scatter_fraction == pytest.approx(0.1)
        assert np.linalg.norm(cfg.motion_shift_mm) == pytest.approx(0.5, abs=0.01)
        assert np.linalg.norm(cfg.motion_rotation_deg) == pytest.approx(0.4, abs=0.01)
        assert cfg.max_branches > base.max_branches
    assert "hard" in PRESETS and "hard-demo" in PRESETS


def _runs(shift, n=3, size=64, seed=0):
    """Smooth random background (bone-like edges), a bright vessel line in the fill run, the mask run shifted
    by `shift` (u, v) pixels; positive intensities."""
    rng = np.random.default_rng(seed)
    B = gaussian_filter(rng.normal(size=(n, size, size)), (0, 3, 3)) * 8.0 + 2.0
    B[:, :, size // 3:] += 1.0                      # a sharp "bone edge"
    V = np.zeros_like(B)
    V[:, size // 2 - 1:size // 2 + 2, 5:-5] = 0.8  # a horizontal vessel
    fill = np.exp(-(B + V)) * 1e4
    mask_t = torch.as_tensor(np.exp(-B) * 1e4, dtype=torch.float32)
    # mask(x + d) = background(x): the mask is the background sampled at x - d
    mask = shift_images(mask_t, -torch.tensor([shift] * n, dtype=torch.float32)).numpy()
    return fill.astype(np.float32), mask, V


def test_registration_recovers_a_subpixel_shift_despite_vessels():
    fill, mask, _ = _runs((0.6, -0.35))
    d, energy = estimate_shifts(fill, mask)
    assert np.allclose(d, [[0.6, -0.35]] * 3, atol=0.05), d
    assert energy["residual_after"] < 0.3 * energy["residual_before"]


def test_register_case_auto_applies_only_when_it_helps():
    from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
    from drgs_core.io.case import Case

    geo = ConeBeamGeometry(750.0, 1200.0, (64, 64), (1.0, 1.0), np.zeros(3), np.zeros(3))
    grid = VolumeGrid((8, 8, 8), (1.0, 1.0, 1.0))
    for shift, expect in (((0.7, 0.4), True), ((0.0, 0.0), False)):
        fill, mask, V = _runs(shift)
        dsa = np.clip(np.log(mask) - np.log(fill), 0, None)
        case = Case(dsa=dsa, geometry=geo, grid=grid, fill=fill, mask=mask)
        out, rep = register_case(case, "auto")
        assert rep["applied"] is expect, rep
        assert out.meta["registration"] == rep  # recorded either way (metrics.json)
        if expect:
            err_before = np.abs(case.dsa - V)[:, 8:-8, 8:-8].mean()
            err_after = np.abs(out.dsa - V)[:, 8:-8, 8:-8].mean()
            assert err_after < 0.4 * err_before
            assert out.meta["registration"]["applied"]
    with pytest.raises(DRGSInputError, match="registration"):
        register_case(case, "sometimes")


@pytest.fixture(scope="module")
def hard_case(tmp_path_factory):
    # A tiny hard case: 40 frames of 64^2, a 40^3 grid of 3 mm voxels.
    cfg = preset("hard-demo", n_frames=40, detector_shape=(64, 64), volume_resolution=(40, 40, 40),
                 volume_spacing=(3.2, 3.2, 3.2), artery_root_radius=3.0, artery_min_radius=1.6,
                 vein_root_radius=3.5, vein_min_radius=1.8, max_branches=24)
    d = tmp_path_factory.mktemp("hard") / "case"
    write_phantom(make_phantom(cfg), d)
    return d


def test_hard_case_registration_reduces_the_subtraction_error(hard_case):
    from drgs_core.io import read_case

    case = read_case(hard_case)
    out, rep = register_case(case, "auto")
    assert rep["applied"] and rep["residual_reduction"] > 0.1, rep


def test_hard_case_reconstruction_is_registered_bounded_and_has_no_far_specks(hard_case, tmp_path):
    """CPU-sized hard case: registration is applied, the Gaussian count stays within the budget, every density
    round says why it removed what it removed, and the surface has fewer far-off errors than FDK's (HD95).
    (Beating FDK on Dice and CD at this size within a test's time is not reached yet: see bench/RESULTS.md.)"""
    from drgs_core.pipeline import ReconstructConfig, run_fdk, run_reconstruction

    fdk = run_fdk(hard_case, tmp_path / "fdk", views=20, device="cpu")["truth"]
    cfg = ReconstructConfig(out=str(tmp_path / "4d"), case=str(hard_case), views=20, device="cpu", preset="tiny",
                            iterations=400, seed=0, times_4d=2)
    ours = run_reconstruction(cfg)["metrics"]
    print("FDK", fdk, "\n4D", ours["truth"], ours["registration"], ours["specks"])
    assert ours["registration"]["applied"]
    assert ours["truth"]["hd95_mm"] < fdk["hd95_mm"]
    m = json.loads((tmp_path / "4d" / "metrics.json").read_text())
    budget = m["density"]["budget"]
    assert ours["n_gaussians"] <= budget <= 2000
    rounds = [r for r in m["densify"] if "cloned" in r]
    assert rounds and all(r["n"] <= budget for r in rounds)
    for r in rounds:  # the counts add up: n = n_before + clones + splits - removals
        removed = r["pruned_box"] + r["pruned_rho"] + r["pruned_rejected"] + r["pruned_oversized"]
        assert r["n"] == r["n_before"] + r["cloned"] + r["split"] - removed
    assert m["specks"]["min_voxels"] >= 4
