"""Paper-scale end-to-end benchmark: phantom -> FDK init -> `fast` training -> voxelise -> mesh -> outputs.

Generates the `paper` phantom (133 frames, 512^2 detector, 256^3 volume; `--preset paper1024` for the 1024^2
detector) with drgs_core.phantom, runs drgs_core.pipeline.run_reconstruction (30 views, schedule `fast`, CUDA)
and prints + appends to bench/RESULTS.md: card, driver, command, date, FDK time, training it/s (median over the
run), end-to-end wall time, per-stage times, peak GPU memory, Gaussian count, CD / HD95 / Dice against the
phantom truth, and held-out PSNR / SSIM.  Phantom generation is timed separately and is not part of the
end-to-end time (it stands in for reading a real case from disk, which *is* timed, as the `load` stage).

    python bench/bench_paper.py [--preset paper|paper1024] [--views 30] [--schedule fast|full]
                                [--iterations N] [--out DIR] [--results bench/RESULTS.md] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from _common import ROOT, device_info

RESULTS_HEADER = """# DRGS4D performance results

## Performance

How to reproduce (on a machine with an NVIDIA GPU, a CUDA build of PyTorch and a CUDA toolkit):

```
pip install -e .                        # or: DRGS4D_BUILD_CUDA=1 pip install --no-build-isolation -e .
python bench/bench_kernels.py           # per-kernel timings vs the device's copy bandwidth
python bench/bench_paper.py             # paper phantom, 30 views, fast schedule, end to end
python bench/bench_paper.py --preset paper1024
python -m pytest Testing/gpu -q          # CUDA kernels vs the PyTorch reference
```

