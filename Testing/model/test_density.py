"""Density control (model.density statistics, model.strategy policy) on constructed situations."""

import math

import numpy as np
import pytest
import torch

from drgs_core.geometry import VolumeGrid
from drgs_core.model.density import RESIDUAL_BOX, DensityStats, measure_noise
from drgs_core.model.gaussians import GaussianModel
from drgs_core.model.strategy import DensityConfig, DensityStrategy
from drgs_core.train import TrainConfig, make_optimizer


def _model(scales, means, rho):
    grid = VolumeGrid((32, 32, 32), (1.0, 1.0, 1.0))
    m = GaussianModel(grid, n=len(means), static=True)
    m.means.data = torch.tensor(means, dtype=torch.float32)
    m.scales_raw.data = m.scales_to_raw(torch.tensor(scales, dtype=torch.float32)[:, None].repeat(1, 3))
    m.rho_raw.data = torch.tensor(rho, dtype=torch.float32)
    return m


def _feed(strategy, m, grads, resid, visible=None, times=3, W=64, H=64):
    """Accumulate `times` views in which Gaussian i has pixel gradient grads[i] (u) and the residual at its
    (distinct) projected centre is resid[i]."""
    n = m.n
    vis = torch.ones(n, dtype=torch.bool) if visible is None else torch.as_tensor(visible)
    g = torch.zeros(n, 2)
    g[:, 0] = torch.as_tensor(grads, dtype=torch.float32)
    img = torch.zeros(H, W)
    centres = torch.zeros(n, 2)
    for i in range(n):  # each centre in its own 5x5 block so that the box filter reads exactly resid[i]
        u, v = 4 + 8 * (i % 7), 4 + 8 * (i // 7)
        img[v - 2:v + 3, u - 2:u + 3] = float(resid[i])
        centres[i] = torch.tensor([u, v])
    rho = torch.relu(m.rho_raw.detach())
    for _ in range(times):
        strategy.stats.update(vis, g, W, H, rho, residual=img, centres=centres)


def _strategy(m, **kw):
    cfg = DensityConfig(start=0, stop=100, every=10, decay_every=0, **kw)
    opt = make_optimizer(m, TrainConfig(iterations=100))
    return DensityStrategy(cfg, m, noise_sigma=0.05), opt


def test_residual_read_at_centres_through_the_box_filter():
    st = DensityStats.zeros(2, "cpu")
    img = torch.zeros(32, 32)
    img[10, 10] = 25.0          # one bright pixel: the 5x5 box mean around it is 1
    centres = torch.tensor([[10.2, 9.8], [25.0, 25.0]])
    st.update(torch.ones(2, dtype=torch.bool), torch.zeros(2, 2), 32, 32, torch.zeros(2), residual=img,
              centres=centres)
    assert RESIDUAL_BOX == 5
    assert torch.allclose(st.mean_residual(), torch.tensor([1.0, 0.0]))


def test_grow_only_where_the_residual_says_structure_is_missing():
    # 0: small, high gradient, positive residual -> clone; 1: large, same -> split;
    # 2: high gradient but the residual is noise-level -> gated out; 3: low gradient -> kept.
    means = [[0, 0, 0], [5, 5, 5], [-5, 0, 3], [2, -3, 1]]
    m = _model([0.5, 5.0, 0.5, 0.5], means, [0.1] * 4)
    s, opt = _strategy(m, max_growth=1.0)
    m.means.sum().backward()
    opt.step()  # Adam state that must follow the edit
    _feed(s, m, grads=[1e-4, 1e-4, 1e-4, 1e-8], resid=[0.2, 0.2, 0.001, 0.2])
    assert math.isclose(float(s.stats.mean_grad()[0]), 1e-4 * 32, rel_tol=1e-5)
    info = s.densify_and_prune(m, opt, clone_limit=2.5)
    assert (info["cloned"], info["split"], info["grow_gated_out"]) == (1, 1, 1)
    assert m.n == 4 - 1 + 1 + 2
    children = m.means[4:].detach()
    assert (children - torch.tensor([5.0, 5, 5])).norm(dim=-1).max() < 5 * 5.0
    assert torch.allclose(m.scales[4:], torch.full((2, 3), 5.0 / 1.6), rtol=1e-3)
    assert opt.state[m.means]["exp_avg"].shape == (6, 3)


def test_pruning_reasons():
    # 0: kept; 1: outside the box; 2: negligible contribution; 3: rejected by most views (too bright there);
    # 4: oversized (7 mm > 6 voxels of 1 mm); 5: never seen -> kept.
    means = [[0, 0, 0], [40, 0, 0], [3, 0, 0], [0, 3, 0], [0, 0, 3], [-3, 0, 0]]
    m = _model([0.5, 0.5, 0.5, 0.5, 7.0, 0.5], means, [0.1, 0.1, 1e-6, 0.1, 0.1, 0.0])
    s, opt = _strategy(m)
    _feed(s, m, grads=[0.0] * 6, resid=[0.0, 0.0, 0.0, -0.3, 0.0, 0.0],
          visible=[True, True, True, True, True, False])
    info = s.densify_and_prune(m, opt, clone_limit=2.5)
    assert (info["pruned_box"], info["pruned_rho"], info["pruned_rejected"], info["pruned_oversized"]) == (1, 1, 1, 1)
    assert m.n == 2
    assert torch.allclose(m.means.detach(), torch.tensor([[0.0, 0, 0], [-3.0, 0, 0]]))


def test_budget_is_never_exceeded():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-10, 10, (20, 3)).tolist()
    m = _model([0.5] * 20, pts, [0.1] * 20)
    cfg = DensityConfig(start=0, stop=1000, every=1, decay_every=0, max_growth=1.0, max_gaussians=10_000)
    opt = make_optimizer(m, TrainConfig(iterations=100))
    s = DensityStrategy(cfg, m, noise_sigma=0.0, vessel_voxels=33)
    assert s.budget == 33
    for it in range(1, 6):
        _feed(s, m, grads=[1e-3] * m.n, resid=[0.5] * m.n, W=128, H=128)
        rec = s.step(m, opt, it)
        assert rec is not None and m.n <= 33
    assert m.n == 33
    assert s.log[-1]["grow_capped"] > 0


