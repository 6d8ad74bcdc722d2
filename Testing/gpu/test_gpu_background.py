"""The training step with the static background (model.background) on the GPU: captured in a CUDA graph, its
replay equals the eager step, and the background's projection never waits for the host."""

import pytest
import torch

from test_gpu_train_step import _params, _setup

pytestmark = pytest.mark.gpu


def _runner(model, dsa, cams, cfg, make_optimizer, use_graph):
    from drgs_core.model.background import StaticBackground
    from drgs_core.train_step import StepRunner

    bg = StaticBackground(model.grid, cams[0], image_scale=2.0).to(model.means.device)
    opt = make_optimizer(model, cfg, capturable=use_graph, background=bg)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=use_graph, background=bg, background_l1=0.5)
    return runner, opt, bg


def test_graph_replay_with_the_background_matches_eager_steps(use_backend):
    from drgs_core.model.density import DensityStats

    runs = {}
    for use_graph in (False, True):
        model, dsa, cams, cfg, make_optimizer = _setup()
        runner, opt, bg = _runner(model, dsa, cams, cfg, make_optimizer, use_graph)
        assert runner.use_graph == use_graph
        stats = DensityStats.zeros(model.n, "cuda")
        losses = []
        for it, k in enumerate([0, 1, 2, 3, 1, 0]):
            runner.load(k, 0.1 * it)
            losses.append(float(runner.run(model, opt, stats)))
        torch.cuda.synchronize()
        runs[use_graph] = (losses, _params(model), bg.values.detach().clone(), runner.captures)
    (l_e, p_e, b_e, _), (l_g, p_g, b_g, captures) = runs[False], runs[True]
    assert captures == 1
    assert l_g == pytest.approx(l_e, rel=1e-4)
    # B moved (six Adam steps of ~lr each) and the replayed B follows the eager one; a graph that rendered a
    # stale camera would differ by about as much as B moved.
    moved = float(b_e.norm())
    assert moved > 0
    assert float((b_g - b_e).norm()) <= 0.1 * moved
    for a, b in zip(p_g, p_e):
        assert torch.isfinite(a).all() and a.shape == b.shape


def test_background_projection_never_waits_for_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    from drgs_core.model.background import StaticBackground
    from _gpu_testlib import geometry

    geo = geometry(angle=0.4)
    from drgs_core.geometry import VolumeGrid

    bg = StaticBackground(VolumeGrid((64, 64, 64), (2.0, 2.0, 2.0)), geo.camera(0), image_scale=1.0).cuda()
    params = geo.camera(1).pack("cuda").params
    with torch.no_grad():
        bg.values.normal_()
    bg.penalty().backward()
    bg.render(params).sum().backward()   # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        img = bg.render(params)
        (img.square().mean() + bg.penalty()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert img.shape == (geo.height, geo.width) and bool(torch.isfinite(img).all())
