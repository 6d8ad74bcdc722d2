"""Rasterisation: patch/bucket path == dense path == literal per-Gaussian reference; culling; gradients."""

import numpy as np
import pytest
import torch

from _render_testlib import make_geometry, random_quaternions, reference_raster, t64
from drgs_core import render
from drgs_core.render import common, torch_ref

H, W = 40, 48


def _scene(geo, seed=0, n=40):
    """Random Gaussians incl. partly off-screen, huge, tiny, behind the source, near the cut-off, degenerate."""
    rng = np.random.default_rng(seed)
    src = geo.source_positions([0])[0]  # world mm
    axis = src / np.linalg.norm(src)  # from the isocentre towards the source
    means = rng.uniform(-70, 70, size=(n, 3))
    scales = rng.uniform(1.0, 8.0, size=(n, 3))
    quats = random_quaternions(rng, n)
    extra_m, extra_s = [], []
    extra_m += [[0, 0, 0], [30, -20, 10]]; extra_s += [[90, 70, 80], [150, 150, 150]]  # bigger than the image
    extra_m += [[1.3, 0.2, -2.1], [10.0, 5.0, 3.0]]; extra_s += [[0.02, 0.03, 0.05], [0.3, 0.01, 0.2]]  # tiny
    extra_m += [list(1.5 * src), list(src), list(0.9 * src)]; extra_s += [[5, 5, 5]] * 3  # behind / at / near source
    extra_m += [list(src - 0.21 * np.linalg.norm(src) * axis)]; extra_s += [[2, 2, 2]]  # just in front of cut-off
    extra_m += [[5, 5, 5]]; extra_s += [[3.0, 0.0, 0.0]]  # degenerate: det Sigma'_2 = 0 -> culled
    extra_m += [[200, 200, 0]]; extra_s += [[3, 3, 3]]  # far outside the field
    k = len(extra_m)
    means = np.concatenate([means, np.asarray(extra_m, float)])
    scales = np.concatenate([scales, np.asarray(extra_s, float)])
    quats = np.concatenate([quats, random_quaternions(rng, k)])
    rho = rng.uniform(0.001, 0.05, size=n + k)
    return means, scales, quats, rho


def _run(fn, arrays, cam, dtype=torch.float64, means2d=False, weights=None):
    m, s, q, r = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays)
    m2 = torch.zeros(m.shape[0], 2, dtype=dtype, requires_grad=True) if means2d else None
    res = fn(m, s, q, r, cam, m2)
    grads = None
    if weights is not None:
        (res.image * weights.to(dtype)).sum().backward()
        grads = [m.grad, s.grad, q.grad, r.grad] + ([m2.grad] if means2d else [])
    return res, grads


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patch_equals_dense_and_literal_reference(seed):
    geo = make_geometry(H, W, 2.0)
    cam = geo.camera(0, dtype=torch.float64)
    arrays = _scene(geo, seed)
    wimg = torch.rand(H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, ga = _run(render.rasterize, arrays, cam, means2d=True, weights=wimg)
    b, gb = _run(render.rasterize_dense, arrays, cam, means2d=True, weights=wimg)
    ref_img, ref_radii, ref_vis = reference_raster(*arrays, geo)
    scale = ref_img.max()
    assert torch.isfinite(a.image).all()
    assert torch.allclose(a.image, b.image, rtol=0, atol=1e-12 * scale)
    assert np.allclose(a.image.detach().numpy(), ref_img, rtol=0, atol=1e-9 * scale)
    assert a.radii.dtype == torch.int32 and a.visible.dtype == torch.bool
    n = 40
    # the degenerate Gaussian (n + 8) has det Sigma'_2 = 0 exactly; the literal 2x2 determinant of the reference
    # rounds it to +-1e-30, so it is compared separately below
    lit = np.arange(len(ref_vis)) != n + 8
    assert np.array_equal(a.visible.numpy()[lit], ref_vis[lit])
    assert np.array_equal(a.radii.numpy()[lit], ref_radii[lit])
    assert torch.equal(a.visible, a.radii > 0)
    assert a.visible[n:n + 2].all()  # the huge ones
    assert not a.visible[n + 4:n + 7].any() and a.radii[n + 4:n + 7].eq(0).all()  # behind/at/near the source
    assert a.visible[n + 7]  # just in front of the near cut-off
    assert not a.visible[n + 8] and not a.visible[n + 9]  # degenerate, far outside
    for x, y in zip(ga, gb):
        assert torch.isfinite(x).all()
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-9 * y.abs().max().item())
    for g in ga:
        assert g[~a.visible].abs().max() == 0  # invisible Gaussians get exactly zero gradient
    # centres: detached projected centres for the Gaussians in front of the cut-off
    uv, _ = geo.project(torch.tensor(arrays[0]), [0])
    front = ~torch.isin(torch.arange(len(arrays[3])), torch.tensor([n + 4, n + 5, n + 6]))
    assert torch.allclose(a.centres[front], uv[0][front], rtol=1e-12, atol=1e-9)
    assert not a.centres.requires_grad