def test_decay_shrinks_static_attenuation_and_restarts_statistics():
    m = _model([0.5], [[0, 0, 0]], [0.4])
    cfg = DensityConfig(start=0, stop=100, every=1000, decay_every=10, decay_factor=0.5)
    s = DensityStrategy(cfg, m)
    opt = make_optimizer(m, TrainConfig(iterations=100))
    _feed(s, m, grads=[0.0], resid=[0.0])
    assert s.step(m, opt, 9) is None
    old_stats = s.stats
    assert s.step(m, opt, 10)["decayed"]
    assert math.isclose(float(m.rho_raw.detach()[0]), 0.2, rel_tol=1e-6)
    assert s.stats is not old_stats and float(s.stats.visible_count.sum()) == 0


def test_state_dict_round_trip():
    m = _model([0.5, 0.5], [[0, 0, 0], [1, 1, 1]], [0.1, 0.1])
    s, _ = _strategy(m)
    _feed(s, m, grads=[1e-4, 0], resid=[0.1, -0.1])
    s.log.append({"n": 2})
    t, _ = _strategy(m)
    t.load_state_dict(s.state_dict())
    for name in DensityStats.names:
        assert torch.equal(getattr(t.stats, name), getattr(s.stats, name))
    assert t.log == s.log and t.budget == s.budget and t.noise_sigma == s.noise_sigma


@pytest.mark.parametrize("sigma", [0.01, 0.1])
def test_noise_measurement(sigma):
    g = torch.Generator().manual_seed(0)
    imgs = torch.zeros(4, 64, 64)
    imgs[:, 20:30, :] = 5.0  # a bright band (structure) must not inflate the estimate
    imgs += sigma * torch.randn(imgs.shape, generator=g)
    assert measure_noise(imgs) == pytest.approx(sigma, rel=0.1)