Without a prebuilt extension the kernels are compiled on first use into `~/.cache/drgs4d` (about a minute;
`$DRGS4D_CACHE` moves it).  `drgs_core.cuda.backend_report()` says which backend runs (cuda-ext, triton, torch);
`--backend triton` benchmarks the toolkit-free path.
End-to-end time = case loading + FDK + initialisation + training + voxelisation + mesh + writing all outputs
(the phantom's generation is not included).  Published 4DRGS on an RTX 3090 (paper): 10k iterations in
4 min 31 s, 30k in 12 min 38 s.

| date | card | driver | preset | views | schedule | iters | FDK s | train it/s | train s | voxelise s | mesh s | write s | end-to-end s | peak GPU GB | Gaussians | CD mm | HD95 mm | Dice | best Dice | held-out PSNR | held-out SSIM | step | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def insert_row(path: Path, line: str) -> None:
    """Insert `line` after the last row of the results table (the block under the '| date |' header)."""
    lines = path.read_text().splitlines(keepends=True)
    head = next((i for i, s in enumerate(lines) if s.startswith("| date |")), None)
    if head is None:
        lines.append(line)
    else:
        end = head + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines.insert(end, line)
    path.write_text("".join(lines))


def instrument_pipeline() -> dict:
    """Wrap the pipeline's stage functions with wall-clock timers (synchronising CUDA); returns the totals."""
    import functools

    import drgs_core.evaluate as evaluate
    import drgs_core.pipeline as pipeline

    totals: dict = {}

    def wrap(module, name):
        fn = getattr(module, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)

    for name in ("load_case", "fdk", "calibrate_initial_attenuation", "voxelize", "mesh_from_volume",
                 "robust_iso_level", "write_volume", "write_labelmap", "write_mesh", "write_sequence_nrrd",
                 "write_stack", "render_frames", "write_gaussians_ply", "save_model", "psnr_ssim_2d", "save_json"):
        wrap(pipeline, name)
    wrap(evaluate, "evaluate_against_truth")
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", choices=["paper", "paper1024", "demo"])
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--schedule", default="fast", choices=["fast", "full"])
    ap.add_argument("--iterations", type=int, default=None, help="override the schedule's iteration count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--phantom-device", default="cuda", help="device used to simulate the phantom")
    ap.add_argument("--allow-torch", action="store_true", help="run even if no GPU backend is in use")
    ap.add_argument("--backend", default="auto", choices=["auto", "cuda-ext", "triton", "torch"],
                    help="force a kernel backend (sets DRGS4D_BACKEND; auto: cuda-ext > triton > torch)")
    ap.add_argument("--reuse-phantom", action="store_true", help="reuse an existing phantom folder in --out")
    ap.add_argument("--no-cuda-graph", action="store_true", help="launch the training kernels eagerly (A/B)")
    ap.add_argument("--detector-binning", default="auto", help="'auto' (default) or a factor (1 = every pixel)")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="run under cProfile and print the N functions with the most cumulative time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paper needs a CUDA device")
    from drgs_core.phantom import make_phantom, write_phantom
    from drgs_core.phantom.presets import PhantomConfig
    from drgs_core.pipeline import ReconstructConfig, run_reconstruction

    from drgs_core import cuda

    os.environ["DRGS4D_BACKEND"] = args.backend
    report = cuda.backend_report("cuda")
    print("backend:", report, flush=True)
    if report["name"] == "torch" and not args.allow_torch:
        raise SystemExit("no GPU backend is active (pass --allow-torch to benchmark the reference)")
    out = Path(args.out)
    case_dir = out / f"{args.preset}_case"
    t_ph = None
    if not (args.reuse_phantom and (case_dir / "transforms.json").exists()):
        t0 = time.perf_counter()
        cfg_ph = PhantomConfig.preset(args.preset, device=args.phantom_device, threads=None)
        ph = make_phantom(cfg_ph)
        write_phantom(ph, case_dir)
        del ph
        torch.cuda.empty_cache()
        t_ph = time.perf_counter() - t0
        print(f"phantom {args.preset} generated in {t_ph:.1f} s -> {case_dir}", flush=True)
    run_dir = out / f"{args.preset}_v{args.views}_{args.schedule}_{report['name']}"
    torch.cuda.reset_peak_memory_stats()
    cfg = ReconstructConfig(out=str(run_dir), case=str(case_dir), views=args.views, schedule=args.schedule,
                            iterations=args.iterations, device="cuda", seed=args.seed,
                            cuda_graph=not args.no_cuda_graph, detector_binning=args.detector_binning)
    events = []

    def on_event(e):
        if e.get("event") in ("started", "done") or e.get("stage"):
            events.append(e)
        if e.get("event") == "progress" and e.get("iteration", 0) and e["iteration"] % 1000 == 0:
            print(f"  it {e['iteration']} loss {e.get('loss')} n={e.get('n_gaussians')} "
                  f"{e.get('elapsed_s', 0):.1f}s", flush=True)

    fn_times = instrument_pipeline()
    t0 = time.perf_counter()
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(run_reconstruction, cfg, on_event=on_event)
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(args.cprofile)
        stats.sort_stats("tottime").print_stats(args.cprofile // 2)
    else:
        result = run_reconstruction(cfg, on_event=on_event)
    m = json.loads((run_dir / "metrics.json").read_text())
    # End to end = load .. outputs written (+ image metrics); the truth evaluation is bench bookkeeping.
    wall = m.get("end_to_end_s", time.perf_counter() - t0)
    tim = m.get("timings_s", {})
    truth = m.get("truth", {}) or {}
    info = device_info()
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    summary = {
        "date": info["date"], "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
        "preset": args.preset, "views": args.views, "schedule": args.schedule, "iterations": m.get("iterations"),
        "fdk_s": m.get("fdk_s"), "it_per_s": m.get("it_per_s"), "timings_s": tim, "end_to_end_s": wall,
        "pipeline_total_s": m.get("total_s"), "peak_gpu_gb": m.get("peak_gpu_memory_gb"),
        "n_gaussians": m.get("n_gaussians"), "truth": truth, "heldout_psnr": m.get("heldout_psnr"),
        "heldout_ssim": m.get("heldout_ssim"), "train_psnr": m.get("train_psnr"), "phantom_s": t_ph,
        "backend": m.get("backend"), "command": command, "cuda_graph": m.get("cuda_graph"),
        "graph_captures": m.get("graph_captures"), "skipped_iterations": m.get("skipped_iterations"),
        "detector_binning": m.get("detector_binning"),
    }
    print(json.dumps(summary, indent=1))
    print("\nfunction times (s, summed over calls): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                              sorted(fn_times.items(), key=lambda kv: -kv[1])))
    summary["function_times_s"] = fn_times
    print("\nstage times (s): " + ", ".join(f"{k} {v:.2f}" for k, v in tim.items()))
    print(f"end-to-end {wall:.1f} s; FDK {fmt(m.get('fdk_s'))} s; training {fmt(m.get('it_per_s'), 1)} it/s; "
          f"CD {fmt(truth.get('cd_mm'))} mm, HD95 {fmt(truth.get('hd95_mm'))} mm, Dice {fmt(truth.get('dice'), 3)}; "
          f"held-out PSNR {fmt(m.get('heldout_psnr'))} dB SSIM {fmt(m.get('heldout_ssim'), 3)}")
    (out / f"summary_{args.preset}.json").write_text(json.dumps(summary, indent=1))
    if not args.no_append:
        res = Path(args.results)
        if not res.exists():
            res.write_text(RESULTS_HEADER)
        step_txt = m.get("backend", "?") + ", " + (
            f"graph ({m.get('graph_captures')} captures, {m.get('skipped_iterations')} skipped)"
            if m.get("cuda_graph") else "eager")
        line = "| " + " | ".join([
            info["date"], str(info.get("card")), str(info.get("driver")),
            args.preset + (f" (binned {m['detector_binning']}x)" if m.get("detector_binning", 1) > 1 else ""),
            str(args.views),
            args.schedule, fmt(m.get("iterations")), fmt(m.get("fdk_s")), fmt(m.get("it_per_s"), 1),
            fmt(tim.get("train"), 1), fmt(tim.get("voxelize")), fmt(tim.get("mesh")), fmt(tim.get("write"), 1),
            fmt(wall, 1), fmt(m.get("peak_gpu_memory_gb")), fmt(m.get("n_gaussians")), fmt(truth.get("cd_mm")),
            fmt(truth.get("hd95_mm")), fmt(truth.get("dice"), 3), fmt(truth.get("best_dice"), 3),
            fmt(m.get("heldout_psnr")), fmt(m.get("heldout_ssim"), 3), step_txt, f"`{command}`"]) + " |\n"
        insert_row(res, line)
        print(f"appended to {res}")
    return result


if __name__ == "__main__":
    main()
