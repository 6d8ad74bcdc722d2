"""GPU voxelisers vs the PyTorch reference (float64) on fresh random scenes, once per GPU backend (`impl`:
"cuda-ext" and "triton"; skipped without CUDA)."""

import pytest
import torch

from _gpu_testlib import grid, rel_err, scene

pytestmark = pytest.mark.gpu

FWD_TOL = 1e-4


def _compare(impl, kind, P, seed, g=None):
    from drgs_core.render import torch_ref

    dev = torch.device("cuda")
    g = g or grid()
    means, scales, rots, rho = scene(kind, P, seed, dev)
    means = means * 0.6
    with torch.no_grad():
        vol = impl.voxelize(means, scales, rots, rho, g)
        ref = torch_ref.voxelize(means.double(), scales.double(), rots.double(), rho.double(), g)
    assert vol.shape == tuple(g.resolution) and vol.dtype == torch.float32
    assert torch.isfinite(vol).all(), "NaN/inf (or unwritten voxels) in the volume"
    if float(ref.abs().max()) > 0:
        assert rel_err(vol, ref) <= FWD_TOL, (kind, P, rel_err(vol, ref))
    else:
        assert float(vol.abs().max()) == 0.0
    return vol, ref


@pytest.mark.parametrize("P", [1, 50, 1500])
def test_mixed_scenes_match_reference(impl, P):
    for seed in range(2):
        _compare(impl, "mixed", P, 31 * P + seed)


@pytest.mark.parametrize("kind", ["offscreen", "large", "small", "flat"])
def test_edge_case_scenes_match_reference(impl, kind):
    _compare(impl, kind, 200, len(kind))


@pytest.mark.parametrize("res", [(8, 8, 8), (9, 17, 3), (1, 1, 1), (33, 20, 47)])
def test_grid_shapes(impl, res):
    from drgs_core.geometry import VolumeGrid

    _compare(impl, "mixed", 300, sum(res), VolumeGrid(res, (2.5, 2.0, 1.5)))


def test_degenerate_gaussians_contribute_nothing(impl):

    dev = torch.device("cuda")
    g = grid()
    means = torch.zeros(4, 3, device=dev)
    scales = torch.tensor([[0.0, 1, 1], [-1.0, 1, 1], [float("nan"), 1, 1], [1.0, 1, 1]], device=dev)
    rots = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]], device=dev)
    vol = impl.voxelize(means, scales, rots, torch.ones(4, device=dev), g)
    assert torch.isfinite(vol).all() and float(vol.abs().max()) == 0.0
    empty = impl.voxelize(means[:0], scales[:0], rots[:0], torch.ones(0, device=dev), g)
    assert torch.isfinite(empty).all() and float(empty.abs().max()) == 0.0


def test_grad_mode_falls_back_to_differentiable_reference(impl):

    dev = torch.device("cuda")
    means, scales, rots, rho = scene("mixed", 20, 5, dev)
    rho.requires_grad_(True)
    vol = impl.voxelize(means * 0.5, scales, rots, rho, grid())
    vol.sum().backward()
    assert rho.grad is not None and torch.isfinite(rho.grad).all()


def test_paper_size_under_half_a_second(impl):
    """256^3 with 100k Gaussians of 1-3 voxels (paper scale), timed after a warm-up."""
    from drgs_core.geometry import VolumeGrid

    dev = torch.device("cuda")
    g = VolumeGrid((256, 256, 256), (0.625,) * 3)
    gen = torch.Generator().manual_seed(0)
    P = 100_000
    means = ((torch.rand(P, 3, generator=gen) - 0.5) * 150.0).to(dev)
    scales = (0.625 * (0.5 + 2.5 * torch.rand(P, 3, generator=gen))).to(dev)
    rots = torch.randn(P, 4, generator=gen).to(dev)
    rho = torch.rand(P, generator=gen).to(dev)
    impl.voxelize(means, scales, rots, rho, g)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    vol = impl.voxelize(means, scales, rots, rho, g)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    print(f"voxelize ({impl.__name__}) 256^3, 100k Gaussians: {ms:.1f} ms")
    assert torch.isfinite(vol).all()
    assert ms < 500.0
