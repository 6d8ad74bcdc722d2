"""GPU rasterisers (each backend via `impl`) vs the PyTorch reference (float64): forward and gradients."""

import pytest
import torch

from _gpu_testlib import geometry, rel_err, scene

pytestmark = pytest.mark.gpu

FWD_TOL = 1e-4
GRAD_TOL = 1e-3


def _run(fn, means, scales, rots, rho, cam, G, **kw):
    """Forward + backward of sum(G * image); returns (result, grads of means, scales, rotations, rho, means2d).
    kw goes to `fn` (e.g. pair_capacity)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (means, scales, rots, rho)]
    m2 = torch.zeros(means.shape[0], 2, dtype=means.dtype, device=means.device, requires_grad=True)
    res = fn(*leaves, cam, m2, **kw)
    if res.image.requires_grad:
        (res.image.double() * G).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves + [m2]]
    return res, grads


def _compare(impl, kind, P, seed, H=72, W=100, frame=0):
    from drgs_core.render import torch_ref

    dev = torch.device("cuda")
    geo = geometry(H, W)
    means, scales, rots, rho = scene(kind, P, seed, dev, geo)
    cam32 = geo.camera(frame, device=dev, dtype=torch.float32)
    cam64 = geo.camera(frame, device=dev, dtype=torch.float64)
    G = torch.randn(H, W, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dev)
    out, g = _run(impl.rasterize, means, scales, rots, rho, cam32, G)
    ref, gr = _run(torch_ref.rasterize, means.double(), scales.double(), rots.double(), rho.double(), cam64, G)
    # forward
    assert out.image.shape == (H, W) and out.image.dtype == torch.float32
    assert torch.isfinite(out.image).all(), "NaN/inf (or unwritten pixels) in the image"
    if float(ref.image.detach().abs().max()) > 0:
        assert rel_err(out.image, ref.image) <= FWD_TOL, (kind, P, rel_err(out.image, ref.image))
    else:
        assert float(out.image.detach().abs().max()) == 0.0
    n_bad = int((out.visible != ref.visible).sum())
    assert n_bad <= max(1, P // 1000), f"{n_bad} visibility mismatches"
    both = out.visible & ref.visible
    assert int((out.radii[both] != ref.radii[both]).sum()) <= max(1, P // 1000)
    assert (out.radii[~out.visible] == 0).all() and (out.radii >= 0).all()
    assert torch.isfinite(out.centres).all()
    assert torch.allclose(out.centres.double(), ref.centres, atol=2e-3, rtol=1e-5)
    # gradients
    names = ("means", "scales", "rotations", "rho", "means2d")
    for name, a, b in zip(names, g, gr):
        assert torch.isfinite(a).all(), f"non-finite gradient of {name}"
        if float(b.detach().abs().max()) == 0.0:
            assert float(a.abs().max()) == 0.0, name
            continue
        e = rel_err(a, b)
        assert e <= GRAD_TOL, (kind, P, name, e)
    return out, ref


@pytest.mark.parametrize("P", [1, 37, 500, 4000])
def test_mixed_scenes_match_reference(impl, P):
    for seed in range(2):
        _compare(impl, "mixed", P, 100 * P + seed)


@pytest.mark.parametrize("kind", ["offscreen", "behind", "large", "small", "flat"])
def test_edge_case_scenes_match_reference(impl, kind):
    _compare(impl, kind, 300, sum(map(ord, kind)))


@pytest.mark.parametrize("shape", [(16, 16), (17, 33), (128, 96), (1, 5)])
def test_image_sizes(impl, shape):
    _compare(impl, "mixed", 200, shape[0] * 7 + shape[1], H=shape[0], W=shape[1])


def _exact(impl) -> bool:
    """The compiled kernels are bit-reproducible; the Triton forward adds with atomics (order varies)."""
    return impl.__name__.endswith("_wrapper")


def _same(a, b, exact: bool):
    if exact:
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-30), rel_err(a, b)


def test_behind_the_source_is_culled(impl):
    dev = torch.device("cuda")
    geo = geometry()
    src = torch.as_tensor(geo.source_positions([0])[0], dtype=torch.float32)
    # on the source side of the cut plane c_z < 0.2 sad, and behind the source
    means = torch.stack([src * 0.9, src * 1.2, src * 1.5]).to(dev)
    scales = torch.full((3, 3), 30.0, device=dev)
    rots = torch.tensor([[1.0, 0, 0, 0]] * 3, device=dev)
    rho = torch.ones(3, device=dev)
    res = impl.rasterize(means, scales, rots, rho, geo.camera(0, device=dev))
    assert float(res.image.abs().max()) == 0.0
    assert not res.visible.any() and (res.radii == 0).all()
    assert (res.centres == 0).all()


def test_empty_inputs(impl):
    dev = torch.device("cuda")
    geo = geometry()
    z = torch.zeros(0, 3, device=dev, requires_grad=True)
    s = torch.ones(0, 3, device=dev, requires_grad=True)
    q = torch.ones(0, 4, device=dev, requires_grad=True)
    r = torch.ones(0, device=dev, requires_grad=True)
    res = impl.rasterize(z, s, q, r, geo.camera(0, device=dev))
    assert res.image.shape == (geo.height, geo.width)
    assert torch.isfinite(res.image).all() and float(res.image.detach().abs().max()) == 0.0
    res.image.sum().backward()
    assert z.grad.shape == (0, 3)


def test_deterministic(impl):
    dev = torch.device("cuda")
    geo = geometry()
    means, scales, rots, rho = scene("mixed", 3000, 7, dev, geo)
    cam = geo.camera(1, device=dev)
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (means, scales, rots, rho)]
        res = impl.rasterize(*leaves, cam)
        (res.image * res.image).sum().backward()
        outs.append([res.image.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        _same(a, b, _exact(impl))


def test_public_dispatch_runs_the_active_backend(any_gpu_backend):
    """render.rasterize(backend="auto") on CUDA tensors runs the backend drgs_core.cuda reports."""
    import drgs_core.render as render
    from drgs_core import cuda

    assert render.active_backend("cuda") == any_gpu_backend
    dev = torch.device("cuda")
    geo = geometry()
    means, scales, rots, rho = scene("mixed", 100, 3, dev, geo)
    a = render.rasterize(means, scales, rots, rho, geo.camera(0, device=dev))
    b = cuda.backend_module(any_gpu_backend).rasterize(means, scales, rots, rho, geo.camera(0, device=dev))
    _same(a.image, b.image, any_gpu_backend == "cuda-ext")
    assert (a.n_pairs is None) == (any_gpu_backend == "triton")


def test_pair_capacity_with_room_is_exact(ext):
    """A fixed pair list with spare room gives bit-identical images and gradients to the exact list."""

    dev = torch.device("cuda")
    geo = geometry()
    src = scene("mixed", 2500, 11, dev, geo)
    cam = geo.camera(0, device=dev)
    G = torch.randn(geo.height, geo.width, generator=torch.Generator().manual_seed(3)).to(dev)
    exact, g_exact = _run(ext.rasterize, *src, cam, G)
    n = int(exact.n_pairs)
    assert n > 2500
    roomy, g_roomy = _run(ext.rasterize, *src, cam, G, pair_capacity=n + 777)
    assert int(roomy.n_pairs) == n
    assert torch.equal(roomy.image, exact.image)
    for a, b in zip(g_roomy, g_exact):
        assert torch.equal(a, b)


def test_pair_capacity_overflow_is_flagged_and_safe(ext):
    """Too small a pair list: n_pairs says so, outputs stay finite and fully written, nothing is added."""

    dev = torch.device("cuda")
    geo = geometry()
    src = scene("mixed", 2500, 12, dev, geo)
    cam = geo.camera(0, device=dev)
    G = torch.ones(geo.height, geo.width, device=dev)
    exact, _ = _run(ext.rasterize, *src, cam, G)
    n = int(exact.n_pairs)
    short, g_short = _run(ext.rasterize, *src, cam, G, pair_capacity=n // 3)
    assert int(short.n_pairs) == n > n // 3
    assert torch.isfinite(short.image).all()
    for g in g_short:
        assert torch.isfinite(g).all()
    # all attenuations are positive: dropping pairs can only lower the image
    assert float((short.image - exact.image).max()) <= 1e-6 * float(exact.image.max())
    assert float(short.image.sum()) < float(exact.image.sum())


def test_packed_camera_matches_camera(impl):
    from drgs_core.render import torch_ref

    dev = torch.device("cuda")
    geo = geometry()
    src = scene("mixed", 300, 13, dev, geo)
    cam = geo.camera(1, device=dev)
    a = impl.rasterize(*src, cam)
    b = impl.rasterize(*src, cam.pack(dev))
    _same(a.image, b.image, _exact(impl))
    c = torch_ref.rasterize(*src, cam.pack(dev))
    assert rel_err(c.image, a.image) <= FWD_TOL


def test_graph_replay_renders_any_view(impl):
    """Forward + backward captured once in a CUDA graph with a camera buffer render whichever view is loaded."""
    from drgs_core.geometry import PackedCamera

    dev = torch.device("cuda")
    geo = geometry()
    src = scene("mixed", 2000, 14, dev, geo)
    views = [geo.camera(k, device=dev).pack(dev) for k in (0, 1)]
    G = torch.randn(geo.height, geo.width, generator=torch.Generator().manual_seed(5)).to(dev)
    expected = [_run(impl.rasterize, *src, v, G) for v in views]
    capacity = None if expected[0][0].n_pairs is None else 2 * max(int(e[0].n_pairs) for e in expected)

    buf = PackedCamera(views[0].params.clone(), views[0].width, views[0].height)
    leaves = [t.detach().clone().requires_grad_(True) for t in src]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        _run(impl.rasterize, *src, buf, G, pair_capacity=capacity)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m2 = torch.zeros(2000, 2, device=dev, requires_grad=True)
        out = impl.rasterize(*leaves, buf, m2, pair_capacity=capacity)
        grads = torch.autograd.grad((out.image * G).sum(), leaves + [m2])
    for view, (ref, g_ref) in zip(reversed(views), reversed(expected)):
        buf.params.copy_(view.params)
        graph.replay()
        torch.cuda.synchronize()
        _same(out.image, ref.image, _exact(impl))
        for a, b in zip(grads, g_ref):
            _same(a, b, _exact(impl))
