"""drgs_core.metrics: PSNR / SSIM on image stacks and voxel metrics (Dice, correlation, resampling)."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from drgs_core.geometry import VolumeGrid
from drgs_core.metrics import (best_dice, correlation, dice, normalise_minmax, psnr, psnr_ssim_2d,
                               resample_to_grid, split_train_heldout, ssim)


def smooth_image(rng, h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w))
    for _ in range(6):
        cy, cx, s, a = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10), rng.uniform(0.2, 1.0)
        img += a * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return img


# ---------------------------------------------------------------- PSNR
def test_psnr_identical_is_inf():
    img = smooth_image(np.random.default_rng(1))
    assert psnr(img, img) == math.inf
    out = psnr_ssim_2d(img[None], img[None])
    assert out["psnr"] == math.inf and out["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.01, 0.02, 0.05])
def test_psnr_follows_formula_for_known_noise(sigma):
    rng = np.random.default_rng(2)
    clean = rng.uniform(0.0, 1.0, (3, 40, 50))
    clean[:, 0, 0], clean[:, 0, 1] = 0.0, 1.0                 # every frame already spans [0, 1]
    noisy_px = (clean > 0.2) & (clean < 0.8)                    # noise keeps min and max unchanged
    noise = sigma * rng.choice([-1.0, 1.0], size=clean.shape) * noisy_px
    out = psnr_ssim_2d(clean + noise, clean)
    expected = [-10.0 * math.log10(sigma ** 2 * noisy_px[k].mean()) for k in range(3)]
    np.testing.assert_allclose(out["psnr_per_frame"], expected, rtol=1e-9)
    assert out["psnr"] == pytest.approx(np.mean(expected))


def test_psnr_invariant_to_scale_and_offset_and_drops_6db_per_doubling():
    rng = np.random.default_rng(3)
    img = smooth_image(rng)
    img = (img - img.min()) / (img.max() - img.min())
    n = rng.standard_normal(img.shape) * (img > 0.3) * (img < 0.7)
    p1 = psnr_ssim_2d(5.0 * (img + 0.01 * n) + 2.0, img)["psnr"]  # any intensity scale: min-max first
    p2 = psnr_ssim_2d(img + 0.02 * n, img)["psnr"]
    assert p1 - p2 == pytest.approx(20 * math.log10(2), abs=1e-6)


def test_constant_images_are_guarded():
    out = psnr_ssim_2d(np.full((2, 16, 16), 3.0), np.zeros((2, 16, 16)))
    assert np.isfinite(out["ssim"]) and out["psnr"] == math.inf
    assert normalise_minmax(np.full((4, 4), 7.0)).max() == 0.0


def test_train_heldout_split():
    rng = np.random.default_rng(4)
    meas = np.stack([smooth_image(rng) for _ in range(5)])
    rend = meas + 0.01 * rng.standard_normal(meas.shape)
    out = psnr_ssim_2d(rend, meas, train_idx=[0, 3])
    ps, ss = np.array(out["psnr_per_frame"]), np.array(out["ssim_per_frame"])
    assert out["psnr_train"] == pytest.approx(ps[[0, 3]].mean())
    assert out["psnr_heldout"] == pytest.approx(ps[[1, 2, 4]].mean())
    assert out["ssim_heldout"] == pytest.approx(ss[[1, 2, 4]].mean())
    assert split_train_heldout([1.0, 2.0], [0, 1])[0] == 1.5 and math.isnan(split_train_heldout([1.0, 2.0], [0, 1])[1])


# ---------------------------------------------------------------- SSIM
def test_ssim_self_is_one_and_matches_skimage():
    rng = np.random.default_rng(5)
    for _ in range(3):
        a = normalise_minmax(smooth_image(rng))
        b = np.clip(a + 0.08 * rng.standard_normal(a.shape), 0, 1)
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0)
        ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).item()
        assert abs(ours - ref) < 1e-3
        assert ssim(torch.from_numpy(a), torch.from_numpy(a)).item() == pytest.approx(1.0, abs=1e-12)
        assert psnr_ssim_2d(b[None], a[None])["ssim"] == pytest.approx(ref, abs=1e-3)


def test_ssim_is_differentiable_and_batched():
    rng = np.random.default_rng(6)
    a = torch.tensor(np.stack([normalise_minmax(smooth_image(rng)) for _ in range(2)]), dtype=torch.float32)
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    b.requires_grad_(True)
    s4 = ssim(a[:, None], b[:, None])
    assert s4.ndim == 0
    (1.0 - s4).backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    s_each = [ssim(a[i], b[i].detach()).item() for i in range(2)]
    assert s4.item() == pytest.approx(np.mean(s_each), abs=1e-6)


# ---------------------------------------------------------------- Dice, correlation
def test_dice_offset_cubes_exact():
    vol = np.zeros((30, 30, 30))
    vol[10:20, 10:20, 10:20] = 1.0
    truth = np.zeros((30, 30, 30), dtype=bool)
    truth[12:22, 10:20, 10:20] = True                           # overlap 8 x 10 x 10
    assert dice(vol, truth, 0.5) == pytest.approx(2 * 800 / 2000, abs=0)
    assert dice(vol, vol > 0.5, 0.5) == 1.0
    assert dice(vol, truth) == pytest.approx(0.8)              # no threshold: volume as a mask
    assert dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3), bool), 0.5) == 1.0
    assert dice(torch.as_tensor(vol), torch.as_tensor(truth), 0.5) == pytest.approx(0.8)


def test_best_dice_finds_the_threshold():
    grid = VolumeGrid((32, 32, 32), (1.0, 1.0, 1.0))
    X = grid.voxel_centres().double().numpy()
    vol = np.exp(-((X - [3.0, -2.0, 1.0]) ** 2).sum(-1) / 60.0) + 0.01 * X[..., 0] / 16
    truth = vol > 0.37
    d, th = best_dice(vol, truth)
    assert d == 1.0
    assert np.array_equal(vol > th, truth)
    d2, th2 = best_dice(vol, truth, thresholds=[0.1, 0.37, 0.6])
    assert d2 == 1.0 and th2 == 0.37
    noisy = vol + 0.02 * np.random.default_rng(7).standard_normal(vol.shape)
    d3, th3 = best_dice(noisy, truth)
    assert d3 == pytest.approx(dice(noisy, truth, th3)) and 0.3 < th3 < 0.45
    assert d3 >= max(dice(noisy, truth, t) for t in np.linspace(0.2, 0.6, 81))


def test_best_dice_equals_an_exhaustive_search_with_ties_and_a_floor_of_zeros():
    """Mostly-zero volumes with tied values (as voxelised reconstructions are): the best Dice equals the best of
    every threshold (each distinct value, and one below the minimum: everything kept), and its threshold
    reproduces it."""
    rng = np.random.default_rng(3)
    for trial in range(150):
        n = int(rng.integers(1, 50))
        v = rng.choice([0.0, 0.0, 0.0, 0.1, 0.2, 0.5, float(rng.random())], size=n)
        if trial % 3 == 0:
            v = rng.random(n) - 0.5 * (trial % 2)  # distinct values, some negative
        t = rng.random(n) < rng.choice([0.05, 0.3, 0.9])
        thresholds = np.concatenate([np.unique(v), [v.min() - 1.0]])
        exhaustive = max(dice(v, t, float(th)) for th in thresholds)
        d, th = best_dice(v, t)
        assert d == pytest.approx(exhaustive, abs=1e-12), (v, t)
        assert dice(v, t, th) == pytest.approx(d, abs=1e-12)


def test_correlation():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((10, 12, 14))
    assert correlation(a, 3.0 * a + 1.0) == pytest.approx(1.0)
    assert correlation(a, -a) == pytest.approx(-1.0)
    b = rng.standard_normal(a.shape)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert abs(correlation(a, b)) < 0.1


# ---------------------------------------------------------------- resampling
def linear(p):
    return 0.3 * p[..., 0] - 0.2 * p[..., 1] + 0.1 * p[..., 2] + 5.0


def test_resample_linear_function_is_exact():
    g_from = VolumeGrid((20, 24, 16), (2.0, 1.5, 2.5))           # box 40 x 36 x 40 mm
    g_to = VolumeGrid((30, 25, 28), (1.0, 1.3, 1.1))             # inside g_from's voxel-centre hull
    vol = linear(g_from.voxel_centres(dtype=torch.float64).numpy())
    out = resample_to_grid(vol, g_from, g_to)
    assert isinstance(out, np.ndarray) and out.shape == g_to.resolution
    np.testing.assert_allclose(out, linear(g_to.voxel_centres(dtype=torch.float64).numpy()), atol=1e-10)
    out_t = resample_to_grid(torch.as_tensor(vol), g_from, g_to, chunk=2000)   # torch in, torch out, chunked
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out, atol=1e-12)


def test_resample_outside_box_gets_fill_and_identity_roundtrip():
    g = VolumeGrid((8, 8, 8), (2.0, 2.0, 2.0))                   # box +-8 mm
    big = VolumeGrid((12, 12, 12), (2.0, 2.0, 2.0))              # box +-12 mm, centres on the same lattice
    vol = np.random.default_rng(9).uniform(1, 2, g.resolution)
    np.testing.assert_allclose(resample_to_grid(vol, g, g), vol, atol=1e-12)
    out = resample_to_grid(vol, g, big, fill=-1.0)
    np.testing.assert_allclose(out[2:10, 2:10, 2:10], vol, atol=1e-12)
    assert (out[:2] == -1.0).all() and (out[10:] == -1.0).all()
