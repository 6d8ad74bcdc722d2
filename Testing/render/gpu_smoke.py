"""Manual GPU check of the torch reference renderer (not collected by pytest; needs CUDA).

    PYTHONPATH=. python Testing/render/gpu_smoke.py

1. CUDA results equal CPU results (float64 images, gradients, volumes).
2. Scale: 512^2 image with 100k Gaussians (forward + backward) and a 256^3 volume with 100k small Gaussians:
   wall time and peak GPU memory.  Prints one line per measurement.
"""

import time

import numpy as np
import torch

from drgs_core import render
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid


def scene(n, spread, smin, smax, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * (smax - smin) + smin
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    rho = torch.rand(n, generator=g, dtype=torch.float64) * 0.05
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (means, scales, quats, rho)]


def sync():
    torch.cuda.synchronize()


def check_equal():
    geo = ConeBeamGeometry(750.0, 1200.0, (64, 80), (2.0, 2.0), np.array([0.4]))
    out = {}
    for dev in ("cpu", "cuda"):
        ps = scene(300, 80, 0.5, 30, 0, torch.float64, dev)
        m2 = torch.zeros(300, 2, dtype=torch.float64, device=dev, requires_grad=True)
        res = render.rasterize(*ps, geo.camera(0, dtype=torch.float64, device=dev), m2)
        w = torch.linspace(0, 1, res.image.numel(), dtype=torch.float64).view_as(res.image).to(dev)
        (res.image * w).sum().backward()
        grid = VolumeGrid((30, 28, 26), (3.0, 3.0, 3.0))
        ps2 = scene(300, 60, 0.5, 10, 1, torch.float64, dev)
        vol = render.voxelize(*ps2, grid)
        (vol * vol).sum().backward()
        out[dev] = [res.image, res.radii, m2.grad] + [p.grad for p in ps] + [vol] + [p.grad for p in ps2]
    worst = 0.0
    for a, b in zip(out["cpu"], out["cuda"]):
        b = b.cpu()
        if a.dtype == torch.int32:
            assert torch.equal(a, b)
            continue
        err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()
        worst = max(worst, err)
    print(f"cpu vs cuda float64: worst relative difference {worst:.2e}")
    assert worst < 1e-10


def bench_raster(P=100_000, size=512, smin=0.3, smax=2.5, label="small"):
    geo = ConeBeamGeometry(750.0, 1200.0, (size, size), (0.6, 0.6), np.array([0.4]))
    cam = geo.camera(0, device="cuda")
    ps = scene(P, 90, smin, smax, 2, torch.float32, "cuda")
    m2 = torch.zeros(P, 2, device="cuda", requires_grad=True)
    for _ in range(2):
        res = render.rasterize(*ps, cam, m2)
        res.image.square().sum().backward()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        res = render.rasterize(*ps, cam, m2)
        res.image.square().sum().backward()
    sync()
    dt = (time.perf_counter() - t0) / n
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    vis = int(res.visible.sum())
    print(f"rasterize {size}^2, {P} Gaussians ({label}, s {smin}-{smax} mm, {vis} visible, mean radius "
          f"{res.radii[res.visible].float().mean():.1f} px): fwd+bwd {dt * 1e3:.1f} ms, peak extra {peak:.0f} MiB")


def bench_voxelize(P=100_000, n=256, smin=0.3, smax=2.0):
    grid = VolumeGrid((n, n, n), (0.75, 0.75, 0.75))
    ps = [p.detach() for p in scene(P, 90, smin, smax, 3, torch.float32, "cuda")]
    render.voxelize(*ps, grid)
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    vol = render.voxelize(*ps, grid)
    sync()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"voxelize {n}^3, {P} Gaussians (s {smin}-{smax} mm): {dt * 1e3:.1f} ms, peak extra {peak:.0f} MiB "
          f"(volume itself {vol.numel() * 4 / 2**20:.0f} MiB)")
    ps = [p.requires_grad_() for p in ps]
    t0 = time.perf_counter()
    render.voxelize(*ps, grid).square().sum().backward()
    sync()
    print(f"voxelize {n}^3 fwd+bwd {1e3 * (time.perf_counter() - t0):.1f} ms")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), "backend:", render.active_backend("cuda"))
    check_equal()
    bench_raster()
    bench_raster(P=100_000, smin=1.0, smax=6.0, label="medium")
    bench_raster(P=1000, smin=100.0, smax=150.0, label="larger than the image")
    bench_voxelize()
