"""Tests for drgs_core.model.hashgrid (multiresolution hash-grid encoding, METHOD §4 / DESIGN model)."""

import itertools
from fractions import Fraction

import pytest
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.model.hashgrid import HashGridEncoding, grid_index, hash_index

PRIMES_AS_WRITTEN = [1, 2654435761, 805459861, 3674653429]


def _small(n_dims, dtype=torch.float64, seed=0):
    """Small encoders with both direct and hashed levels and random O(1) table values."""
    if n_dims == 3:   # N = 2 (27 rows, direct), 4 (125 > 64, hashed), 8 (hashed)
        enc = HashGridEncoding(3, n_levels=3, n_features=2, log2_table_size=6, base_resolution=2, growth=2.0)
    else:             # N = 2 (81 rows, direct), 3 (256 > 128, hashed), 4 (hashed)
        enc = HashGridEncoding(4, n_levels=3, n_features=2, log2_table_size=7, base_resolution=2, growth=1.5)
    enc = enc.to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.table.copy_(torch.rand(enc.table.shape, generator=g, dtype=dtype) * 2 - 1)
    return enc


def _slow_reference(enc, x):
    """Per-point, per-corner loop written straight from the equations, using Python ints for indices."""
    n_pts, n_dims = x.shape
    f_ = enc.n_features
    out = torch.zeros(n_pts, enc.n_levels * f_, dtype=enc.table.dtype)
    for lvl in range(enc.n_levels):
        n = enc.level_resolutions[lvl]
        side = n + 1
        for p in range(n_pts):
            xs = [min(max(float(v), 0.0), 1.0) * n for v in x[p]]
            cell = [min(max(int(torch.floor(torch.tensor(v, dtype=torch.float64))), 0), n - 1) for v in xs]
            frac = [xs[d] - cell[d] for d in range(n_dims)]
            acc = torch.zeros(f_, dtype=enc.table.dtype)
            for bits in itertools.product((0, 1), repeat=n_dims):
                v = [cell[d] + bits[d] for d in range(n_dims)]
                w = 1.0
                for d in range(n_dims):
                    w *= frac[d] if bits[d] else 1.0 - frac[d]
                if side ** n_dims <= enc.table_size:
                    local = sum(v[d] * side ** d for d in range(n_dims))
                else:
                    h = 0
                    for d in range(n_dims):
                        h ^= (v[d] * PRIMES_AS_WRITTEN[d]) % (1 << 32)
                    local = h % enc.table_size
                acc = acc + w * enc.table.detach()[enc.level_offsets[lvl] + local]
            out[p, lvl * f_:(lvl + 1) * f_] = acc
    return out


# ---------------------------------------------------------------- level layout


@pytest.mark.parametrize("n_dims,base,growth_frac,hashed", [
    (3, 8, Fraction(29, 20), [7, 8, 9, 10, 11]),
    (4, 2, Fraction(7, 5), [8, 9, 10, 11]),
])
def test_default_levels_and_hash_switch(n_dims, base, growth_frac, hashed):
    enc = HashGridEncoding(n_dims, base_resolution=base, growth=float(growth_frac))
    exact = [int(base * growth_frac ** l) for l in range(12)]  # exact rational floor (positive values)
    assert enc.level_resolutions == exact
    t = 1 << 19
    assert enc.hashed_levels() == hashed
    assert [l for l in range(12) if enc.uses_hash(l)] == hashed
    for l in range(12):
        expect_hash = (exact[l] + 1) ** n_dims > t
        assert enc.uses_hash(l) == expect_hash
        assert enc.level_sizes[l] == (t if expect_hash else (exact[l] + 1) ** n_dims)
    assert enc.level_offsets[0] == 0
    for l in range(1, 12):
        assert enc.level_offsets[l] == enc.level_offsets[l - 1] + enc.level_sizes[l - 1]
    assert tuple(enc.table.shape) == (sum(enc.level_sizes), 2)
    assert enc.table.dtype == torch.float32
    assert float(enc.table.detach().abs().max()) <= 1e-4
    assert float(enc.table.detach().std()) > 1e-5


def test_resolutions_known_values():
    e3 = HashGridEncoding(3, log2_table_size=8, base_resolution=8, growth=1.45)
    e4 = HashGridEncoding(4, log2_table_size=8, base_resolution=2, growth=1.4)
    assert e3.level_resolutions == [8, 11, 16, 24, 35, 51, 74, 107, 156, 226, 328, 476]
    assert e4.level_resolutions == [2, 2, 3, 5, 7, 10, 15, 21, 29, 41, 57, 80]


def test_seed_reproducible():
    a = HashGridEncoding(3, n_levels=2, log2_table_size=8, seed=3)
    b = HashGridEncoding(3, n_levels=2, log2_table_size=8, seed=3)
    c = HashGridEncoding(3, n_levels=2, log2_table_size=8, seed=4)
    assert torch.equal(a.table, b.table)
    assert not torch.equal(a.table, c.table)


# ---------------------------------------------------------------- index functions


