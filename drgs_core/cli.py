"""`drgs4d`: the command line. Only this module prints; the engine emits events and logs."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__, cli_dicom
from .errors import DRGSInputError

log = logging.getLogger("drgs4d")


# ---- rendering of events and tables -------------------------------------------------------------
class ProgressPrinter:
    """Turns pipeline events into a tqdm progress bar over training iterations and stage lines."""

    def __init__(self, label: str = "", quiet: bool = False):
        self.label, self.quiet, self.bar, self.stage = label, quiet, None, None

    def __call__(self, e: dict) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        kind = e.get("event")
        if kind == "started" and e.get("note"):
            tqdm.write(f"{self.label}note: {e['note']}", file=sys.stderr)
        if kind == "progress" and e.get("stage") == "train":
            if self.bar is None:
                self.bar = tqdm(total=e["iterations"], desc=f"{self.label}train", unit="it", dynamic_ncols=True,
                                file=sys.stderr)
            self.bar.n = e["iteration"]
            self.bar.set_postfix(loss=f"{e['loss']:.4g}", gaussians=e["n_gaussians"], refresh=False)
            self.bar.refresh()
        elif kind == "progress" and e.get("stage") != self.stage:
            self.stage = e.get("stage")
            self._close()
            tqdm.write(f"{self.label}{self.stage} ... ({e.get('elapsed_s', 0.0):.1f} s)", file=sys.stderr)
        elif kind == "snapshot":
            tqdm.write(f"{self.label}snapshot at iteration {e['iteration']}: {e['volume']}", file=sys.stderr)
        elif kind in ("done", "cancelled"):
            self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> an aligned text table; columns = (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if not isinstance(v, str) else v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, c in enumerate(cells):
        out.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


SUMMARY_COLUMNS = [("method", "method", ""), ("cd_mm", "CD mm", ".2f"), ("hd95_mm", "HD95 mm", ".2f"),
                   ("best_dice", "best Dice", ".3f"), ("heldout_psnr", "held-out PSNR", ".2f"),
                   ("heldout_ssim", "held-out SSIM", ".3f"), ("time_s", "time s", ".1f")]


# ---- subcommands ----------------------------------------------------------------------------------
def cmd_phantom(a) -> int:
    from .phantom import make_phantom, write_phantom
    from .phantom.presets import preset

    t0 = time.perf_counter()
    over = {"seed": a.seed, "static": a.static}
    if a.no_noise:
        over["noise"] = False
    if a.frames is not None:
        over["n_frames"] = a.frames
    if a.detector:
        over["detector_shape"] = (a.detector, a.detector)
    if a.volume:
        base = preset(a.preset)
        box = base.volume_resolution[0] * base.volume_spacing[0]
        over["volume_resolution"] = (a.volume,) * 3
        over["volume_spacing"] = (box / a.volume,) * 3
    cfg = preset(a.preset, **over)
    _check_phantom_memory(cfg)
    from tqdm import tqdm

    with tqdm(total=cfg.n_frames, desc="simulating frames", unit="frame", file=sys.stderr) as bar:
        ph = make_phantom(cfg, on_frame=lambda k, n: bar.update(1 if k else 0))
        bar.update(bar.total - bar.n)
    print("writing the case folder and ground truth ...", file=sys.stderr)
    write_phantom(ph, a.out)
    if a.dicom:
        from .io.dicom_write import case_to_dicom

        case_to_dicom(ph.case, a.dicom, style=a.dicom_style)
        print(f"mask and fill runs written as XA DICOM to {a.dicom}", file=sys.stderr)
    case = ph.case
    print(f"phantom '{a.preset}' written to {a.out} in {time.perf_counter() - t0:.1f} s: {case.n_frames} frames of "
          f"{case.geometry.height}x{case.geometry.width}, volume {case.grid.resolution}, truth in {a.out}/truth")
    return 0


def _check_phantom_memory(cfg) -> None:
    """Refuse phantom sizes beyond this machine's memory before allocating them (float32 volume and runs, with
    a few working copies each)."""
    import os

    import numpy as np

    need = 4 * 6 * (float(np.prod(cfg.volume_resolution)) + cfg.n_frames * float(np.prod(cfg.detector_shape)))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > total:
        raise DRGSInputError("the phantom does not fit in this machine's memory",
                             f"{cfg.n_frames} frames of {cfg.detector_shape}, volume {cfg.volume_resolution}: "
                             f"about {need / 2**30:.3g} GiB, the machine has {total / 2**30:.3g} GiB",
                             "smaller --frames / --detector / --volume", "pass smaller sizes")


def cmd_fdk(a) -> int:
    from .pipeline import run_fdk

    metrics = run_fdk(a.case, a.out, views=a.views, device=a.device, iso_level=a.iso_level,
                      use_secondary_angle=not a.ignore_secondary_angle, detector_binning=a.detector_binning)
    row = {"method": "FDK", "time_s": metrics["fdk_s"], **metrics.get("truth", {})}
    print(format_table([row], SUMMARY_COLUMNS))
    print(f"volume: {Path(a.out) / 'volume.nii.gz'}  metrics: {Path(a.out) / 'metrics.json'}")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate_against_truth, evaluate_reference_mesh
    from .io import read_case, read_mesh
    from .model.serialize import save_json

    run = Path(a.run)
    if not run.is_dir():
        raise DRGSInputError("the result folder does not exist", str(run), "a folder written by reconstruct or fdk",
                             "check the path")
    mpath = run / "metrics.json"
    try:
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise DRGSInputError(f"{mpath} is damaged", str(exc)[:160], "the metrics.json a run wrote",
                             f"delete {mpath} (it is rewritten with the evaluation) or rerun the reconstruction"
                             ) from None
    if a.truth:
        metrics["truth"] = evaluate_against_truth(run, a.truth, a.iso_level)
    elif a.reference_mesh:
        if not a.case:
            raise DRGSInputError("--reference-mesh needs --case", "no case folder", "the case the mesh belongs to",
                                 "pass --case CASE so that voxel index units can be converted to mm")
        grid = read_case(a.case).grid
        verts, _ = read_mesh(run / "mesh.stl")
        metrics["reference"] = evaluate_reference_mesh(verts, a.reference_mesh, grid, icp=not a.no_icp)
    else:
        raise DRGSInputError("nothing to evaluate against", "neither --truth nor --reference-mesh",
                             "one of them", "pass --truth PHANTOM/truth or --reference-mesh mesh_ref.obj --case CASE")
    save_json(mpath, metrics)
    row = {"method": run.name, "time_s": metrics.get("total_s"), "heldout_psnr": metrics.get("heldout_psnr"),
           "heldout_ssim": metrics.get("heldout_ssim"), **metrics.get("truth", metrics.get("reference", {}))}
    print(format_table([row], SUMMARY_COLUMNS))
    print(f"metrics: {mpath}")
    return 0


#: options that set a ReconstructConfig field under another name (the negation of a default-true field)
INVERTED_FLAGS = {"ignore_secondary_angle": "use_secondary_angle", "no_cuda_graph": "cuda_graph"}


def _reconstruct_config(a):
    """The ReconstructConfig of `reconstruct`: every option named like a field (--n-gaussians -> n_gaussians)
    is taken over; all values are checked by the one validator (drgs_core.config) with option names."""
    from dataclasses import fields

    from .config import ReconstructConfig

    d = {f.name: getattr(a, f.name) for f in fields(ReconstructConfig) if getattr(a, f.name, None) is not None}
    for flag, key in INVERTED_FLAGS.items():
        d[key] = not getattr(a, flag)
    return ReconstructConfig.from_dict(d, option_names=True, text=True)


def cmd_reconstruct(a) -> int:
    import signal
    import threading

    from .pipeline import run_reconstruction

    cfg = _reconstruct_config(a)
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        stop.set()
        print("\nstopping after the current iteration and saving a checkpoint "
              "(Ctrl-C again to stop at once) ...", file=sys.stderr)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run_reconstruction(cfg, on_event=ProgressPrinter(quiet=a.quiet), should_stop=stop.is_set)
    except KeyboardInterrupt:
        print("interrupted; --resume continues from the last periodic checkpoint", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result["status"] == "cancelled":
        ckpt = result["outputs"].get("checkpoint")
        print(f"stopped; checkpoint kept at {ckpt} (continue with --resume)" if ckpt
              else "stopped before training started; nothing to resume")
        return 3
    m = result["metrics"]
    row = {"method": "4DRGS-static" if cfg.static_field else "4DRGS", "time_s": m["total_s"],
           "heldout_psnr": m["heldout_psnr"], "heldout_ssim": m["heldout_ssim"], **m.get("truth", {})}
    print(format_table([row], SUMMARY_COLUMNS))
    print(f"{m['n_gaussians']} Gaussians, {m['it_per_s']:.1f} it/s, FDK {m['fdk_s']:.2f} s, device {m['device']} "
          f"({m['backend']} backend); outputs in {cfg.out}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    rows, figure = run_demo(Path(a.out), device=a.device, views=a.views, seed=a.seed, quiet=a.quiet,
                            iterations=a.iterations)
    print(format_table(rows, SUMMARY_COLUMNS))
    print(f"figure: {figure}\nresults: {a.out}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------
def _add_binning_argument(s) -> None:
    s.add_argument("--detector-binning", default="auto",
                   help="merge N x N detector pixels before reconstructing: 'auto' (default: as long as a merged pixel "
                        "stays within a voxel at the isocentre) or 1, 2, ...")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drgs4d", description="Sparse-view 3D/4D vessel reconstruction from rotational "
                                "DSA with 4D radiative Gaussian splatting (4DRGS).")
    p.add_argument("--version", action="version", version=f"drgs4d {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantom", help="write a synthetic DSA phantom case folder with ground truth")
    s.add_argument("out", help="output case folder")
    s.add_argument("--preset", default="demo", choices=["demo", "paper", "paper1024", "hard", "hard-demo"],
                   help="problem size and physics (default demo; hard*: motion, scatter, low dose)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the vessel tree and noise")
    s.add_argument("--static", action="store_true", help="no contrast flow (vessels always filled)")
    s.add_argument("--no-noise", action="store_true", help="noise-free runs (default: Poisson noise)")
    s.add_argument("--frames", type=_positive_int, help="number of frames (default from the preset)")
    s.add_argument("--detector", type=_positive_int,
                   help="detector size in pixels (square; default from the preset)")
    s.add_argument("--volume", type=_positive_int, help="volume size in voxels (cubic; default from the preset)")
    s.add_argument("--dicom", help="also write the mask and fill runs as rotational XA DICOM into this folder")
    s.add_argument("--dicom-style", default="ge", choices=["ge", "siemens", "constant", "enhanced"],
                   help="angle encoding of --dicom (default ge: offsets from the first frame)")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("fdk", help="classical FDK reconstruction from a subset of views")
    s.add_argument("case", help="case folder (fill_run, mask_run, transforms.json)")
    s.add_argument("--views", type=_positive_int, default=30, help="number of evenly spaced views (default 30)")
    s.add_argument("--out", required=True, help="output folder (volume.nii.gz, metrics.json)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--iso-level", type=float, help="iso-level for the evaluation surface (default: robust automatic)")
    s.add_argument("--ignore-secondary-angle", action="store_true",
                   help="treat each frame's SecondaryAngle as 0, as the reference implementation does")
    _add_binning_argument(s)
    s.set_defaults(func=cmd_fdk)

    s = sub.add_parser("evaluate", help="evaluate a result folder against ground truth or a reference mesh")
    s.add_argument("run", help="a result folder of `reconstruct` (volume.nii.gz, mesh.stl)")
    s.add_argument("--truth", help="a phantom truth/ folder")
    s.add_argument("--reference-mesh", help="a scanner reference mesh (e.g. mesh_ref.obj, voxel index units)")
    s.add_argument("--case", help="the case folder the reference mesh belongs to")
    s.add_argument("--no-icp", action="store_true", help="do not ICP-align the reference mesh")
    s.add_argument("--iso-level", type=float, help="iso-level used for Dice (default: the run's)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("reconstruct", help="4DRGS reconstruction of a case")
    s.add_argument("case", nargs="?", help="case folder; or give --fill, --mask and --geometry")
    s.add_argument("--fill", help="fill run (NIfTI/NRRD)")
    s.add_argument("--mask", help="mask run (NIfTI/NRRD)")
    s.add_argument("--geometry", help="geometry JSON in the transforms.json format")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--views", type=int, default=30, help="number of training views (default 30)")
    s.add_argument("--schedule", default="fast", choices=["fast", "full"], help="fast: 10k iterations, full: 30k")
    s.add_argument("--iterations", type=int, help="override the schedule's iteration count")
    s.add_argument("--densify-until", type=int, help="override the end of density control")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["demo", "tiny"],
                   help="small sizes for CPU runs (on the CPU, 'demo' is the default: see the README)")
    s.add_argument("--n-gaussians", type=int, help="initial Gaussians drawn from the FDK (default 30000)")
    s.add_argument("--init-threshold", help="FDK threshold for initialisation: 'auto' or a value in 1/mm")
    s.add_argument("--max-gaussians", type=int, help="cap on the number of Gaussians (default 150000)")
    s.add_argument("--min-speck-voxels", help="mesh and segmentation drop components smaller than this many "
                   "voxels: 'auto' (default), 0 keeps all")
    s.add_argument("--speck-gap-mm", help="small components within this distance (mm) of a larger one are kept as "
                   "pieces of a thin vessel (default 3; 0 drops every small component)")
    s.add_argument("--registration", choices=["auto", "on", "off"],
                   help="rigid mask-to-fill registration before subtraction (default auto: when it helps)")
    s.add_argument("--n-levels", type=int, help="hash-grid levels (default 12)")
    s.add_argument("--log2-table-size", type=int, help="hash table size per level, log2 (default 19)")
    s.add_argument("--static-field", action="store_true", help="ablation: static per-Gaussian attenuation")
    s.add_argument("--static-background", action="store_true",
                   help="add a signed static background volume for subtraction residues (misregistered bone, "
                        "scatter); written to background.nii.gz")
    s.add_argument("--ignore-secondary-angle", action="store_true",
                   help="treat each frame's SecondaryAngle as 0, as the reference implementation does")
    s.add_argument("--iso-level", type=float, help="marching-cubes level (default: robust automatic)")
    s.add_argument("--times-4d", type=int, help="time points in volume_4d.seq.nrrd (default 8)")
    s.add_argument("--cine-frame", type=int, help="frame whose view is used for the fixed-view cine (default 0)")
    s.add_argument("--snapshot-every", type=int, help="write a preview volume and mesh every N iterations")
    s.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations (default 1000)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the contents of an output folder that holds other files or another case's results")
    _add_binning_argument(s)
    s.add_argument("--no-cuda-graph", action="store_true",
                   help="launch every training kernel from Python instead of replaying a CUDA graph (for profiling)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cli_dicom.add_reconstruct_arguments(s)
    s.set_defaults(func=cmd_reconstruct)

    s = sub.add_parser("demo", help="phantom -> FDK -> static field -> 4DRGS -> evaluation table and figure")
    s.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    s.add_argument("--views", type=int, default=30, help="training views (default 30)")
    s.add_argument("--iterations", type=int, help="training iterations (default: the demo preset)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_demo)
    cli_dicom.add_parser(sub)

    from .cli_batch import add_batch_parser, add_serve_parser  # many cases (Ray) and the remote server (FastAPI)
    add_batch_parser(sub), add_serve_parser(sub)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive (pass 1 or more)")
    return value


_USER_OS_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                   getattr(errno, "EDQUOT", errno.ENOSPC)}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except DRGSInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system the user can fix (permissions, full disk, a file where a folder goes)
        if e.errno not in _USER_OS_ERRORS and type(e).__name__ != "WriteVerificationError":
            raise
        print(f"error: {e}. what to do: check the output path's permissions and free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
