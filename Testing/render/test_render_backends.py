"""Backend selection (`drgs_core.cuda`) and the Triton kernels run by Triton's CPU interpreter.

The interpreter (TRITON_INTERPRET=1) executes the very kernel code of the "triton" backend on CPU tensors,
so the kernels are checked against the PyTorch reference (float64) with the tolerances of the GPU tests
(Testing/gpu) on every CI run, at tiny sizes (on a GPU machine the same tests run compiled, on the GPU).
Skipped when triton is not installed (`pip install triton`, part of the `test` extra on Linux).
"""

import sys
from pathlib import Path

import pytest
import torch

from drgs_core import cuda
from drgs_core.errors import DRGSInputError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gpu"))
from _gpu_testlib import geometry, rel_err, scene  # noqa: E402

FWD_TOL = 1e-4    # as Testing/gpu/test_gpu_raster.py
GRAD_TOL = 1e-3


# ------------------------------------------------------------------------------------------ selection
def _pretend(monkeypatch, usable, cuda_present=True):
    monkeypatch.setattr(cuda, "is_available", lambda name: name == "torch" or name in usable)
    monkeypatch.setattr(cuda, "_reason", lambda name: None if name in usable else f"{name} missing here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)


def test_automatic_order_is_extension_then_triton_then_torch(monkeypatch):
    monkeypatch.delenv("DRGS4D_BACKEND", raising=False)
    _pretend(monkeypatch, {"cuda-ext", "triton"})
    assert cuda.active_backend("cuda") == "cuda-ext"
    _pretend(monkeypatch, {"triton"})
    assert cuda.active_backend("cuda:0") == "triton"
    report = cuda.backend_report("cuda")
    assert report["name"] == "triton" and "cuda-ext: cuda-ext missing here" in report["reason"]
    assert report["tried"] == {"cuda-ext": "cuda-ext missing here", "triton": None}
    _pretend(monkeypatch, set())
    assert cuda.active_backend("cuda") == "torch"
    assert cuda.backend_report("cuda")["speed"].startswith("slow")
    assert cuda.active_backend("cpu") == "torch"  # CPU tensors always


def test_forcing_a_backend(monkeypatch):
    _pretend(monkeypatch, {"cuda-ext", "triton"})
    monkeypatch.setenv("DRGS4D_BACKEND", "triton")
    assert cuda.active_backend("cuda") == "triton"
    assert cuda.backend_report("cuda")["reason"] == "forced by DRGS4D_BACKEND=triton"
    monkeypatch.setenv("DRGS4D_BACKEND", "torch")
    assert cuda.active_backend("cuda") == "torch"
    monkeypatch.setenv("DRGS4D_BACKEND", "cuda")  # old name of the extension backend
    assert cuda.active_backend("cuda") == "cuda-ext"
    _pretend(monkeypatch, {"triton"})
    with pytest.raises(DRGSInputError, match="forced backend"):  # never a silent fallback
        cuda.active_backend("cuda")
    report = cuda.backend_report("cuda")
    assert report["name"] == "torch" and "cuda-ext missing here" in report["reason"]
    monkeypatch.setenv("DRGS4D_BACKEND", "metal")
    with pytest.raises(DRGSInputError, match="DRGS4D_BACKEND"):
        cuda.active_backend("cuda")


def test_report_on_this_machine():
    report = cuda.backend_report("cpu")
    assert report["name"] == "torch" and report["reason"] and report["speed"]
    assert set(report) == {"name", "reason", "speed", "forced", "tried"}


# ------------------------------------------------------------------------------------------ interpreter
@pytest.fixture
def kernels():
    """(device, raster module, hash-grid module) of the Triton backend: on the GPU when there is one, else on
    the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is imported)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from drgs_core.cuda import _triton_hashgrid, _triton_raster

    if torch.cuda.is_available():
        return "cuda", _triton_raster, _triton_hashgrid
    if not isinstance(_triton_raster._project_kernel, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: no CPU interpreter")
    return "cpu", _triton_raster, _triton_hashgrid


def _run(fn, leaves_in, G):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves_in]
    m2 = torch.zeros(leaves[0].shape[0], 2, dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
    res = fn(*leaves, m2)
    if res.image.requires_grad:
        (res.image.double() * G).sum().backward()
    return res, [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves + [m2]]


@pytest.mark.parametrize("kind,P,H,W", [("mixed", 40, 20, 24), ("mixed", 150, 12, 14), ("behind", 30, 18, 21), ("offscreen", 30, 16, 16),
                                        ("flat", 25, 17, 19), ("mixed", 0, 8, 8)])
def test_triton_rasteriser_matches_reference(kernels, kind, P, H, W):
    from drgs_core.render import torch_ref

    dev, raster, _ = kernels
    geo = geometry(H, W)
    src = scene(kind, P, P + H, dev, geo)
    src = (src[0] * 0.5,) + src[1:]
    params = geo.camera(0, dtype=torch.float32).pack(dev).params.double()
    G = torch.randn(H, W, generator=torch.Generator().manual_seed(P), dtype=torch.float64).to(dev)
    out, g = _run(lambda *a: raster.rasterize(*a[:4], params, W, H, a[4]), src, G)
    ref, gr = _run(lambda *a: torch_ref.rasterize(*a[:4], geo.camera(0, dtype=torch.float64, device=dev), a[4]),
                   [t.double() for t in src], G)
    assert out.image.shape == (H, W) and out.image.dtype == torch.float32 and out.n_pairs is None
    assert torch.isfinite(out.image).all()
    if float(ref.image.detach().abs().max()) > 0:
        assert rel_err(out.image, ref.image) <= FWD_TOL
    else:
        assert float(out.image.detach().abs().max()) == 0.0
    assert torch.equal(out.visible, ref.visible) and torch.equal(out.radii, ref.radii)
    assert torch.allclose(out.centres.double(), ref.centres, atol=2e-3, rtol=1e-5)
    for name, a, b in zip(("means", "scales", "rotations", "rho", "means2d"), g, gr):
        assert torch.isfinite(a).all(), name
        if b.numel() == 0 or float(b.abs().max()) == 0.0:
            assert a.shape == b.shape and (a.numel() == 0 or float(a.abs().max()) == 0.0), name
        else:
            assert rel_err(a, b) <= GRAD_TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("cfg", [(3, 4, 2, 8, 4, 1.5), (4, 3, 2, 7, 2, 1.4), (1, 4, 1, 3, 4, 2.0),
                                 (2, 3, 4, 5, 3, 1.7)])
def test_triton_hashgrid_matches_reference(kernels, cfg):
    from drgs_core.model.hashgrid import HashGridEncoding

    dev, _, hashgrid = kernels
    D, L, F, log2, base, growth = cfg
    enc = HashGridEncoding(D, L, F, log2, base, growth, seed=3).to(dev)
    assert enc.hashed_levels() and not enc.uses_hash(0)  # both kinds of level are covered
    with torch.no_grad():
        enc.table.copy_(torch.rand(enc.table.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(60, D, generator=gen) * 1.3 - 0.15   # some outside [0, 1]: clamped, zero gradient
    x[:6] = torch.randint(0, 2, (6, D), generator=gen).float()
    G = torch.randn(60, L * F, generator=gen)
    x, G = x.to(dev), G.to(dev)
    xr = x.clone().requires_grad_(True)
    ref = enc.forward_torch(xr)
    (ref * G).sum().backward()
    ref_gt, ref_gx = enc.table.grad.clone(), xr.grad.clone()
    enc.table.grad = None
    xc = x.clone().requires_grad_(True)
    out = hashgrid.hashgrid_encode(enc, xc)
    (out * G).sum().backward()
    assert rel_err(out, ref) <= 1e-6
    assert torch.equal(enc.table.grad.abs().sum(1) > 0, ref_gt.abs().sum(1) > 0)  # the very same rows
    assert rel_err(enc.table.grad, ref_gt) <= 1e-5
    assert rel_err(xc.grad, ref_gx) <= 1e-4
    assert hashgrid.hashgrid_encode(enc, torch.zeros(0, D, device=dev)).shape == (0, L * F)
