"""Analytic chords of the phantom primitives against brute-force numerical ray marching."""

import math

import numpy as np
import pytest
import torch

from drgs_core.phantom.anatomy import background_attenuation, background_line_integrals, head_ellipsoids
from drgs_core.phantom.tubes import (capsule_intervals, ellipsoid_chords, ellipsoid_matrix, inside_ellipsoid,
                                     integrate_max_union, rotation_matrix_xyz, segment_distance)

F64 = torch.float64


def _random_capsule_rays(n, seed, parallel_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, 3, dtype=F64, generator=g) * 3
    axis = torch.randn(n, 3, dtype=F64, generator=g)
    axis /= axis.norm(dim=1, keepdim=True)
    length = torch.rand(n, dtype=F64, generator=g) * 6 + 0.2
    p1 = p0 + axis * length[:, None]
    r = torch.rand(n, dtype=F64, generator=g) * 2 + 0.3
    mid = 0.5 * (p0 + p1)
    d = torch.randn(n, 3, dtype=F64, generator=g)
    m = int(n * parallel_fraction)
    d[:m] = axis[:m] + 1e-3 * torch.randn(m, 3, dtype=F64, generator=g) * (torch.arange(m)[:, None] % 2)
    d /= d.norm(dim=1, keepdim=True)
    # origins ~700 mm away (like the X-ray source), aimed near the capsule
    target = mid + torch.randn(n, 3, dtype=F64, generator=g) * r[:, None] * 0.8
    return p0, p1, r, target - 700.0 * d, d, target


def _march_indicator(o, d, centre, half_extent, inside_fn, ns=10000, seed=0):
    """∫ 1[inside] ds along o + s d over s in [c - e, c + e], c = (centre - o)·d, stratified samples."""
    g = torch.Generator().manual_seed(seed)
    c = ((centre - o) * d).sum(-1)
    jitter = torch.rand(o.shape[0], ns, dtype=F64, generator=g)
    s = c[:, None] - half_extent[:, None] + (torch.arange(ns, dtype=F64)[None] + jitter) / ns * 2 * half_extent[:, None]
    pts = o[:, None] + s[..., None] * d[:, None]
    return inside_fn(pts).double().mean(1) * 2 * half_extent


def test_capsule_chords_match_ray_marching():
    p0, p1, r, o, d, target = _random_capsule_rays(300, seed=3, parallel_fraction=0.1)
    s_in, s_out, hit = capsule_intervals(o, d, p0, p1, r)
    chord = torch.where(hit, s_out - s_in, torch.zeros_like(s_in))
    extent = 0.5 * (p1 - p0).norm(dim=1) + r + (target - 0.5 * (p0 + p1)).norm(dim=1)
    brute = _march_indicator(o, d, 0.5 * (p0 + p1), extent,
                             lambda pts: segment_distance(pts, p0[:, None], p1[:, None]) <= r[:, None])
    assert int(hit.sum()) > 180  # most rays cross their capsule
    big = brute > 0.2
    rel = ((chord - brute).abs() / brute.clamp_min(1e-9))[big]
    assert float(rel.max()) < 0.01, float(rel.max())
    assert float((chord - brute).abs().max()) < 5e-3
    # entry/exit lie on the capsule surface
    for s in (s_in, s_out):
        pts = o + s[:, None] * d
        dist = segment_distance(pts, p0, p1) - r
        assert float(dist[hit].abs().max()) < 1e-6


def test_capsule_chord_special_cases():
    p0 = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    p1 = torch.tensor([[0.0, 0.0, 10.0]], dtype=F64)
    r = torch.tensor([2.0], dtype=F64)
    cases = [  # (origin, direction, expected chord)
        ([0.0, 0.0, -500.0], [0.0, 0.0, 1.0], 14.0),           # along the axis: L + 2r
        ([1.0, 0.0, -500.0], [0.0, 0.0, 1.0], 10.0 + 2 * math.sqrt(3.0)),  # parallel, off axis
        ([-500.0, 0.0, 5.0], [1.0, 0.0, 0.0], 4.0),             # perpendicular through the cylinder
        ([-500.0, 0.0, -1.0], [1.0, 0.0, 0.0], 2 * math.sqrt(3.0)),  # through the bottom cap
        ([-500.0, 3.0, 5.0], [1.0, 0.0, 0.0], 0.0),             # miss
        ([-500.0, 0.0, 12.5], [1.0, 0.0, 0.0], 0.0),            # beyond the top cap
    ]
    for o, dvec, expected in cases:
        s_in, s_out, hit = capsule_intervals(torch.tensor([o], dtype=F64), torch.tensor([dvec], dtype=F64),
                                             p0, p1, r)
        chord = float(s_out - s_in) if bool(hit) else 0.0
        assert abs(chord - expected) < 1e-9, (o, dvec, chord, expected)


