"""Training-step rate per GPU backend on a synthetic scene (no phantom, no case folder): a quick A/B.

A GaussianModel of `--gaussians` Gaussians (field on, 2^19 tables) initialised from a blob volume on a 256^3
grid, 30 views of a 512^2 cone-beam detector, random targets; `StepRunner` (CUDA graph) runs `--iters`
iterations per backend after a warm-up.  Prints it/s per backend.  Not the paper case: compare backends with
each other here, and use bench_paper.py for the issue's numbers.

    python bench/bench_step.py [--backends cuda-ext,triton] [--gaussians 28000] [--iters 300]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def rate(backend: str, n: int, iters: int) -> float:
    from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
    from drgs_core.model.density import DensityStats
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.train import TrainConfig, make_optimizer
    from drgs_core.train_step import StepRunner

    os.environ["DRGS4D_BACKEND"] = backend
    dev = torch.device("cuda")
    torch.manual_seed(0)
    grid = VolumeGrid((256, 256, 256), (0.625, 0.625, 0.625))
    x = torch.linspace(-1, 1, 64)
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + (x[None, None, :] * 2) ** 2
    vol = torch.nn.functional.interpolate((torch.exp(-3 * r2) * 0.02)[None, None], size=(256,) * 3)[0, 0]
    model = GaussianModel(grid).to(dev)
    model.init_from_volume(vol, n, seed=0)
    geo = ConeBeamGeometry(750.0, 1200.0, (512, 512), (0.5, 0.5), np.linspace(0, np.pi, 30))
    cams = [geo.camera(k, device=dev) for k in range(30)]
    dsa = torch.rand(30, 512, 512, device=dev) * 0.5
    opt = make_optimizer(model, TrainConfig(iterations=iters), capturable=True)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=True)
    stats = DensityStats.zeros(model.n, dev)
    for it in range(20):
        runner.load(it % 30, 0.5)
        runner.run(model, opt, stats)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for it in range(iters):
        runner.load(it % 30, (it % 10) / 10)
        runner.run(model, opt, stats)
    torch.cuda.synchronize()
    r = iters / (time.perf_counter() - t0)
    print(f"{backend}: {r:.1f} it/s ({model.n} Gaussians, graph={runner.use_graph}, captures={runner.captures})",
          flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cuda-ext,triton")
    ap.add_argument("--gaussians", type=int, default=28000)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    for b in args.backends.split(","):
        rate(b.strip(), args.gaussians, args.iters)


if __name__ == "__main__":
    main()
