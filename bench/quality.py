"""Reconstruction quality against exact phantom truth: presets x view counts x schedules (issue 10).

For every phantom preset (default: `demo` with the CPU `demo` reconstruction preset, `paper` and `hard`),
generates the phantom once, runs FDK and `drgs4d reconstruct` at each view count and schedule, and scores each
against the truth: surface CD / HD95 (vertex distances between the run's mesh.stl and the truth surface, mm),
best Dice over thresholds next to the truth's own best Dice (its partial-volume truth volume thresholded
against its mask: the ceiling), and held-out PSNR / SSIM.  Rows are printed as they finish, written to
<out>/quality_rows.md and, unless --no-append, appended to bench/RESULTS.md under "## Quality".

    python bench/quality.py [--presets demo paper hard] [--views 10 20 30] [--schedules fast full]
                            [--size 256,128] [--ablate-registration] [--out DIR] [--no-append]
    python bench/quality.py --runs paper:30:fast hard:30:fast:off paper:30:fast:auto:grow_sigmas=0,min_speck_voxels=0

A run given as preset:views:schedule[:registration[:key=value,...]] may override ReconstructConfig fields and
the density control's settings (drgs_core.model.strategy.DensityConfig) for an ablation; the overrides are
shown in the row's schedule column.

--size H,N overrides the paper-size presets' detector (H x H pixels) and grid (N^3 voxels over the same
160 mm box), e.g. 256,128 for the issue's 133x256^2 / 128^3 rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from _common import ROOT, device_info

HEADER = ("| date | card | preset | views | schedule | iters | Gaussians | it/s | train s | best Dice (ceiling) | "
          "ratio | CD mm | HD95 mm | held-out PSNR / SSIM | FDK best Dice / CD / HD95 | registration | specks |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def fmt(v, nd=2):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def truth_ceiling(case_dir: Path) -> float:
    """Best Dice of the truth's own partial-volume volume against its mask."""
    from drgs_core.io import read_volume
    from drgs_core.metrics import best_dice

    vol, _ = read_volume(case_dir / "truth" / "volume.nii.gz")
    mask, _ = read_volume(case_dir / "truth" / "mask.nii.gz")
    return float(best_dice(vol, mask > 0.5)[0])


def level_sweep(run_dir: Path, case_dir: Path) -> dict:
    """CD / HD95 (after speck removal) of the run's volume at several iso-levels: fractions of the robust vessel
    value M and Otsu's split; for choosing the default iso-level rule (docs/METHOD.md §10.5)."""
    from drgs_core.io import read_mesh, read_volume
    from drgs_core.metrics import _robust_vessel_value, best_dice, chamfer_hd95, mesh_from_volume, robust_iso_level
    from drgs_core.specks import GAP_MM, drop_specks

    vol, info = read_volume(run_dir / "volume.nii.gz")
    truth_verts, _ = read_mesh(case_dir / "truth" / "mesh.stl")
    mask, _ = read_volume(case_dir / "truth" / "mask.nii.gz")
    M = _robust_vessel_value(vol, 99.5)[1]
    bd, bthr = best_dice(vol, mask > 0.5)
    levels = {f"{f:.2f}M": f * M for f in (0.1, 0.15, 0.2, 0.3, 0.4, 0.5)}
    levels["otsu"] = robust_iso_level(vol)
    levels["bestdice"] = bthr
    out = {"best_dice_threshold_over_M": bthr / M}
    variants = [(name, lv, "auto", GAP_MM) for name, lv in levels.items()]
    variants += [("0.20M-nospeck", 0.2 * M, 0, 0.0)] + [(f"0.20M-gap{g:g}", 0.2 * M, "auto", g) for g in (0, 1.5, 6)]
    for name, lv, size, gap in variants:
        clean, _, _ = drop_specks(vol, lv, size, info.grid.spacing, gap)
        verts, _ = mesh_from_volume(clean, info.grid, lv)
        if len(verts) == 0:
            continue
        d = chamfer_hd95(verts, truth_verts)
        out[name] = (round(lv / M, 3), round(float(d["cd"]), 3), round(float(d["hd95"]), 3))
    return out


