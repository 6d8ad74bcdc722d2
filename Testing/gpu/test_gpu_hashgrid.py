"""GPU hash-grid encodings (each backend via `impl`) vs `HashGridEncoding.forward_torch` (the torch reference):
indexing, values, grads."""

import pytest
import torch

from _gpu_testlib import rel_err

pytestmark = pytest.mark.gpu

CONFIGS = [
    # (n_dims, n_levels, n_features, log2_table_size, base, growth)
    (3, 12, 2, 14, 8, 1.45),    # h3D shape with a small table: direct and hashed levels
    (4, 12, 2, 14, 2, 1.4),     # h4D shape
    (3, 12, 2, 19, 8, 1.45),    # the model's h3D
    (4, 12, 2, 19, 2, 1.4),     # the model's h4D
    (1, 6, 1, 8, 4, 2.0),
    (2, 8, 4, 10, 3, 1.7),
    (3, 4, 8, 12, 5, 1.5),
]


def _points(P, D, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(P, D, generator=gen)
    k = P // 8
    x[:k] = torch.randint(0, 2, (k, D), generator=gen).float()           # corners of the cube (0 and 1)
    x[k:2 * k] = torch.rand(k, D, generator=gen) * 1.4 - 0.2              # partly outside [0, 1]: clamped
    x[2 * k:3 * k] = torch.randint(0, 9, (k, D), generator=gen).float() / 8  # on grid vertices of some levels
    return x.to(device)


def _encoders(cfg, seed):
    from drgs_core.model.hashgrid import HashGridEncoding

    D, L, F, log2, base, growth = cfg
    enc = HashGridEncoding(D, L, F, log2, base, growth, seed=seed).cuda()
    with torch.no_grad():  # values well away from zero so that wrong rows show
        enc.table.uniform_(-1.0, 1.0, generator=torch.Generator(device="cuda").manual_seed(seed))
    return enc


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("P", [1, 333, 20000])
def test_forward_and_grads_match_reference(impl, cfg, P):
    enc = _encoders(cfg, seed=P)
    assert impl.hashgrid_supports(enc, torch.zeros(1, cfg[0], device="cuda"))
    x = _points(P, cfg[0], P + 1, "cuda")
    G = torch.randn(P, cfg[1] * cfg[2], device="cuda")

    xr = x.clone().requires_grad_(True)
    ref = enc.forward_torch(xr)
    (ref * G).sum().backward()
    ref_gt, ref_gx = enc.table.grad.clone(), xr.grad.clone()
    enc.table.grad = None

    xc = x.clone().requires_grad_(True)
    out = impl.hashgrid_encode(enc, xc)
    (out * G).sum().backward()
    gt, gx = enc.table.grad, xc.grad

    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-6, rel_err(out, ref)
    assert torch.isfinite(gt).all() and torch.isfinite(gx).all()
    assert rel_err(gt, ref_gt) <= 1e-5, rel_err(gt, ref_gt)
    assert rel_err(gx, ref_gx) <= 1e-4, rel_err(gx, ref_gx)


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_rows_touched_are_exactly_the_reference_rows(impl, cfg):
    """Bit-exact indexing: the set of table rows receiving gradient, level by level, equals the reference's."""
    enc = _encoders(cfg, seed=5)
    D, L, F = cfg[0], cfg[1], cfg[2]
    x = _points(4096, D, 9, "cuda")
    for level in range(L):
        G = torch.zeros(x.shape[0], L * F, device="cuda")
        G[:, level * F:(level + 1) * F] = 1.0
        enc.table.grad = None
        (enc.forward_torch(x) * G).sum().backward()
        ref_rows = enc.table.grad.abs().sum(1) > 0
        enc.table.grad = None
        (impl.hashgrid_encode(enc, x) * G).sum().backward()
        rows = enc.table.grad.abs().sum(1) > 0
        assert torch.equal(rows, ref_rows), f"level {level} (hashed={enc.uses_hash(level)})"


def test_integer_table_gives_exact_rows(impl):
    """With x on a level's vertices only the base corner has weight: out = table[row] exactly."""
    from drgs_core.model.hashgrid import HashGridEncoding

    enc = HashGridEncoding(3, 12, 1, 14, 8, 1.45).cuda()
    with torch.no_grad():
        enc.table.copy_(torch.arange(enc.total_rows, dtype=torch.float32, device="cuda")[:, None])
    for level in range(12):
        N = enc.level_resolutions[level]
        c = torch.randint(0, N, (2000, 3), generator=torch.Generator().manual_seed(level))
        x = (c.double() / N).float().cuda()
        out = impl.hashgrid_encode(enc, x)[:, level]
        ref = enc.forward_torch(x)[:, level]
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-3), level
        assert torch.allclose(out, out.round(), atol=1e-2), level  # a row value, not a blend of rows


def test_empty_input(impl):
    enc = _encoders(CONFIGS[0], seed=1)
    out = impl.hashgrid_encode(enc, torch.zeros(0, 3, device="cuda"))
    assert out.shape == (0, 24)