def test_ellipsoid_chords_match_ray_marching():
    g = np.random.default_rng(5)
    for trial in range(4):
        semi = g.uniform(5, 40, 3)
        rot = rotation_matrix_xyz(g.uniform(-90, 90, 3))
        centre = g.normal(0, 10, 3)
        m = ellipsoid_matrix(semi, rot)
        n = 40
        d = torch.as_tensor(g.normal(size=(n, 3)))
        d /= d.norm(dim=1, keepdim=True)
        target = torch.as_tensor(centre + g.normal(0, 0.5, (n, 3)) * semi.min())
        o = target - 750.0 * d
        chords = ellipsoid_chords(o, d, centre, m)
        ext = torch.full((n,), float(semi.max()) * 1.01)
        brute = _march_indicator(o, d, torch.as_tensor(centre), ext,
                                 lambda pts: inside_ellipsoid(pts, centre, m), ns=20000, seed=trial)
        big = brute > 0.5
        assert big.sum() > 12
        rel = ((chords - brute).abs() / brute.clamp_min(1e-9))[big]
        assert float(rel.max()) < 0.01
        assert float((chords - brute).abs().max()) < 0.02
        # a single shared origin takes another code path: same answer
        o1 = torch.as_tensor(centre) - 750.0 * d[0]
        a = ellipsoid_chords(o1, d, centre, m)
        b = ellipsoid_chords(o1.expand(n, 3), d, centre, m)
        assert torch.allclose(a, b, atol=1e-9)


def test_background_integrals_match_ray_marching():
    ells = head_ellipsoids(0.02, 0.05)
    g = np.random.default_rng(2)
    n = 40
    src = torch.tensor([750.0, 0.0, 0.0], dtype=F64)
    target = torch.as_tensor(g.uniform(-90, 90, (n, 3)))
    d = target - src
    d /= d.norm(dim=1, keepdim=True)
    exact = background_line_integrals(src, d, ells)
    ns = 20000
    s = 750.0 - 130 + (torch.arange(ns, dtype=F64) + 0.5) / ns * 260
    pts = src + s[None, :, None] * d[:, None]
    brute = background_attenuation(pts, ells).sum(1) * 260 / ns
    big = brute > 0.5
    assert big.sum() > 10
    assert float(((exact - brute).abs() / brute.clamp_min(1e-9))[big].max()) < 0.01
    # the skull shell attenuates more than soft tissue alone: integrals are within a plausible head range
    assert 1.0 < float(exact.max()) < 10.0


def test_integrate_max_union_matches_sampling():
    g = torch.Generator().manual_seed(7)
    n_rays = 150
    counts = torch.randint(0, 12, (n_rays,), generator=g)
    counts[:5] = torch.tensor([1, 40, 3, 70, 2])
    ray = torch.repeat_interleave(torch.arange(n_rays), counts)
    a = torch.rand(ray.numel(), dtype=F64, generator=g) * 10
    b = a + torch.rand(ray.numel(), dtype=F64, generator=g) * 3 + 1e-3
    w = torch.rand(ray.numel(), dtype=F64, generator=g)
    exact = integrate_max_union(ray, a, b, w, n_rays, max_elements=5000)  # small chunks exercise chunking
    ns = 20000
    s = (torch.arange(ns, dtype=F64) + 0.5) / ns * 14
    acc = torch.zeros(n_rays, ns, dtype=F64)
    for k in range(ray.numel()):  # the obvious definition, one interval at a time
        cov = (s >= a[k]) & (s < b[k])
        acc[ray[k]] = torch.maximum(acc[ray[k]], torch.where(cov, w[k], torch.zeros((), dtype=F64)))
    brute = acc.sum(1) * 14 / ns
    assert torch.allclose(exact, brute, atol=4e-3)
    # a plain sum would differ wherever intervals overlap
    plain = torch.zeros(n_rays, dtype=F64).index_add_(0, ray, (b - a) * w)
    assert float((plain - exact).max()) > 0.5


def test_gamma_variate_shape():
    from drgs_core.phantom.flow import gamma_variate

    tau = np.linspace(-0.2, 1.0, 1201)
    c = gamma_variate(tau, 0.15, 3.0)
    assert c[tau <= 0].max() == 0
    assert tau[c.argmax()] == pytest.approx(0.15, abs=1e-3) and c.max() == pytest.approx(1.0, abs=1e-6)
    assert c[-1] < 1e-3  # washed out
    ct = gamma_variate(torch.as_tensor(tau), 0.15, 3.0).numpy()
    assert np.allclose(c, ct)
    # closed form at one point
    assert gamma_variate(np.array([0.3]), 0.15, 3.0)[0] == pytest.approx(8 * math.exp(-3))
