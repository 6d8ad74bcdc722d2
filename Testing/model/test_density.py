"""Density control on constructed situations: clone, split, box pruning, accumulated-attenuation pruning."""

import math

import torch

from drgs_core.geometry import VolumeGrid
from drgs_core.model.density import DensityStats, densify_and_prune
from drgs_core.model.gaussians import GaussianModel
from drgs_core.train import TrainConfig, make_optimizer


def _model(scales, means, rho):
    grid = VolumeGrid((32, 32, 32), (1.0, 1.0, 1.0))
    m = GaussianModel(grid, n=len(means), static=True)
    m.means.data = torch.tensor(means, dtype=torch.float32)
    m.scales_raw.data = m.scales_to_raw(torch.tensor(scales, dtype=torch.float32)[:, None].repeat(1, 3))
    m.rho_raw.data = torch.tensor(rho, dtype=torch.float32)
    return m


def test_clone_split_and_prune_counts():
    # 0: small + high gradient -> clone; 1: large + high gradient -> split; 2: low gradient -> kept;
    # 3: outside the box -> pruned; 4: accumulated attenuation below 1e-6 -> pruned.
    means = [[0, 0, 0], [5, 5, 5], [-5, 0, 3], [40, 0, 0], [2, -3, 1]]
    m = _model([0.5, 5.0, 0.5, 0.5, 0.5], means, [0.1, 0.1, 0.1, 0.1, 0.0])
    opt = make_optimizer(m, TrainConfig(iterations=100))
    # Give Adam some state to check that it follows the edit.
    m.means.sum().backward()
    opt.step()
    stats = DensityStats.zeros(5, "cpu")
    W = H = 64
    g = torch.zeros(5, 2)
    g[0, 0] = g[1, 1] = 1e-4  # pixels -> x32 in NDC = 3.2e-3 > 1e-4
    g[2, 0] = 1e-7            # 3.2e-6 < 1e-4
    rho = torch.relu(m.rho_raw.detach())
    for _ in range(3):
        stats.update(torch.ones(5, dtype=torch.bool), g, W, H, rho)
    assert math.isclose(float(stats.mean_grad()[0]), 1e-4 * 32, rel_tol=1e-5)
    info = densify_and_prune(m, opt, stats, grad_threshold=1e-4, clone_limit=2.5, min_rho=1e-6)
    assert (info["cloned"], info["split"], info["pruned_box"], info["pruned_rho"]) == (1, 1, 1, 1)
    assert m.n == 5 - 2 + 1 + 1  # two pruned, one clone added, one split into two
    # Kept: 0 and 2 (1 was split); then the clone of 0; then the two children of 1.
    assert torch.allclose(m.means[0], torch.tensor([0.0, 0, 0]), atol=0.01)  # one small Adam step
    assert torch.allclose(m.means[2], m.means[0])
    children = m.means[3:].detach()
    assert (children - torch.tensor([5.0, 5, 5])).norm(dim=-1).max() < 5 * 5.0  # drawn from the parent
    assert torch.allclose(m.scales[3:], torch.full((2, 3), 5.0 / 1.6), rtol=1e-3)
    # The optimizer now holds the new tensors with state of matching size.
    held = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is m.means for p in held)
    assert opt.state[m.means]["exp_avg"].shape == (5, 3)


def test_unseen_gaussians_are_not_pruned_for_attenuation():
    m = _model([0.5, 0.5], [[0, 0, 0], [1, 1, 1]], [0.0, 0.0])
    opt = make_optimizer(m, TrainConfig(iterations=100))
    stats = DensityStats.zeros(2, "cpu")
    stats.update(torch.tensor([True, False]), torch.zeros(2, 2), 32, 32, torch.zeros(2))
    info = densify_and_prune(m, opt, stats, grad_threshold=1e-4, clone_limit=2.5, min_rho=1e-6)
    assert info["pruned_rho"] == 1 and m.n == 1
    assert torch.allclose(m.means[0], torch.tensor([1.0, 1, 1]))


def test_max_gaussians_caps_growth():
    m = _model([0.5] * 4, [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], [0.1] * 4)
    opt = make_optimizer(m, TrainConfig(iterations=100))
    stats = DensityStats.zeros(4, "cpu")
    stats.update(torch.ones(4, dtype=torch.bool), torch.tensor([[1e-3, 0]] * 4), 32, 32, torch.full((4,), 0.1))
    densify_and_prune(m, opt, stats, grad_threshold=1e-4, clone_limit=2.5, min_rho=1e-6, max_gaussians=6)
    assert m.n == 6