def test_hash_index_hand_computed():
    pts = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (3, 5, 7), (476, 475, 1), (123456, 654321, 999999)]
    for t in (1 << 19, 1 << 6, 1000):
        got = hash_index(torch.tensor(pts, dtype=torch.int64), t).tolist()
        for (a, b, c), g in zip(pts, got):
            h = (a % 4294967296) ^ ((b * 2654435761) % 4294967296) ^ ((c * 805459861) % 4294967296)
            assert g == h % t
    # explicit numbers for two points (worked by hand with Python ints)
    assert hash_index(torch.tensor([0, 1, 0]), 1 << 32).item() == 2654435761
    assert hash_index(torch.tensor([0, 2, 0]), 1 << 32).item() == (2 * 2654435761) - (1 << 32)
    # 4D uses the fourth prime; products exceed 32 bits and must wrap like uint32
    p4 = [(1, 2, 3, 4), (80, 81, 79, 81), (2, 0, 0, 3)]
    got4 = hash_index(torch.tensor(p4), 1 << 19).tolist()
    for (a, b, c, d), g in zip(p4, got4):
        h = a
        h ^= (b * 2654435761) % 4294967296
        h ^= (c * 805459861) % 4294967296
        h ^= (d * 3674653429) % 4294967296
        assert g == h % (1 << 19)
    assert hash_index(torch.tensor([0, 0, 0, 1]), 1 << 32).item() == 3674653429
    assert hash_index(torch.tensor([0, 0, 0, 2]), 1 << 32).item() == 2 * 3674653429 - 4294967296


