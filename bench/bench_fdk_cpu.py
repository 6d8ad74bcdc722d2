"""Benchmark: FDK of a 128^3 volume from 30 views of 256x256 on the CPU (prints seconds).

Usage: python bench/bench_fdk_cpu.py [--threads N] [--size 128] [--views 30] [--det 256] [--repeat 3]
Projections are exact chords of an off-centre ball (not timed); the timing covers drgs_core.ct.fdk only.
"""

import argparse
import time

import numpy as np
import torch

from drgs_core.ct import fdk
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid, view_indices


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--det", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    grid = VolumeGrid((args.size,) * 3, (160.0 / args.size,) * 3)
    angles = np.deg2rad(np.linspace(0.0, 200.0, 133))[view_indices(133, args.views)]
    geo = ConeBeamGeometry(750.0, 1200.0, (args.det, args.det), (400.0 / args.det,) * 2, angles)
    centre, radius, mu = torch.tensor([20.0, -10.0, 5.0], dtype=torch.float64), 25.0, 0.02
    src, dirs = geo.rays(dtype=torch.float64)
    oc = src[:, None, None, :] - centre
    b = (dirs * oc).sum(-1)
    c = (oc * oc).sum(-1) - radius ** 2
    proj = (2 * mu * torch.sqrt((b * b - c).clamp_min(0))).float()

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        vol = fdk(proj, geo, grid)
        times.append(time.perf_counter() - t0)
    print(f"fdk {args.size}^3 from {args.views} views of {args.det}x{args.det} on CPU "
          f"({torch.get_num_threads()} threads): best {min(times):.2f} s, mean {np.mean(times):.2f} s; "
          f"ball value {float(vol[tuple(grid.world_to_index(centre.numpy()).round().astype(int))]):.4f} (true {mu})")


if __name__ == "__main__":
    main()
