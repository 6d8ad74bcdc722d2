"""The Triton training step never waits for the GPU (what CUDA-graph capture requires), checked on the CPU.

Triton's interpreter runs the step's Triton kernels on CPU tensors; the profiler records every PyTorch
operator the step dispatches.  Operators that on a GPU copy a value to the host (`.item()`, `nonzero`, boolean
masking, `torch.tensor(python data)`, ...) must not appear: any of them makes capture fail with
cudaErrorStreamCaptureUnsupported (as the float64 `prod` backward of the former torch projection did).  The
optimizer is left out: on the GPU it is the fused capturable Adam, the same for every backend.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gpu"))
from _gpu_testlib import geometry  # noqa: E402

#: PyTorch operators that synchronise with the host on a CUDA device or size their output from device data.
HOST_SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose",
                 "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
                 "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave", "aten::lift_fresh",
                 "aten::masked_scatter", "aten::bincount", "aten::histc"}
_OPTIMIZER = "Optimizer."   # prefix of the profiler's record_function around optimizer.step / zero_grad


def host_syncs(prof) -> list[str]:
    """Names (with their caller chain) of the forbidden operators the profiled code ran outside the optimizer."""
    found = []
    for e in prof.events():
        if e.name not in HOST_SYNC_OPS:
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if not any(c.startswith(_OPTIMIZER) for c in chain):
            found.append(" <- ".join([e.name] + chain))
    return found


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route the renderer and the hash grid of the training step to the Triton backend on CPU tensors."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Testing/gpu/test_gpu_train_step.py checks the step there")
    from triton.runtime.interpreter import InterpretedFunction

    from drgs_core import train_step
    from drgs_core.cuda import _triton, _triton_raster
    from drgs_core.model.hashgrid import HashGridEncoding

    if not isinstance(_triton_raster._project_kernel, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: no CPU interpreter")
    monkeypatch.setattr(train_step, "rasterize", _triton.rasterize)
    monkeypatch.setattr(HashGridEncoding, "forward", lambda self, x: _triton.hashgrid_encode(self, x))


def _runner():
    from drgs_core.geometry import VolumeGrid
    from drgs_core.model.density import DensityStats
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.train import TrainConfig, make_optimizer
    from drgs_core.train_step import StepRunner

    torch.manual_seed(0)
    grid = VolumeGrid((16, 16, 16), (4.0, 4.0, 4.0))
    x = torch.linspace(-1, 1, 16)
    vol = torch.exp(-4 * (x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)) * 0.02
    model = GaussianModel(grid, log2_table_size=10, n_levels=3)
    model.init_from_volume(vol, 48, seed=0)
    geo = geometry(18, 22, angle=0.3)
    cams = [geo.camera(k) for k in range(2)]
    dsa = 0.5 + torch.rand(2, geo.height, geo.width, generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(model, TrainConfig(iterations=10))
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=True)
    return model, opt, runner, DensityStats.zeros(model.n, "cpu")


def test_triton_training_step_has_no_host_sync(triton_on_cpu):
    model, opt, runner, stats = _runner()
    assert not runner.use_graph  # CPU tensors: eager
    runner.load(0, 0.2)
    runner.run(model, opt, stats)   # first step: caches (hash-grid level tables) and optimizer state
    before = [p.detach().clone() for p in (model.means, model.scales_raw)]
    runner.load(1, 0.7)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = runner.run(model, opt, stats)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, (model.means, model.scales_raw)))
    assert int(stats.visible_count.max()) == 2   # the statistics were updated by both steps
    syncs = host_syncs(prof)
    assert not syncs, "host synchronisation in the Triton step:\n" + "\n".join(syncs)
