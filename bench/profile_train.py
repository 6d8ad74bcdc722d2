"""Where does a training iteration's time go?  torch.profiler over a few dozen iterations of the real loop.

Sets the model up exactly as drgs_core.pipeline does (FDK init on the training views, calibrated attenuation),
runs `--warmup` iterations of drgs_core.train.train unprofiled, replayed from a CUDA graph and then launched
eagerly (reports both it/s), then `--iters` eager iterations under torch.profiler (inside a graph replay the
profiler cannot name the kernels; their GPU time is the same) and prints the top operators by GPU time and by
CPU time, plus the GPU-busy fraction.

    python bench/profile_train.py CASE_DIR [--views 30] [--warmup 300] [--iters 50]
"""

from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--trace", default=None, help="write a chrome trace here")
    args = ap.parse_args()
    from drgs_core.ct import fdk
    from drgs_core.geometry import view_indices
    from drgs_core.io import read_case
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.pipeline import calibrate_initial_attenuation
    from drgs_core.render import active_backend
    from drgs_core.train import TrainConfig, train

    dev = torch.device("cuda")
    print("backend", active_backend(dev))
    case = read_case(args.case)
    idx = view_indices(case.n_frames, args.views)
    dsa = torch.as_tensor(case.dsa[idx], device=dev)
    vol = fdk(dsa, case.geometry.subset(idx), case.grid).clamp_min(0)
    model = GaussianModel(case.grid).to(dev)
    model.init_from_volume(vol, 30_000, seed=0)
    target = calibrate_initial_attenuation(model, dsa, [case.geometry.camera(int(k), device=dev) for k in idx])
    model.set_initial_attenuation(target, seed=0)
    cams = [case.geometry.camera(int(k), device=dev) for k in idx]
    times = case.times[idx]

    def run(n, graph):
        cfg = TrainConfig(schedule="fast", iterations=n, densify_until=10**9, densify_from=10**9,
                          progress_every=max(1, n // 4), checkpoint_every=10**9, cuda_graph=graph)
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = train(model, dsa, cams, times, cfg, n_views=args.views)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t), r

    for graph in (True, False):
        rate, r = run(args.warmup, graph)
        print(f"{model.n} Gaussians, {case.geometry.height}x{case.geometry.width}, "
              f"{'CUDA graph' if r['cuda_graph'] else 'eager'}: {rate:.1f} it/s ({1000 / rate:.2f} ms/it) over "
              f"{args.warmup} iterations incl. set-up (median {r['it_per_s']:.1f} it/s; no density control)")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run(args.iters, False)
        wall = time.perf_counter() - t
    ka = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CPU") / args.iters
    print(f"profiled: {1000 * wall / args.iters:.2f} ms/it wall (profiler overhead included); "
          f"GPU kernel time {gpu_us / 1000:.2f} ms/it -> GPU busy {100 * gpu_us / 1e3 / (1000 * wall / args.iters):.0f}%")
    print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
