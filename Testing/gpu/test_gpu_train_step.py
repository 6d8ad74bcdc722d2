"""The CUDA-graph training step: replay equals the eager step, and an overflowing view is skipped cleanly."""

import pytest
import torch

from _gpu_testlib import geometry

pytestmark = pytest.mark.gpu


def _setup(seed=0, device="cuda"):
    """A small 4D model initialised from a blob volume, 4 views of a 72 x 100 detector, a target stack."""
    from drgs_core.geometry import VolumeGrid
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.train import TrainConfig, make_optimizer

    dev = torch.device(device)
    torch.manual_seed(seed)
    grid = VolumeGrid((24, 24, 24), (2.5, 2.5, 2.5))
    x = torch.linspace(-1, 1, 24)
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + (x[None, None, :] * 3) ** 2
    vol = torch.exp(-4 * r2) * 0.02 + 0.002 * torch.rand(24, 24, 24)
    model = GaussianModel(grid, log2_table_size=12, n_levels=4).to(dev)
    model.init_from_volume(vol, 600, seed=seed)
    model.rho_scale.fill_(0.01)  # no field pre-fit: its atomics would make the two runs' starts differ
    geo = geometry(angle=0.3)
    cams = [geo.camera(k % 2, device=dev) for k in range(4)]
    dsa = 0.5 + torch.rand(4, geo.height, geo.width, generator=torch.Generator().manual_seed(seed)).to(dev)
    cfg = TrainConfig(iterations=100)
    return model, dsa, cams, cfg, make_optimizer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_graph_replay_matches_eager_steps(use_backend):
    from drgs_core.model.density import DensityStats
    from drgs_core.train_step import StepRunner

    runs = {}
    for use_graph in (False, True):
        model, dsa, cams, cfg, make_optimizer = _setup()
        start = _params(model)
        opt = make_optimizer(model, cfg, capturable=use_graph)
        runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=use_graph)
        assert runner.use_graph == use_graph
        stats = DensityStats.zeros(model.n, "cuda")
        losses = []
        for it, k in enumerate([0, 1, 2, 3, 1, 0]):
            runner.load(k, 0.1 * it)
            losses.append(float(runner.run(model, opt, stats)))
        torch.cuda.synchronize()
        runs[use_graph] = (losses, _params(model), stats, runner.captures)
    (l_e, p_e, s_e, _), (l_g, p_g, s_g, captures) = runs[False], runs[True]
    assert captures == 1
    # Same arithmetic up to the hash-grid backward's atomics: losses agree to float rounding.  Adam turns a
    # rounding-level difference of a near-zero gradient into up to a full step, so parameters are compared
    # (L2) against how far the six steps moved them (a stale graph input would differ by about that much).
    assert l_g == pytest.approx(l_e, rel=1e-4)
    n_moved = 0
    for a, b, p0 in zip(p_g, p_e, start):
        moved = float((b - p0).norm())
        if moved == 0:  # e.g. rho_raw, whose learning rate is 0 with a field
            assert torch.equal(a, b)
            continue
        n_moved += 1
        assert float((a - b).norm()) <= 0.05 * moved
    assert n_moved >= 4
    assert torch.equal(s_g.visible_count, s_e.visible_count)
    assert torch.allclose(s_g.grad_sum, s_e.grad_sum, rtol=1e-3, atol=1e-9)