def test_grid_index_hand_computed():
    assert grid_index(torch.tensor([0, 0, 0]), 8).item() == 0
    assert grid_index(torch.tensor([1, 0, 0]), 8).item() == 1
    assert grid_index(torch.tensor([0, 1, 0]), 8).item() == 9
    assert grid_index(torch.tensor([0, 0, 1]), 8).item() == 81
    assert grid_index(torch.tensor([8, 8, 8]), 8).item() == 9 ** 3 - 1
    assert grid_index(torch.tensor([1, 2, 0, 2]), 2).item() == 1 + 2 * 3 + 0 * 9 + 2 * 27
    batch = grid_index(torch.tensor([[2, 2, 2, 2], [0, 0, 0, 0]]), 2).tolist()
    assert batch == [80, 0]


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("n_dims", [3, 4])
def test_matches_slow_reference(n_dims):
    enc = _small(n_dims)
    g = torch.Generator().manual_seed(10 + n_dims)
    x = torch.rand(40, n_dims, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some outside [0,1]
    x[0] = 1.0
    x[1] = 0.0
    out = enc(x)
    assert out.shape == (40, enc.n_levels * enc.n_features)
    torch.testing.assert_close(out.detach(), _slow_reference(enc, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_dims", [3, 4])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_exact_at_vertices(n_dims, dtype, atol):
    enc = _small(n_dims, dtype=dtype)
    assert not enc.uses_hash(0) and enc.uses_hash(1) and enc.uses_hash(2)
    g = torch.Generator().manual_seed(1)
    f_ = enc.n_features
    for lvl in range(enc.n_levels):
        n = enc.level_resolutions[lvl]
        c = torch.randint(0, n + 1, (64, n_dims), generator=g)
        c[0] = 0
        c[1] = n  # the far corner x = 1
        x = c.to(dtype) / n
        out = enc(x).detach()[:, lvl * f_:(lvl + 1) * f_]
        if enc.uses_hash(lvl):
            rows = hash_index(c, enc.table_size) + enc.level_offsets[lvl]
        else:
            rows = grid_index(c, n) + enc.level_offsets[lvl]
        expected = enc.table.detach()[rows]
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)


def test_clamps_outside_unit_cube():
    enc = _small(3)
    x = torch.tensor([[-0.5, 0.3, 1.7], [2.0, -1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(enc(x), enc(x.clamp(0, 1)), rtol=0, atol=0)


@pytest.mark.parametrize("n_dims", [3, 4])
def test_continuity_across_cell_boundaries(n_dims):
    enc = _small(n_dims)  # table values in [-1, 1]
    f_ = enc.n_features
    g = torch.Generator().manual_seed(2)
    eps = 1e-7
    for lvl in range(enc.n_levels):
        n = enc.level_resolutions[lvl]
        # points exactly straddling interior cell faces of this level, along a random axis
        base = torch.rand(50, n_dims, generator=g, dtype=torch.float64)
        axis = torch.randint(0, n_dims, (50,), generator=g)
        k = torch.randint(1, n, (50,), generator=g).to(torch.float64)
        lo, hi = base.clone(), base.clone()
        lo[torch.arange(50), axis] = k / n - eps / 2
        hi[torch.arange(50), axis] = k / n + eps / 2
        d = (enc(hi) - enc(lo)).detach()[:, lvl * f_:(lvl + 1) * f_].abs().max()
        # |d f_l| <= sum_d N_l * max|table difference| * |dx_d|, table in [-1, 1]
        assert float(d) <= 2 * n * eps * 1.001
    # random points and random small steps: all levels at once
    x = torch.rand(200, n_dims, generator=g, dtype=torch.float64) * 0.98 + 0.01
    dx = (torch.rand(200, n_dims, generator=g, dtype=torch.float64) - 0.5) * 1e-6
    diff = (enc(x + dx) - enc(x)).detach().abs()
    bound = 2 * max(enc.level_resolutions) * dx.abs().sum(dim=1, keepdim=True)
    assert bool((diff <= bound * 1.001).all())


@pytest.mark.parametrize("n_dims", [3, 4])
def test_linear_along_each_axis_inside_a_cell(n_dims):
    enc = _small(n_dims)
    f_ = enc.n_features
    g = torch.Generator().manual_seed(3)
    s = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    for lvl in range(enc.n_levels):
        n = enc.level_resolutions[lvl]
        for axis in range(n_dims):
            cell = torch.randint(0, n, (n_dims,), generator=g).to(torch.float64)
            inside = torch.rand(n_dims, generator=g, dtype=torch.float64) * 0.8 + 0.1
            x = ((cell + inside) / n).repeat(7, 1)
            x[:, axis] = (cell[axis] + s) / n
            y = enc(x).detach()[:, lvl * f_:(lvl + 1) * f_]
            second = y[2:] - 2 * y[1:-1] + y[:-2]
            assert float(second.abs().max()) < 1e-12
            # and not trivially constant (the test must be able to see a slope)
            assert float((y[-1] - y[0]).abs().max()) > 1e-6


# ---------------------------------------------------------------- gradients


def test_table_gradient_equals_interpolation_weights():
    enc = _small(3)
    x = torch.tensor([[0.31, 0.77, 0.52], [0.90, 0.12, 0.43]], dtype=torch.float64)
    f_ = enc.n_features
    for p in range(x.shape[0]):
        for lvl in range(enc.n_levels):
            n = enc.level_resolutions[lvl]
            # expected weight per table row, summed over corners (hash collisions add up)
            expected = torch.zeros(enc.table.shape[0], dtype=torch.float64)
            xs = [float(v) * n for v in x[p]]
            cell = [int(v // 1) for v in xs]
            frac = [xs[d] - cell[d] for d in range(3)]
            for bits in itertools.product((0, 1), repeat=3):
                w = 1.0
                for d in range(3):
                    w *= frac[d] if bits[d] else 1 - frac[d]
                v = torch.tensor([cell[d] + bits[d] for d in range(3)])
                expected[enc.vertex_index(lvl, v)] += w
            for k in range(f_):
                (grad,) = torch.autograd.grad(enc(x[p:p + 1])[0, lvl * f_ + k], enc.table)
                torch.testing.assert_close(grad[:, k], expected, rtol=0, atol=1e-12)
                other = [j for j in range(f_) if j != k]
                assert float(grad[:, other].abs().max()) == 0.0


def test_gradcheck_table_and_input():
    enc = _small(3)
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    table = enc.table.detach().clone().requires_grad_()

    def fn(tab, pts):
        return torch.func.functional_call(enc, {"table": tab}, (pts,))

    assert torch.autograd.gradcheck(fn, (table, x), eps=1e-7, atol=1e-6)


def test_gradcheck_4d_input():
    enc = _small(4)
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(4, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda pts: enc(pts), (x,), eps=1e-7, atol=1e-6)


# ---------------------------------------------------------------- misc


def test_float32_output_and_shapes():
    enc = HashGridEncoding(4, n_levels=5, n_features=2, log2_table_size=10, base_resolution=2, growth=1.4)
    out = enc(torch.rand(33, 4))
    assert out.shape == (33, 10) and out.dtype == torch.float32
    out.sum().backward()
    assert enc.table.grad is not None and enc.table.grad.shape == enc.table.shape


def test_bad_inputs():
    with pytest.raises(DRGSInputError):
        HashGridEncoding(5)
    enc = HashGridEncoding(3, n_levels=2, log2_table_size=8)
    with pytest.raises(DRGSInputError):
        enc(torch.rand(10, 4))


def test_switch_boundary_grid_that_exactly_fills_the_table_is_direct():
    # N = 3 in 3D: (3+1)^3 = 64 = T -> direct with 64 rows; N = 6: 343 > 64 -> hashed
    enc = HashGridEncoding(3, n_levels=2, log2_table_size=6, base_resolution=3, growth=2.0)
    assert enc.level_resolutions == [3, 6]
    assert not enc.uses_hash(0) and enc.uses_hash(1)
    assert enc.level_sizes == [64, 64]


def test_upper_face_uses_last_cell():
    # all levels direct, so a corner beyond N_l would index outside the level (or the table)
    enc = HashGridEncoding(3, n_levels=3, n_features=2, log2_table_size=12, base_resolution=2, growth=2.0)
    enc = enc.double()
    assert enc.hashed_levels() == []
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        enc.table.copy_(torch.rand(enc.table.shape, generator=g, dtype=torch.float64) * 2 - 1)
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = enc(x)
    w = torch.rand(out.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    h = 1e-7
    for d in range(3):
        xm = x.detach().clone()
        xm[0, d] -= h
        one_sided = (((out - enc(xm)) * w).sum() / h).item()
        assert abs(gx[0, d].item() - one_sided) < 1e-5