def parse_overrides(text: str) -> tuple[dict, dict]:
    """'k=v,k=v' -> (ReconstructConfig values, DensityConfig values); values parsed as JSON where they parse."""
    from dataclasses import fields as dc_fields

    from drgs_core.config import ReconstructConfig
    from drgs_core.model.strategy import DensityConfig

    rc_names = {f.name for f in dc_fields(ReconstructConfig)}
    dc_names = {f.name for f in dc_fields(DensityConfig)}
    switches = {f.name for f in dc_fields(ReconstructConfig) if f.type in (bool, "bool")}
    rc, dc = {}, {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in switches and value in (0, 1):  # static_background=1 reads as true (1 and 0 only)
            value = bool(value)
        if key in rc_names:
            rc[key] = value
        elif key in dc_names:
            dc[key] = value
        else:
            raise SystemExit(f"unknown override {key!r}: not a ReconstructConfig or DensityConfig field")
    return rc, dc


class density_overrides:
    """Context: every DensityConfig built inside gets these settings (the bench's ablations only)."""

    def __init__(self, values: dict):
        self.values = values

    def __enter__(self):
        from drgs_core.model import strategy

        self.cls, values = strategy.DensityConfig, self.values
        original = self.cls.__post_init__

        def post_init(cfg):
            for key, value in values.items():
                setattr(cfg, key, value)
            original(cfg)

        self.original = original
        self.cls.__post_init__ = post_init
        return self

    def __exit__(self, *exc):
        self.cls.__post_init__ = self.original


def density_story(m: dict) -> str:
    """One line per few rounds of the density log: n, grown, gated out, pruned (rho / rejected / oversized)."""
    rounds = [r for r in (m.get("densify") or []) if "n_before" in r]
    if not rounds:
        return "no density rounds"
    parts = []
    for r in rounds[:: max(1, len(rounds) // 8)] + rounds[-1:]:
        parts.append(f"it{r['iteration']}: n {r['n_before']}->{r['n']} +{r['cloned']}c/{r['split']}s "
                     f"cand {r['grow_candidates']} gated {r['grow_gated_out']} capped {r['grow_capped']} "
                     f"-rho {r['pruned_rho']} -rej {r['pruned_rejected']} -big {r['pruned_oversized']}")
    return f"budget {rounds[0].get('budget')}; " + "; ".join(parts)


def make_case(name: str, out: Path, size, device: str) -> Path:
    from drgs_core.phantom import make_phantom, write_phantom
    from drgs_core.phantom.presets import PhantomConfig

    case_dir = out / f"{name}_case"
    if (case_dir / "transforms.json").exists():
        return case_dir
    over = {"device": device, "threads": None}
    if size is not None and name in ("paper", "hard"):
        det, vox = size
        over.update(detector_shape=(det, det), volume_resolution=(vox,) * 3, volume_spacing=(160.0 / vox,) * 3)
    t0 = time.perf_counter()
    write_phantom(make_phantom(PhantomConfig.preset(name, **over)), case_dir)
    print(f"phantom {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return case_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "paper", "hard"])
    ap.add_argument("--views", nargs="+", type=int, default=[10, 20, 30])
    ap.add_argument("--schedules", nargs="+", default=["fast", "full"])
    ap.add_argument("--runs", nargs="*", help="explicit preset:views:schedule triples (instead of the product)")
    ap.add_argument("--size", help="detector,grid for the paper-size presets, e.g. 256,128")
    ap.add_argument("--iterations", type=int, help="override the schedules' iteration counts (smoke tests)")
    ap.add_argument("--ablate-registration", action="store_true", help="also run hard presets with registration off")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out_quality"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="skip the iso-level sweep after each run")
    args = ap.parse_args()
    from drgs_core.pipeline import ReconstructConfig, run_fdk, run_reconstruction

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(x) for x in args.size.split(",")) if args.size else None
    info = device_info()
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/quality.py"] + sys.argv[1:])
    if args.runs:
        plan = [(p, int(v), s, rest[0] if rest else "auto", rest[1] if len(rest) > 1 else "")
                for p, v, s, *rest in (r.split(":") for r in args.runs)]
    else:
        plan = [(p, v, s, "auto", "") for p in args.presets for v in args.views for s in args.schedules]
        if args.ablate_registration:
            plan += [(p, max(args.views), "fast", "off", "") for p in args.presets if p.startswith("hard")]
    rows, cases, fdks, ceilings, sweeps = [], {}, {}, {}, {}
    rows_path = out / "quality_rows.md"
    rows_path.write_text(HEADER)
    for preset, views, schedule, registration, overrides in plan:
        rc_over, dc_over = parse_overrides(overrides)
        if preset not in cases:
            cases[preset] = make_case(preset, out, size, args.device)
            ceilings[preset] = truth_ceiling(cases[preset])
        case_dir = cases[preset]
        if (preset, views) not in fdks:
            fdks[(preset, views)] = run_fdk(case_dir, out / f"{preset}_fdk_v{views}", views=views,
                                            device=args.device)["truth"]
        fdk = fdks[(preset, views)]
        tag = "".join(c if c.isalnum() or c in "=." else "_" for c in overrides)
        run_dir = out / (f"{preset}_v{views}_{schedule}_reg-{registration}" + (f"_{tag}" if tag else ""))
        cfg = ReconstructConfig(**{"out": str(run_dir), "case": str(case_dir), "views": views, "schedule": schedule,
                                   "iterations": args.iterations, "device": args.device,
                                   "registration": registration, "overwrite": True,
                                   "preset": "demo" if preset.endswith("demo") else None, "times_4d": 2} | rc_over)
        t0 = time.perf_counter()
        with density_overrides(dc_over):
            m = run_reconstruction(cfg)["metrics"]
        tr = m["truth"]
        reg = m.get("registration") or {}
        sp = m.get("specks") or {}
        ceiling = ceilings[preset]
        label = preset + ("" if size is None or preset not in ("paper", "hard") else f" {size[0]}^2/{size[1]}^3")
        shown = schedule + ("" if registration == "auto" else f" reg {registration}") + (
            f" ({overrides})" if overrides else "")
        row = [info["date"], str(info.get("card")), label, str(views), shown,
               fmt(m["iterations"]), fmt(m["n_gaussians"]), fmt(m["it_per_s"], 0), fmt(m["timings_s"].get("train"), 1),
               f"{tr['best_dice']:.3f} ({ceiling:.3f})", fmt(tr["best_dice"] / ceiling, 3), fmt(tr["cd_mm"]),
               fmt(tr["hd95_mm"]), f"{fmt(m['heldout_psnr'])} / {fmt(m['heldout_ssim'], 3)}",
               f"{fdk['best_dice']:.3f} / {fdk['cd_mm']:.2f} / {fdk['hd95_mm']:.2f}",
               ("applied" if reg.get("applied") else "not applied") + (
                   f" ({reg['mean_shift_px']:.2f} px)" if "mean_shift_px" in reg else ""),
               f"{sp.get('dropped_components', 0)} / {sp.get('dropped_voxels', 0)} vox"]
        line = "| " + " | ".join(row) + " |\n"
        rows.append(line)
        with rows_path.open("a") as f:
            f.write(line)
        print(line.strip(), f"({time.perf_counter() - t0:.0f} s; graph {m.get('cuda_graph')}, "
              f"{m.get('graph_captures')} captures, {m.get('skipped_iterations')} skipped)", flush=True)
        print("  density:", density_story(m), flush=True)
        print(f"  iso level {m.get('iso_level')}, specks {sp}, timings {m.get('timings_s')}", flush=True)
        if not args.no_sweep and not overrides:  # ablations are compared at the default level only
            sweeps[run_dir.name] = level_sweep(run_dir, case_dir)
            print("  iso-level sweep (level/M, CD, HD95):", sweeps[run_dir.name], flush=True)
        (out / "quality.json").write_text(json.dumps({"rows": rows, "level_sweeps": sweeps}, indent=1))
    if not args.no_append and rows:
        res = Path(args.results)
        text = res.read_text() if res.exists() else ""
        block = (f"\n### Quality run {info['date']} ({info.get('card')}; `{command}`)\n\n"
                 "Phantoms from drgs_core.phantom (exact analytic tubes); ceiling = the truth volume's own best "
                 "Dice; FDK on the same views; specks = components dropped from mesh/segmentation.\n\n"
                 + HEADER + "".join(rows))
        if "## Quality" not in text:
            block = "\n## Quality\n" + block
        res.write_text(text + block)
        print(f"appended to {res}")


if __name__ == "__main__":
    main()