def test_training_step_never_waits_for_the_gpu(use_backend):
    """After a warm-up, one whole step (with the fixed pair capacity a graph uses, for cuda-ext) runs under
    CUDA's sync debug mode "error": any host synchronisation (.item(), nonzero, a pageable copy) raises."""
    from drgs_core.model.density import DensityStats
    from drgs_core.train_step import StepRunner

    model, dsa, cams, cfg, make_optimizer = _setup(3)
    opt = make_optimizer(model, cfg, capturable=True)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=False)
    stats = DensityStats.zeros(model.n, "cuda")
    runner.load(0, 0.5)
    runner.run(model, opt, stats)       # compiles kernels, fills caches and the optimizer state
    capacity = 2 * int(runner.pairs_seen) + 4096
    runner.load(1, 0.25)
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = runner._iteration(model, opt, stats, capacity=capacity)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and runner.skipped == 0
    assert float(stats.visible_count.max()) == 2.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graph_step_runs_on_a_second_gpu(use_backend):
    """A model on cuda:1 while cuda:0 is current: capture and replay happen on the model's device."""
    from drgs_core.train_step import StepRunner

    model, dsa, cams, cfg, make_optimizer = _setup(2, device="cuda:1")
    assert torch.cuda.current_device() == 0
    opt = make_optimizer(model, cfg, capturable=True)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=True)
    before = _params(model)
    losses = []
    for it, k in enumerate([0, 1, 2, 3]):
        runner.load(k, 0.2 * it)
        losses.append(float(runner.run(model, opt, None)))
    torch.cuda.synchronize("cuda:1")
    assert runner.use_graph and runner.captures == 1 and runner.skipped == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(_params(model), before))


def test_overflowing_view_is_skipped_then_capacity_grows(ext):
    from drgs_core.model.density import DensityStats
    from drgs_core.train_step import StepRunner

    model, dsa, cams, cfg, make_optimizer = _setup(1)
    opt = make_optimizer(model, cfg, capturable=True)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=True)
    runner.capacity_margin, runner.capacity_slack = 0.25, 0   # a graph whose pair list is far too small
    stats = DensityStats.zeros(model.n, "cuda")
    runner.load(0, 0.5)
    runner.run(model, opt, stats)          # eager step + capture
    assert runner.captures == 1 and runner.skipped == 0
    before, counts = _params(model), stats.visible_count.clone()
    runner.load(1, 0.5)
    runner.run(model, opt, stats)          # replay: overflows, so nothing may change
    torch.cuda.synchronize()
    assert runner.skipped == 1
    for a, b in zip(_params(model), before):
        assert torch.equal(a, b)
    assert torch.equal(stats.visible_count, counts)
    runner.capacity_margin, runner.capacity_slack = 2.0, 0
    runner.check()                         # sees the count above the capacity: re-capture next time
    runner.load(1, 0.5)
    runner.run(model, opt, stats)          # eager step + capture with room
    runner.load(0, 0.5)
    runner.run(model, opt, stats)          # replay: a real update
    torch.cuda.synchronize()
    assert runner.captures == 2 and runner.skipped == 1
    assert runner.capacity > int(runner.pairs_seen)
    assert any(not torch.equal(a, b) for a, b in zip(_params(model), before))
    assert float(stats.visible_count.max()) == 3.0


def test_graph_run_resumes_from_its_checkpoint(use_backend, tiny_case, tmp_path):
    """Stop a CUDA-graph run mid-way, resume it from the checkpoint: it finishes on the graph, losing nothing."""
    from drgs_core.pipeline import ReconstructConfig, run_reconstruction

    base = dict(case=tiny_case, views=8, device="cuda", preset="tiny", iterations=200, seed=1, progress_every=10,
                checkpoint_every=1000, times_4d=2, out=str(tmp_path / "run"))
    seen = {}

    def on_event(e):
        if e["event"] == "progress" and e.get("stage") == "train":
            seen["it"] = e["iteration"]

    part = run_reconstruction(ReconstructConfig(**base), on_event=on_event, should_stop=lambda: seen.get("it", 0) >= 100)
    assert part["status"] == "cancelled"
    first = {}

    def on_resumed(e):
        if e["event"] == "progress" and e.get("stage") == "train":
            first.setdefault("it", e["iteration"])

    done = run_reconstruction(ReconstructConfig(resume=True, **base), on_event=on_resumed)
    m = done["metrics"]
    assert done["status"] == "done" and m["iterations"] == 200
    assert m["cuda_graph"] is True and m["graph_captures"] >= 1 and m["skipped_iterations"] == 0
    assert m["backend"] == use_backend
    assert first["it"] > 100  # continued from the checkpoint, not from scratch
    fresh = run_reconstruction(ReconstructConfig(**{**base, "out": str(tmp_path / "fresh")}))["metrics"]
    assert m["heldout_psnr"] == pytest.approx(fresh["heldout_psnr"], abs=1.0)