def test_float32_patch_equals_dense():
    geo = make_geometry(H, W, 2.0)
    cam = geo.camera(0, dtype=torch.float32)
    arrays = _scene(geo, 5)
    a, _ = _run(render.rasterize, arrays, cam, dtype=torch.float32)
    b, _ = _run(render.rasterize_dense, arrays, cam, dtype=torch.float32)
    assert torch.allclose(a.image, b.image, rtol=0, atol=1e-5 * b.image.abs().max().item())
    assert torch.equal(a.radii, b.radii)


def test_packed_camera_renders_like_the_camera():
    """A PackedCamera (what the trainer and the CUDA graph feed the renderer) gives the same image and gradients."""
    geo = make_geometry(H, W, 2.0)
    cam = geo.camera(0)
    packed = cam.pack()
    assert packed.params.dtype == torch.float64 and packed.params.shape == (16,)
    assert torch.equal(packed.R, cam.R.double()) and torch.equal(packed.T, cam.T.double())
    assert packed.params[12:].tolist() == [cam.fx, cam.fy, cam.cx, cam.cy]
    weights = torch.randn(H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    arrays = _scene(geo, 6)
    a, ga = _run(render.rasterize, arrays, cam, means2d=True, weights=weights)
    b, gb = _run(render.rasterize, arrays, packed, means2d=True, weights=weights)
    assert torch.equal(a.image, b.image) and a.n_pairs is None
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_chunking_and_cache_paths_agree(monkeypatch):
    geo = make_geometry(H, W, 2.0)
    cam = geo.camera(0, dtype=torch.float64)
    arrays = _scene(geo, 7)
    wimg = torch.rand(H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base, gbase = _run(render.rasterize, arrays, cam, means2d=True, weights=wimg)
    small = lambda *a: torch_ref.rasterize(*a, budget=50)  # noqa: E731  many chunks
    monkeypatch.setattr(torch_ref, "MERGE_CELLS", 0)  # no bucket merging
    c1, g1 = _run(small, arrays, cam, means2d=True, weights=wimg)
    monkeypatch.setattr(torch_ref, "CACHE_CELLS", 0)  # backward recomputes the patches
    c2, g2 = _run(small, arrays, cam, means2d=True, weights=wimg)
    for res, grads in ((c1, g1), (c2, g2)):
        assert torch.allclose(res.image, base.image, rtol=1e-12, atol=1e-14)
        for x, y in zip(grads, gbase):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12 * y.abs().max().item())


def test_nothing_visible_and_empty_inputs():
    geo = make_geometry(16, 16, 2.0)
    cam = geo.camera(0, dtype=torch.float64)
    src = geo.source_positions([0])[0]
    m, s, q, r = t64([1.5 * src], [[5.0, 5.0, 5.0]], [[1.0, 0, 0, 0]], [0.1], requires_grad=True)
    res = render.rasterize(m, s, q, r, cam)
    assert res.image.abs().max() == 0 and not res.visible.any()
    res.image.sum().backward()  # still connected to the graph
    assert m.grad.abs().max() == 0 and torch.isfinite(s.grad).all()
    e = torch.zeros(0, 3, dtype=torch.float64)
    out = render.rasterize(e, e, torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), cam)
    assert out.image.shape == (16, 16) and out.radii.shape == (0,)


