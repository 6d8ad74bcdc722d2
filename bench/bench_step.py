"""Training-step rate per GPU backend, eager and CUDA graph, on a synthetic paper-size scene: a quick A/B.

A GaussianModel of `--gaussians` Gaussians (field on, 2^19 tables) initialised from a blob volume on a 256^3
grid, 30 views of a 512^2 cone-beam detector (the paper case's sizes), random targets; `StepRunner` runs
`--iters` iterations per backend and mode after a warm-up (the first iteration's time, which includes Triton's
kernel compilation, is printed separately).  Prints it/s per backend and mode, then the ratio of each backend's
graph rate to cuda-ext's (the issue's target for the toolkit-free path: >= 60 %).  Not the paper case: compare
backends with each other here, and use bench_paper.py for the issue's numbers.

    python bench/bench_step.py --backends cuda-ext triton [--modes eager graph] [--gaussians 28000] [--iters 300]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def rate(backend: str, graph: bool, n: int, iters: int) -> float:
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
    opt = make_optimizer(model, TrainConfig(iterations=iters), capturable=graph)
    runner = StepRunner(model, dsa, cams, 2.0, 0.2, use_graph=graph)
    stats = DensityStats.zeros(model.n, dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner.load(0, 0.5)
    runner.run(model, opt, stats)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for it in range(1, 20):
        runner.load(it % 30, 0.5)
        runner.run(model, opt, stats)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for it in range(iters):
        runner.load(it % 30, (it % 10) / 10)
        runner.run(model, opt, stats)
    torch.cuda.synchronize()
    r = iters / (time.perf_counter() - t0)
    mode = "graph" if runner.use_graph else "eager"
    if graph and not runner.use_graph:
        mode += " (capture failed: see the log)"
    print(f"{backend:8s} {mode:5s}: {r:7.1f} it/s  ({model.n} Gaussians, first iteration {first:.2f} s, "
          f"captures={runner.captures}, peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GB)", flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["cuda-ext", "triton"],
                    help="GPU backends (space or comma separated)")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--gaussians", type=int, default=28000)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    backends = [b.strip() for arg in args.backends for b in arg.split(",") if b.strip()]
    rates = {}
    for b in backends:
        for mode in args.modes:
            rates[b, mode] = rate(b, mode == "graph", args.gaussians, args.iters)
    for mode in args.modes:
        ref = rates.get(("cuda-ext", mode))
        for b in backends:
            if ref and b != "cuda-ext":
                print(f"{b} / cuda-ext ({mode}): {100 * rates[b, mode] / ref:.0f} %")


if __name__ == "__main__":
    main()
