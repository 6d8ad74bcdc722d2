"""Tests for drgs_core.model.field (time-dependent attenuation field, METHOD §4)."""

import math

import pytest
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.model.field import AttenuationField
from drgs_core.model.hashgrid import HashGridEncoding


def _points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g), torch.rand(n, generator=g)


def test_default_architecture():
    torch.manual_seed(0)
    f = AttenuationField(seed=0)
    assert f.backend == "torch"  # CPU
    assert isinstance(f.h3d, HashGridEncoding) and isinstance(f.h4d, HashGridEncoding)
    assert (f.h3d.n_dims, f.h3d.base_resolution, f.h3d.growth, f.h3d.log2_table_size) == (3, 8, 1.45, 19)
    assert (f.h4d.n_dims, f.h4d.base_resolution, f.h4d.growth, f.h4d.log2_table_size) == (4, 2, 1.4, 19)
    assert f.h3d.n_output_dims == 24 and f.h4d.n_output_dims == 24
    linears = [m for m in f.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 64), (64, 64), (64, 1)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in f.mlp) == 2
    assert f.encoders() == [f.h3d, f.h4d]


def test_shape_nonnegative_and_alive_at_init():
    torch.manual_seed(1)
    f = AttenuationField(log2_table_size=12, init_rho=1e-2, seed=1)
    p, t = _points(500)
    rho = f(p, t)
    assert rho.shape == (500,) and rho.dtype == torch.float32
    assert bool((rho > 0).all())
    torch.testing.assert_close(rho.detach(), torch.full((500,), 1e-2), rtol=0, atol=1e-5)
    rho.sum().backward()
    for name, prm in f.named_parameters():
        assert prm.grad is not None, name
        assert float(prm.grad.abs().max()) > 0, name
    # every point has a gradient path: d rho / d (own table rows) is non-zero for each point
    f.zero_grad()
    per_point = torch.autograd.grad(f(p[:5], t[:5])[3], f.h3d.table)[0]
    assert float(per_point.abs().max()) > 0


def test_output_relu_never_negative():
    torch.manual_seed(2)
    f = AttenuationField(log2_table_size=10, seed=2)
    p, t = _points(300, seed=2)
    with torch.no_grad():
        f.mlp[-1].bias.fill_(-1.0)
    assert bool((f(p, t) == 0).all())
    with torch.no_grad():
        f.mlp[-1].bias.fill_(0.0)
        f.mlp[-1].weight.normal_()
    rho = f(p, t)
    assert bool((rho >= 0).all())


def test_time_argument_forms_agree():
    torch.manual_seed(3)
    f = AttenuationField(log2_table_size=10, seed=3)
    with torch.no_grad():  # make the field clearly time dependent
        f.h4d.table.uniform_(-1, 1)
    p, _ = _points(64, seed=3)
    a = f(p, 0.37)
    b = f(p, torch.tensor(0.37))
    c = f(p, torch.full((64,), 0.37))
    d = f(p, torch.full((64, 1), 0.37))
    for other in (b, c, d):
        torch.testing.assert_close(a, other, rtol=0, atol=0)
    assert float((f(p, 0.9) - a).detach().abs().max()) > 0
    with pytest.raises(DRGSInputError):
        f(p, torch.zeros(10))
    with pytest.raises(DRGSInputError):
        f(torch.rand(5, 4), 0.5)