def test_means2d_grad_is_the_centre_derivative():
    """means2d shifts the centres (checked against the literal reference) and its gradient equals the central
    finite difference of the reference image under that shift."""
    geo = make_geometry(H, W, 2.0)
    cam = geo.camera(0, dtype=torch.float64)
    arrays = _scene(geo, 11, n=25)
    tensors = t64(*arrays)
    P = len(arrays[3])
    wimg = torch.rand(H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shift = np.random.default_rng(0).uniform(-2, 2, size=(P, 2))
    shifted = render.rasterize(*tensors, cam, torch.tensor(shift)).image.numpy()
    ref_shifted, _, _ = reference_raster(*arrays, geo, shift=shift)
    assert np.allclose(shifted, ref_shifted, rtol=0, atol=1e-9 * ref_shifted.max())

    m2 = torch.zeros(P, 2, dtype=torch.float64, requires_grad=True)
    res = render.rasterize(*tensors, cam, m2)
    (res.image * wimg).sum().backward()
    wn = wimg.numpy()
    h = 1e-4  # the loss is ~1e4: a smaller step drowns in round-off
    proj = common.project_gaussians(*tensors, cam)
    margin = {int(i): min(((torch.arange(-1, 50.0) - c).abs() - hw).abs().min().item()
                          for c, hw in ((proj.u[j], proj.half_u[j]), (proj.v[j], proj.half_v[j])))
              for j, i in enumerate(proj.index)}
    checked = 0
    for i, mg in margin.items():
        if mg < 1e-3:  # a pixel would cross the footprint edge under the perturbation
            continue
        for d in range(2):
            e = np.zeros((P, 2))
            e[i, d] = h
            lp = (reference_raster(*arrays, geo, shift=e)[0] * wn).sum()
            lm = (reference_raster(*arrays, geo, shift=-e)[0] * wn).sum()
            fd = (lp - lm) / (2 * h)
            assert abs(fd - m2.grad[i, d].item()) <= 1e-6 * max(1.0, abs(fd))
            checked += 1
    assert checked >= 20
    assert m2.grad[~res.visible].abs().max() == 0


def _tiny_problem():
    geo = make_geometry(12, 12, 4.0)
    cam = geo.camera(0, dtype=torch.float64)
    means = [[1.3, -2.2, 0.7], [-6.1, 4.3, -3.4], [5.2, 1.1, 6.3]]
    scales = [[4.1, 2.7, 3.3], [2.9, 3.8, 2.2], [6.5, 3.1, 4.4]]
    quats = [[0.9, 0.2, -0.3, 0.1], [0.5, -0.4, 0.6, 0.3], [1.0, 0.1, 0.2, -0.2]]
    rho = [0.03, 0.05, 0.02]
    tensors = t64(means, scales, quats, rho, requires_grad=True)
    proj = common.project_gaussians(*tensors, cam)
    assert proj.index.numel() == 3
    k = torch.arange(-1, 14.0, dtype=torch.float64)
    for c, hw in ((proj.u, proj.half_u), (proj.v, proj.half_v)):
        assert ((k[None] - c.detach()[:, None]).abs() - hw[:, None]).abs().min() > 1e-3  # no pixel on an edge
    m2 = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    return cam, (*tensors, m2)


@pytest.mark.parametrize("path", ["patch", "patch-recompute", "dense"])
def test_gradcheck(path, monkeypatch):
    cam, inputs = _tiny_problem()
    if path == "patch-recompute":
        monkeypatch.setattr(torch_ref, "CACHE_CELLS", 0)
    fn = render.rasterize_dense if path == "dense" else render.rasterize

    def f(m, s, q, r, m2):
        return fn(m, s, q, r, cam, m2).image

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
