"""Time the init stage (drgs_core.pipeline._init_model) piece by piece: model construction, init_from_volume,
the attenuation calibration and the field fit, and report the fit's relative error.

    python bench/bench_init.py CASE [--device cpu|cuda] [--preset demo|tiny] [--threads N]
                               [--steps 50] [--lr 1e-2] [--views 30]

CASE: a case folder (e.g. `drgs4d phantom /tmp/demo_case --preset demo`).  Without --preset on a GPU the sizes
are the GPU defaults (30k Gaussians, 12 levels of 2^19), as bench_paper.py runs them.
"""

from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, choices=[None, "demo", "tiny"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--views", type=int, default=30)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from drgs_core import pipeline as P
    from drgs_core.ct import fdk
    from drgs_core.geometry import view_indices
    from drgs_core.model.gaussians import GaussianModel

    dev = torch.device(args.device)
    cfg = P.ReconstructConfig(out="/tmp/unused", case=args.case, preset=args.preset, device=args.device,
                              views=args.views)
    case = P.load_case(cfg, dev)
    idx = view_indices(case.n_frames, cfg.views)
    dsa = torch.as_tensor(case.dsa[idx], device=dev)
    vol = fdk(dsa, case.geometry.subset(idx), case.grid).clamp_min(0)

    def timed(label, fn, *a, **k):
        P._sync(dev)
        t = time.perf_counter()
        out = fn(*a, **k)
        P._sync(dev)
        print(f"{label:<22s} {time.perf_counter() - t:7.3f} s", flush=True)
        return out

    t0 = time.perf_counter()
    cams = [case.geometry.camera(int(k), device=dev) for k in idx]
    torch.manual_seed(cfg.seed)
    model = timed("GaussianModel", lambda: GaussianModel(case.grid, log2_table_size=cfg.log2_table_size,
                                                         n_levels=cfg.n_levels).to(dev))
    info = timed("init_from_volume", model.init_from_volume, vol, cfg.n_gaussians, seed=cfg.seed)
    target = timed("calibrate", P.calibrate_initial_attenuation, model, dsa, cams)
    rel = timed(f"fit ({args.steps} steps)", model.set_initial_attenuation, target, fit_steps=args.steps,
                lr=args.lr, seed=cfg.seed)
    print(f"init total {time.perf_counter() - t0:.3f} s on {dev} ({torch.get_num_threads()} CPU threads); "
          f"{info['n_gaussians']} Gaussians; fit relative error {rel:.3f}")


if __name__ == "__main__":
    main()