def test_depends_on_time_after_training():
    torch.manual_seed(4)
    f = AttenuationField(log2_table_size=12, seed=4)
    p, _ = _points(400, seed=4)
    n = p.shape[0]
    t_early, t_late = torch.zeros(n), torch.ones(n)
    before = (f(p, t_early) - f(p, t_late)).abs().max().item()
    assert before < 1e-5  # tiny table init: almost no time dependence yet
    pts = torch.cat([p, p])
    ts = torch.cat([t_early, t_late])
    target = torch.cat([torch.full((n,), 0.005), torch.full((n,), 0.03)])  # vessel fills over time
    opt = torch.optim.Adam(f.parameters(), lr=1e-2, eps=1e-15)
    for _ in range(20):
        loss = ((f(pts, ts) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    diff = (f(p, t_late) - f(p, t_early)).detach()
    assert float(diff.mean()) > 0.01


def test_fit_to_reduces_mse():
    torch.manual_seed(5)
    f = AttenuationField(log2_table_size=12, seed=5)
    g = torch.Generator().manual_seed(5)
    p = torch.rand(1500, 3, generator=g)
    t = torch.rand(1500, generator=g)
    target = (0.02 + 0.01 * torch.sin(2 * math.pi * p[:, 0]) * torch.cos(math.pi * t)
              + 0.01 * p[:, 1] * p[:, 2])
    with torch.no_grad():
        mse0 = float(((f(p, t) - target) ** 2).mean())
    mse1 = f.fit_to(p, t, target, steps=60, lr=1e-2)
    with torch.no_grad():
        check = float(((f(p, t) - target) ** 2).mean())
    assert mse1 == pytest.approx(check, rel=1e-5)
    assert mse1 < mse0 / 10
    with pytest.raises(DRGSInputError):
        f.fit_to(p, t, target[:10], steps=1)


def test_fit_to_minibatch_and_scalar_time():
    torch.manual_seed(6)
    f = AttenuationField(log2_table_size=10, seed=6)
    p, _ = _points(800, seed=6)
    target = 0.01 + 0.02 * p[:, 0]
    with torch.no_grad():
        mse0 = float(((f(p, 0.5) - target) ** 2).mean())
    mse1 = f.fit_to(p, 0.5, target, steps=60, lr=1e-2, batch_size=256,
                    generator=torch.Generator().manual_seed(0))
    assert mse1 < mse0 / 10


def test_forward_times_matches_forward():
    torch.manual_seed(7)
    f = AttenuationField(log2_table_size=10, seed=7)
    with torch.no_grad():
        f.h3d.table.uniform_(-1, 1)
        f.h4d.table.uniform_(-1, 1)
    p, _ = _points(50, seed=7)
    times = [0.0, 0.25, 1.0]
    stacked = f.forward_times(p, times)
    assert stacked.shape == (3, 50)
    for k, tk in enumerate(times):
        torch.testing.assert_close(stacked[k], f(p, tk), rtol=1e-6, atol=1e-7)


def test_param_groups_cover_every_parameter_once():
    f = AttenuationField(log2_table_size=8, seed=0)
    groups = f.param_groups(lr=1e-3, weight_decay=5e-5)
    ids = [id(q) for grp in groups for q in grp["params"]]
    assert sorted(ids) == sorted(id(q) for q in f.parameters())
    assert len(ids) == len(set(ids))
    assert {grp["name"] for grp in groups} == {"field_encoding", "field_mlp"}
    assert all(grp["lr"] == 1e-3 and grp["weight_decay"] == 5e-5 for grp in groups)
    torch.optim.Adam(groups, eps=1e-15)  # accepted by the optimiser


def test_backend_selection_on_cpu():
    assert AttenuationField(log2_table_size=8, backend="auto").backend == "torch"
    with pytest.raises(DRGSInputError):
        AttenuationField(log2_table_size=8, backend="tcnn", device="cpu")
    with pytest.raises(DRGSInputError):
        AttenuationField(log2_table_size=8, backend="jax")
    with pytest.raises(DRGSInputError):
        AttenuationField(log2_table_size=8, init_rho=0.0)


def test_h4d_input_is_position_then_time():
    f = AttenuationField(log2_table_size=8, seed=8)
    seen = {}

    def hook(mod, args, out):
        seen["x"] = args[0].detach().clone()

    f.h4d.register_forward_hook(hook)
    p, t = _points(20, seed=8)
    f(p, t)
    torch.testing.assert_close(seen["x"], torch.cat([p, t[:, None]], dim=1), rtol=0, atol=0)
