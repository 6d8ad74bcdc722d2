"""Micro-benchmark of the CUDA kernels (median of CUDA-event timings after warm-up).

For every kernel a simple traffic / arithmetic model gives the fewest bytes it must move through device memory
and its floating-point work; the table reports the achieved GB/s as a fraction of the measured device-to-device
copy bandwidth (bytes read + written), and GFLOP/s.  Paper-scale inputs: a 512^2 (and 1024^2) detector, 256^3
volume of 0.625 mm voxels, 30k-100k Gaussians of 1-3 voxels (the `fast` schedule grows the initial 30k).

    python bench/bench_kernels.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from _common import copy_bandwidth_gbs, cuda_time_ms, device_info

from drgs_core.geometry import ConeBeamGeometry, VolumeGrid


def paper_geometry(det: int = 512) -> ConeBeamGeometry:
    fov = 160.0 * 1.03  # 256 x 0.625 mm volume plus a margin, at the isocentre
    sx = fov * 1200.0 / 750.0 / det
    return ConeBeamGeometry(750.0, 1200.0, (det, det), (sx, sx), np.deg2rad(np.linspace(-100, 100, 133)))


def paper_gaussians(P: int, seed: int = 0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(P, 3, generator=gen) - 0.5) * 140.0
    scales = 0.625 * (0.7 + 2.3 * torch.rand(P, 3, generator=gen))
    rots = torch.randn(P, 4, generator=gen)
    rho = 0.02 + 0.05 * torch.rand(P, generator=gen)
    return [t.to(device) for t in (means, scales, rots, rho)]


def row(name, ms, n_bytes, flops, bw):
    gbs = n_bytes / (ms * 1e-3) / 1e9
    return {"kernel": name, "ms": ms, "model_MB": n_bytes / 1e6, "GB/s": gbs, "bw_frac": gbs / bw,
            "GFLOP/s": flops / (ms * 1e-3) / 1e9}


def bench_raster(ext, P, det, bw, quick):
    from drgs_core.cuda import _wrapper as cuda_backend

    geo = paper_geometry(det)
    cam = geo.camera(40, device="cuda")
    means, scales, rots, rho = paper_gaussians(P)
    leaves = [t.clone().requires_grad_(True) for t in (means, scales, rots, rho)]
    m2 = torch.zeros(P, 2, device="cuda", requires_grad=True)
    H = W = det
    rep = 10 if quick else 50

    def fwd():
        return cuda_backend.rasterize(*leaves, cam, m2)

    with torch.no_grad():
        res = fwd()
    n_pairs = int(res.n_pairs)
    geom = cuda_backend._ext().raster_forward(means, scales, rots, rho, torch.empty(0, device="cuda"),
                                             cam.pack("cuda").params, W, H, 0, False)
    box = geom[6].view(-1, 4).long()
    area = ((box[:, 2] - box[:, 0] + 1).clamp(min=0) * (box[:, 3] - box[:, 1] + 1).clamp(min=0)).sum().item()
    vis = int(res.visible.sum())
    t_f = cuda_time_ms(lambda: fwd(), repeat=rep)["median"]
    # forward bytes: params in (11 floats), geom/box/radii/visible/centres out (~13 words), pair keys + ids
    # written, sorted (radix: ~3 passes of read + write), geometry gathered per pair (10 words), image out.
    bytes_f = P * 11 * 4 + P * 14 * 4 + n_pairs * 8 * (1 + 6) + n_pairs * 40 + H * W * 4
    flops_f = n_pairs * 256 * 11 + P * 600
    rows = [row(f"raster fwd P={P // 1000}k {det}^2 (pairs {n_pairs // 1000}k)", t_f, bytes_f, flops_f, bw)]
    G = torch.randn(H, W, device="cuda")

    def fwd_bwd():
        r = fwd()
        r.image.backward(G)

    t_fb = cuda_time_ms(fwd_bwd, repeat=rep)["median"]
    t_b = t_fb - t_f
    # backward bytes: grad image (once), pair key/id + saved geometry and box per pair, inputs re-read,
    # 5 grads out, 6 doubles per pair written and read back.
    bytes_b = H * W * 4 + n_pairs * (8 + 40) + P * 11 * 4 + P * 13 * 4 + n_pairs * 48 * 2
    flops_b = area * 25 + P * 1500
    rows.append(row(f"raster bwd P={P // 1000}k {det}^2 (visible {vis // 1000}k, footprint px {area / 1e6:.1f}M)",
                    t_b, bytes_b, flops_b, bw))
    rows.append(row(f"raster fwd+bwd P={P // 1000}k {det}^2", t_fb, bytes_f + bytes_b, flops_f + flops_b, bw))
    return rows


def bench_raster_torch(P, det, quick):
    from drgs_core.render import torch_ref

    geo = paper_geometry(det)
    cam = geo.camera(40, device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in paper_gaussians(P)]
    G = torch.randn(det, det, device="cuda")

    def fwd_bwd():
        r = torch_ref.rasterize(*leaves, cam)
        r.image.backward(G)

    return cuda_time_ms(fwd_bwd, warmup=2, repeat=3 if quick else 10)["median"]


def bench_voxel(ext, P, n, bw, quick):
    from drgs_core.cuda import _wrapper as cuda_backend

    grid = VolumeGrid((n, n, n), (0.625 * 256 / n,) * 3)
    means, scales, rots, rho = paper_gaussians(P)
    with torch.no_grad():
        t = cuda_time_ms(lambda: cuda_backend.voxelize(means, scales, rots, rho, grid), repeat=5 if quick else 20)
    # pairs: estimate from the 3-sigma boxes (8^3 bricks)
    from drgs_core.render.common import axis_variances

    half = 3 * axis_variances(scales, rots).sqrt() / grid.spacing[0]
    bricks = (torch.floor(2 * half / 8) + 2).prod(-1).sum().item()
    box_vox = (2 * half + 1).prod(-1).sum().item()
    bytes_ = n ** 3 * 4 + P * 11 * 4 + P * 24 * 4 + bricks * 8 * 7 + bricks * 88
    flops = bricks * 512 * 22
    return [row(f"voxelize {n}^3 P={P // 1000}k (bricks~{bricks / 1e6:.2f}M, box voxels {box_vox / 1e6:.0f}M)",
                t["median"], bytes_, flops, bw)]


def bench_hash(P, D, bw, quick):
    from drgs_core.cuda import _wrapper as hashgrid_cuda
    from drgs_core.model.hashgrid import HashGridEncoding

    base, growth = (8, 1.45) if D == 3 else (2, 1.4)
    enc = HashGridEncoding(D, 12, 2, 19, base, growth, seed=0).cuda()
    x = torch.rand(P, D, device="cuda")
    G = torch.randn(P, 24, device="cuda")
    rep = 10 if quick else 50
    t_f = cuda_time_ms(lambda: hashgrid_cuda.hashgrid_encode(enc, x), repeat=rep)["median"]

    def fb():
        enc.table.grad = None
        hashgrid_cuda.hashgrid_encode(enc, x).backward(G)

    t_fb = cuda_time_ms(fb, repeat=rep)["median"]

    def fb_ref():
        enc.table.grad = None
        enc(x).backward(G)

    t_ref = cuda_time_ms(fb_ref, warmup=2, repeat=5 if quick else 20)["median"]
    L, F, C = 12, 2, 2 ** D
    gathers = P * L * C * F * 4
    table_bytes = enc.table.numel() * 4
    bytes_f = P * D * 4 + P * L * F * 4 + min(gathers, table_bytes)  # every touched row at least once
    bytes_b = P * D * 4 + P * L * F * 4 + table_bytes * 2  # grad table zeroed + scattered
    flops_f = P * L * C * (D + 2 * F)
    rows = [row(f"hashgrid {D}D fwd P={P // 1000}k (gathers {gathers / 1e6:.0f}MB)", t_f, bytes_f, flops_f, bw),
            row(f"hashgrid {D}D fwd+bwd P={P // 1000}k (torch ref {t_ref:.2f} ms)", t_fb, bytes_f + bytes_b,
                3 * flops_f, bw)]
    return rows


def ssim_separable(x, y, window: int = 11, sigma: float = 1.5, data_range: float = 1.0):
    """Same value as drgs_core.metrics.ssim for [H, W] images, with the Gaussian window applied as two 1-D
    convolutions over the five stacked moment images (one conv2d call per direction)."""
    import torch.nn.functional as F

    k = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    g = g / g.sum()
    inp = torch.stack([x, y, x * x, y * y, x * y])[:, None]
    t = F.conv2d(F.conv2d(inp, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))[:, 0]
    mx, my, exx, eyy, exy = t
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean()


def bench_loop_parts(quick):
    """The non-kernel parts of one training iteration that profiling showed to be large (SSIM, Adam)."""
    from drgs_core.metrics import ssim

    rows = []
    x = torch.rand(512, 512, device="cuda", requires_grad=True)
    y = torch.rand(512, 512, device="cuda")
    rep = 10 if quick else 50

    def run(fn):
        def f():
            x.grad = None
            (1 - fn(x, y)).backward()
        return cuda_time_ms(f, repeat=rep)["median"]

    with torch.no_grad():
        a, b = ssim(x, y), ssim_separable(x, y)
    rows.append(("ssim 512^2 fwd+bwd, drgs_core.metrics.ssim (11x11 conv2d)", run(ssim)))
    rows.append((f"ssim 512^2 fwd+bwd, separable 1-D convs (|diff| {abs(float(a - b)):.1e})", run(ssim_separable)))
    torch.backends.cudnn.benchmark = True
    rows.append(("ssim 512^2 fwd+bwd, metrics.ssim with cudnn.benchmark=True", run(ssim)))
    torch.backends.cudnn.benchmark = False
    # Adam over the field's parameters: 2 hash tables of 12 x 2^19 x 2 floats + the Gaussians (30k)
    params = [torch.zeros(6_300_000, 2, device="cuda", requires_grad=True) for _ in range(2)]
    params += [torch.zeros(30_000, 3, device="cuda", requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    for fused in (False, True):
        opt = torch.optim.Adam([{"params": params[:2], "weight_decay": 5e-5}, {"params": params[2:]}], lr=1e-3,
                               eps=1e-15, fused=fused)
        rows.append((f"Adam step, 25.3M params, {'fused=True' if fused else 'foreach (default)'}",
                     cuda_time_ms(opt.step, repeat=rep)["median"]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    from drgs_core.cuda._backend import extension_info, load_extension

    ext = load_extension()
    if ext is None:
        raise SystemExit(f"CUDA extension unavailable: {extension_info()}")
    info = device_info()
    bw = copy_bandwidth_gbs()
    print(f"# {info['card']} driver {info.get('driver')} torch {info['torch']} CUDA {info['cuda']}; "
          f"device-to-device copy {bw:.0f} GB/s (read + write)")
    rows = []
    sizes = [(30_000, 512), (100_000, 512), (100_000, 1024)] if not args.quick else [(30_000, 512), (100_000, 512)]
    for P, det in sizes:
        rows += bench_raster(ext, P, det, bw, args.quick)
    t_ref = bench_raster_torch(30_000, 512, args.quick)
    rows.append({"kernel": "raster fwd+bwd P=30k 512^2, torch reference on the GPU", "ms": t_ref, "model_MB": 0,
                 "GB/s": 0, "bw_frac": 0, "GFLOP/s": 0})
    for P in ([100_000] if args.quick else [30_000, 100_000, 300_000]):
        rows += bench_voxel(ext, P, 256, bw, args.quick)
    for D in (3, 4):
        for P in ([30_000, 100_000] if not args.quick else [100_000]):
            rows += bench_hash(P, D, bw, args.quick)
    extra = bench_loop_parts(args.quick)
    print(f"{'kernel':<78} {'ms':>9} {'model MB':>9} {'GB/s':>8} {'of BW':>6} {'GFLOP/s':>9}")
    for r in rows:
        print(f"{r['kernel']:<78} {r['ms']:9.3f} {r['model_MB']:9.1f} {r['GB/s']:8.0f} {100 * r['bw_frac']:5.1f}% "
              f"{r['GFLOP/s']:9.0f}")
    for name, ms in extra:
        print(f"{name:<78} {ms:9.3f}")
        rows.append({"kernel": name, "ms": ms})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info, "copy_GBs": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
