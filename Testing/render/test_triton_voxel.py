"""The Triton voxeliser (`drgs_core.cuda._triton_voxel`) against the PyTorch reference voxeliser (float64).

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported); on a GPU machine the same tests run compiled on the GPU.  Tolerances of
the voxeliser tests: relative L2 error <= 1e-4 (Testing/gpu/test_gpu_voxel.py) and every voxel within 1e-5 of
the peak (float32 in test_render_voxelize.py); plus the support: a voxel is nonzero exactly where the 3-sigma
box rule puts a Gaussian.  Skipped when triton is not installed.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from drgs_core.geometry import VolumeGrid
from drgs_core.render import torch_ref

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gpu"))
from _gpu_testlib import rel_err  # noqa: E402

FWD_TOL = 1e-4     # relative L2, as Testing/gpu/test_gpu_voxel.py
VOXEL_TOL = 1e-5   # per voxel, relative to the peak, as the float32 check of test_render_voxelize.py
UNDERFLOW = 1e-30  # reference values below this may vanish in float32 (exp underflow)
# the interpreter evaluates the finiteness test x - x == 0 of the degenerate Gaussians with numpy
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclass(frozen=True)
class ShiftedGrid(VolumeGrid):
    """A VolumeGrid moved by `shift` (mm): the kernel must use the grid's voxel centres, not assume a grid
    centred on the isocentre."""

    shift: tuple = (0.0, 0.0, 0.0)

    @property
    def origin(self) -> np.ndarray:
        return super().origin + np.asarray(self.shift, float)


@pytest.fixture
def voxel_kernel():
    """(device, `_triton_voxel` module): the GPU when there is one, else the CPU through the interpreter."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from drgs_core.cuda import _triton_voxel

    if torch.cuda.is_available():
        return "cuda", _triton_voxel
    if not isinstance(_triton_voxel._voxel_kernel, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: no CPU interpreter")
    return "cpu", _triton_voxel


def _scene(seed: int, grid: VolumeGrid, P: int = 36):
    """float32 (means, scales, rotations, rho): anisotropic rotated Gaussians over 1.3x the grid (some outside,
    some across the border), thin ones, tiny ones on voxel centres, one covering the whole grid, and degenerate
    ones that must contribute nothing."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    lo = torch.as_tensor(grid.origin)
    size = torch.as_tensor(grid.physical_size)
    means = lo + size * (1.3 * torch.rand(P, 3, **f64) - 0.15)
    scales = 0.4 + 4.0 * torch.rand(P, 3, **f64)
    scales[:6, 2] = 0.02                                   # thin (needle / disc shaped)
    centres = torch.as_tensor(np.stack(np.meshgrid(*grid.axes(), indexing="ij"), -1).reshape(-1, 3))
    pick = torch.randint(0, centres.shape[0], (4,), generator=gen)
    means[6:10] = centres[pick] + 0.01 * torch.randn(4, 3, **f64)
    scales[6:10] = 0.05 + 0.1 * torch.rand(4, 3, **f64)     # tiny, close to a voxel centre
    means[10] = lo + 0.5 * size
    scales[10] = torch.tensor([30.0, 18.0, 25.0])         # box covers the whole grid: many blocks
    rots = torch.randn(P, 4, **f64) * (0.5 + torch.rand(P, 1, **f64))  # not normalised
    rho = 0.01 + 0.1 * torch.rand(P, **f64)
    bad = [(11, "scales", [0.0, 1.0, 1.0]), (12, "scales", [-1.0, 2.0, 2.0]), (13, "means", [float("nan"), 0, 0]),
           (14, "scales", [1.0, float("inf"), 1.0]), (15, "rots", [0.0, 0.0, 0.0, 0.0])]
    arrays = {"means": means, "scales": scales, "rots": rots}
    for i, name, value in bad:
        arrays[name][i] = torch.tensor(value, dtype=torch.float64)
    return tuple(t.float() for t in (means, scales, rots, rho))


def _reference(gauss, grid):
    return torch_ref.voxelize(*(t.double().cpu() for t in gauss), grid)


def _check(vol, ref, grid):
    assert vol.shape == tuple(grid.resolution) and vol.dtype == torch.float32
    vol = vol.double().cpu()
    assert torch.isfinite(vol).all()
    assert float(ref.max()) > 0
    assert rel_err(vol, ref) <= FWD_TOL, rel_err(vol, ref)
    assert float((vol - ref).abs().max()) <= VOXEL_TOL * float(ref.max())
    assert not ((ref == 0) & (vol != 0)).any(), "contribution outside a 3-sigma box"
    assert not ((ref > UNDERFLOW) & (vol == 0)).any(), "missing contribution inside a 3-sigma box"


@pytest.mark.parametrize("seed,split", [(0, None), (1, 1), (2, 5)])
def test_matches_reference_on_a_shifted_anisotropic_grid(voxel_kernel, seed, split):
    dev, kernel = voxel_kernel
    grid = ShiftedGrid((13, 10, 7), (1.5, 1.25, 2.0), shift=(3.5, -2.25, 0.75))
    gauss = _scene(seed, grid)
    vol = kernel.voxelize(*(t.to(dev) for t in gauss), grid.first_voxel_centre, grid.spacing, grid.resolution,
                          split=split)
    _check(vol, _reference(gauss, grid), grid)


def _face_cases(n_cases=12, seed=1):
    """(grid, float32 Gaussian) pairs with an axis-aligned Gaussian whose 3-sigma box face passes through a row
    of voxel centres on every axis (up to rounding), and how many of them the plain division
    ceil / floor((mu -/+ half - o) / sp) of csrc's `voxel_range` gets wrong against the literal rule."""
    rng = np.random.default_rng(seed)
    cases, wrong = [], 0
    for _ in range(n_cases):
        res = (5, 4, 4)
        sp = rng.uniform(0.6, 2.5, 3)
        mu = rng.uniform(-10, 10, 3).astype(np.float32).astype(float)
        s = rng.uniform(0.5, 1.2, 3).astype(np.float32).astype(float)
        half = 3.0 * s                                     # identity rotation: sqrt(Sigma_dd) = s_d
        k = rng.integers(1, 3, 3)
        side = rng.choice([-1.0, 1.0], 3)
        first = mu + side * half - k * sp                  # voxel k on the lower or upper face
        grid = ShiftedGrid(res, tuple(sp), shift=tuple(first - (-0.5 * np.asarray(res) * sp + 0.5 * sp)))
        o = grid.first_voxel_centre
        for d, x in enumerate(grid.axes()):
            literal = np.abs(x - mu[d]) <= half[d]
            idx = np.arange(res[d])
            lo = np.ceil((mu[d] - half[d] - o[d]) / sp[d])
            hi = np.floor((mu[d] + half[d] - o[d]) / sp[d])
            wrong += int(((idx >= lo) & (idx <= hi) != literal).any())
        gauss = (torch.tensor(mu[None]), torch.tensor(s[None]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
                 torch.tensor([0.05]))
        cases.append((grid, tuple(t.float() for t in gauss)))
    return cases, wrong


def test_voxel_centres_on_box_faces_follow_the_literal_rule(voxel_kernel):
    """|x_d - mu_d| <= 3 sqrt(Sigma_dd) decides voxels on a box face, as in the reference, however the
    division rounds."""
    dev, kernel = voxel_kernel
    cases, wrong = _face_cases()
    assert wrong >= 3, "the cases no longer exercise the rounding of the division"
    for grid, gauss in cases:
        vol = kernel.voxelize(*(t.to(dev) for t in gauss), grid.first_voxel_centre, grid.spacing, grid.resolution)
        ref = _reference(gauss, grid)
        assert torch.equal(vol.cpu() != 0, ref != 0), (grid, gauss)
        _check(vol, ref, grid)


def test_backend_entry_point(voxel_kernel, monkeypatch):
    """`_triton.voxelize`: float32 without gradient -> the kernel; a gradient or float64 -> the differentiable
    reference; no Gaussians -> zeros."""
    dev, kernel = voxel_kernel
    from drgs_core.cuda import _triton

    calls = []
    real = kernel.voxelize
    monkeypatch.setattr(kernel, "voxelize", lambda *a, **k: calls.append(1) or real(*a, **k))
    grid = VolumeGrid((6, 5, 4), (2.0, 2.5, 3.0))
    gauss = tuple(t.to(dev) for t in _scene(3, grid, P=16))
    vol = _triton.voxelize(*gauss, grid)
    assert calls == [1]
    _check(vol, _reference(gauss, grid), grid)
    rho = gauss[3].clone().requires_grad_(True)
    diff = _triton.voxelize(*gauss[:3], rho, grid)
    diff.sum().backward()
    assert calls == [1] and rho.grad is not None and torch.isfinite(rho.grad).all()
    assert _triton.voxelize(*(t.double() for t in gauss), grid).dtype == torch.float64 and calls == [1]
    empty = _triton.voxelize(*(t[:0] for t in gauss), grid)
    assert calls == [1, 1] and empty.shape == (6, 5, 4) and float(empty.abs().max()) == 0.0
