"""CPU timings of the I/O stages at paper size: case loading (read + checks + DSA + registration) and writing the
result files, without a GPU and without the phantom's simulation.

A synthetic paper-size case (133 frames of 512^2 photon counts, Poisson noise, a 256^3 grid of 0.625 mm) is
written once with drgs_core.io.write_case into --dir; then each stage function is timed.

    python bench/bench_io_cpu.py [--dir /tmp/bench_io] [--frames 133] [--det 512] [--grid 256] [--only load|write]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def synthetic_case(frames: int, det: int, grid_n: int):
    """A Case with fill/mask photon counts (I0 1e5, a smooth 'skull' and a few vessel lines, Poisson noise)."""
    from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
    from drgs_core.io.case import Case

    rng = np.random.default_rng(0)
    v, u = np.mgrid[0:det, 0:det].astype(np.float32) / det
    tissue = 2.0 + 1.5 * np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) / 0.08)
    mask = np.empty((frames, det, det), np.float32)
    fill = np.empty_like(mask)
    for k in range(frames):
        vessel = 0.3 * np.exp(-((u - 0.3 - 0.4 * k / frames) ** 2) / 1e-4) + 0.2 * np.exp(-((v - 0.6) ** 2) / 5e-5)
        mask[k] = rng.poisson(1e5 * np.exp(-tissue))
        fill[k] = rng.poisson(1e5 * np.exp(-tissue - vessel))
    np.maximum(mask, 1, out=mask)
    np.maximum(fill, 1, out=fill)
    geom = ConeBeamGeometry(750.0, 1200.0, (det, det), (0.3 * 512 / det,) * 2,
                            np.linspace(-np.pi / 2, np.pi * 200 / 180 - np.pi / 2, frames))
    grid = VolumeGrid((grid_n,) * 3, (0.625 * 256 / grid_n,) * 3)
    dsa = np.maximum(np.log(mask.astype(np.float64)) - np.log(fill.astype(np.float64)), 0).astype(np.float32)
    return Case(dsa=dsa, geometry=geom, grid=grid, fill=fill, mask=mask, name="synthetic")


def timed(label, fn, *a, **k):
    """Run fn, print its wall and CPU (process) time; returns (result, wall seconds).  On a shared machine
    the CPU time is the steadier number."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    dt = time.perf_counter() - t
    print(f"{label:<44s} wall {dt:7.2f} s   cpu {time.process_time() - c:7.2f} s", flush=True)
    return out, dt


def bench_load(case_dir: Path) -> dict:
    import torch

    from drgs_core.config import ReconstructConfig
    from drgs_core.ct.registration import _smooth, estimate_shifts
    from drgs_core.io.case_folder import dsa_from_runs, read_case
    from drgs_core.io.validation import sanitise_intensities
    from drgs_core.io.volumes import read_stack
    from drgs_core.pipeline import load_case

    res = {}
    fill, res["read_stack fill"] = timed("read_stack(fill_run)", read_stack, case_dir / "fill_run.nii.gz")
    mask, _ = timed("read_stack(mask_run)", read_stack, case_dir / "mask_run.nii.gz")
    _, res["sanitise"] = timed("sanitise_intensities(fill)", sanitise_intensities, fill, "fill")
    _, res["dsa_from_runs"] = timed("dsa_from_runs", dsa_from_runs, fill, mask)
    _, res["smooth"] = timed("registration smoothing (one run)", _smooth, torch.as_tensor(fill))
    _, res["read_case"] = timed("read_case (both runs, checks, DSA)", read_case, case_dir)
    _, res["estimate_shifts"] = timed("registration estimate_shifts (CPU)", estimate_shifts, fill, mask)
    cfg = ReconstructConfig(out="/tmp/unused", case=str(case_dir))
    _, res["load_case"] = timed("pipeline.load_case (+ registration, CPU)", load_case, cfg)
    return res


def bench_write(out: Path, grid_n: int, frames: int, det: int) -> dict:
    """The pipeline's result files at paper size (renders at the binned detector size, a paper-size model),
    each timed alone, then all of them together on BackgroundWrites as the pipeline writes them."""
    import shutil

    import torch

    from drgs_core.geometry import VolumeGrid
    from drgs_core.io import write_labelmap, write_sequence_nrrd, write_stack, write_volume
    try:
        from drgs_core.io.atomic import BackgroundWrites
    except ImportError:  # code before BackgroundWrites (for a before/after comparison): 4 threads, as it wrote
        from concurrent.futures import ThreadPoolExecutor as BackgroundWrites
    from drgs_core.model.gaussians import GaussianModel
    from drgs_core.model.serialize import save_model, write_gaussians_ply

    grid = VolumeGrid((grid_n,) * 3, (0.625 * 256 / grid_n,) * 3)
    rng = np.random.default_rng(1)
    # a vessel-like volume: zero except a smooth band (voxelised Gaussians are truncated, so mostly exact zeros)
    vol = np.zeros(grid.resolution, np.float32)
    lo, hi = grid_n * 2 // 5, grid_n * 3 // 5
    vol[lo:hi, lo:hi, :] = rng.random((hi - lo, hi - lo, grid_n), dtype=np.float32) * 0.05
    seg = vol > 0.04
    vols4 = np.asfortranarray(np.stack([vol * (0.5 + 0.1 * t) for t in range(8)]))  # time fastest, as built
    half = det // 2  # 'auto' detector binning halves the paper detector
    renders = rng.random((frames, half, half), dtype=np.float32) * 0.1
    torch.manual_seed(0)
    model = GaussianModel(grid, n=30000, log2_table_size=19, n_levels=12)
    mean_rho = torch.rand(30000)
    jobs = {"volume.nii.gz": (write_volume, vol, grid), "segmentation.nii.gz": (write_labelmap, seg, grid),
            "volume_4d.seq.nrrd": (write_sequence_nrrd, vols4, grid, np.arange(8) / 8),
            "renders.nii.gz": (write_stack, renders, (0.6, 0.6)), "cine.nii.gz": (write_stack, renders, (0.6, 0.6)),
            "gaussians.ply": (write_gaussians_ply, model, mean_rho), "model.pt": (save_model, model)}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    res = {}
    for name, (fn, *args) in jobs.items():
        _, res[name] = timed(f"{fn.__name__} {name}", fn, out / name, *args)
        print(f"   {name:<24s} {(out / name).stat().st_size / 2**20:8.1f} MiB")

    def together():
        with BackgroundWrites(4) as writes:
            for name, (fn, *args) in jobs.items():
                writes.submit(fn, out / name, *args)

    _, res["all, BackgroundWrites"] = timed("all of them on BackgroundWrites", together)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench_io")
    ap.add_argument("--frames", type=int, default=133)
    ap.add_argument("--det", type=int, default=512)
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--only", choices=["load", "write"], default=None)
    args = ap.parse_args()
    root = Path(args.dir)
    case_dir = root / f"case_{args.frames}_{args.det}"
    res = {}
    if args.only in (None, "load"):
        if not (case_dir / "transforms.json").exists():
            from drgs_core.io import write_case

            case = synthetic_case(args.frames, args.det, args.grid)
            timed("write_case (synthetic, not timed below)", write_case, case, case_dir)
            del case
        for p in sorted(case_dir.iterdir()):
            print(f"   {p.name:<24s} {p.stat().st_size / 2**20:8.1f} MiB")
        res["load"] = bench_load(case_dir)
    if args.only in (None, "write"):
        res["write"] = bench_write(root / "write_out", args.grid, args.frames, args.det)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
