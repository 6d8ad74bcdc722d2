"""load -> FDK init -> train -> voxelise -> mesh -> write: what the CLI and the Slicer worker call.

The stages (drgs_core.stages.STAGES) run behind one context (`RunContext.stage`) that emits their progress
event, times them and checks for a stop request before each.  All outputs are in the world frame (DICOM LPS
mm): volume.nii.gz, mesh.stl, mesh.vtk, segmentation.nii.gz, volume_4d.seq.nrrd, renders.nii.gz, cine.nii.gz,
gaussians.ply, model.pt, config.json, metrics.json are written into a staging folder and moved into `out`
together at the end (drgs_core.io.run_folder); checkpoint.pt and snapshots/ are written in `out` as training
goes.  A failed, cancelled or killed run leaves the previous results of `out` as they were.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .config import PRESETS, ReconstructConfig  # noqa: F401 - re-exported: the public home of both
from .ct import fdk
from .ct.registration import register_case
from .errors import DRGSInputError
from .fingerprint import fingerprint
from .geometry import held_out_indices, view_indices
from .io import (check_views, read_case, read_runs, write_labelmap, write_mesh, write_sequence_nrrd, write_stack,
                 write_volume)
from .io.atomic import BackgroundWrites, WriteVerificationError, check_free_space
from .io.run_folder import RunFolder, check_out_folder
from .stages import STAGES
from .metrics import mesh_from_volume, psnr_ssim_2d, robust_iso_level, vessel_iso_level
from .model.gaussians import GaussianModel
from .specks import drop_specks, haze_aware_segmentation
from .model.serialize import save_json, save_model, write_gaussians_ply
from .preview import write_preview
from .render import active_backend, rasterize, voxelize
from .train import train

log = logging.getLogger(__name__)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DRGSInputError("CUDA was requested but is not available", f"device={name!r}",
                                 "a CUDA build of PyTorch and an NVIDIA GPU", "use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DRGSInputError("no such GPU", name, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise DRGSInputError("unknown device", repr(name), "auto, cpu, cuda or cuda:N")


def load_case(cfg: ReconstructConfig, device="cpu"):
    """The case of `cfg`, registered (mask onto fill, computed on `device`) and binned."""
    if cfg.dicom is not None:
        from .io.dicom import import_dicom

        case = import_dicom(cfg.dicom, fill=cfg.fill_uid, mask=cfg.mask_uid,
                            use_secondary=cfg.use_secondary_angle).case
    elif cfg.case is not None:
        case = read_case(cfg.case, use_secondary=cfg.use_secondary_angle)
    else:
        case = read_runs(cfg.fill, cfg.mask, cfg.geometry, use_secondary=cfg.use_secondary_angle)
    case, _ = register_case(case, cfg.registration, device=device)
    return case.binned(binning_factor(cfg.detector_binning, case))


def binning_factor(setting, case) -> int:
    """The detector binning to use: an explicit factor, or "auto" (`ConeBeamGeometry.auto_binning`).

    A detector sampled much finer than the volume's voxels only adds noise: sparse-view FDK gets noisier, and
    the density-control gradients, averaged over more and noisier pixels, fall below the clone / split
    threshold (on the demo phantom a 192^2 instead of a 96^2 detector took CD from 2.7 to 4.9 mm)."""
    if setting == "auto":
        return case.geometry.auto_binning(case.grid.min_spacing)
    try:
        factor = int(setting)
    except (TypeError, ValueError):
        factor = 0
    if factor < 1:
        raise DRGSInputError("detector_binning must be 'auto' or a positive integer", repr(setting),
                             "'auto', 1 (no binning), 2, 3, ...")
    return factor


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibrate_initial_attenuation(model: GaussianModel, dsa: torch.Tensor, cameras: list, max_views: int = 8
                                  ) -> torch.Tensor:
    """Initial per-Gaussian attenuation: the FDK values at the centres times one factor k.

    Overlapping Gaussians add up and sparse-view FDK carries streaks, so rho_i = FDK(mu_i) renders far too
    bright. Rendering is linear in rho, so the least-squares k between renderings of the FDK values and the
    measured DSA of (up to `max_views`) training views is exact. dsa: [n, H, W]; cameras: n Cameras.
    """
    f = model.rho_raw.detach().clamp_min(0)
    pick = np.linspace(0, len(cameras) - 1, min(max_views, len(cameras))).round().astype(int)
    num = den = 0.0
    for k in pick:
        img = rasterize(model.means, model.scales, model.rotations, f, cameras[k]).image
        num += float((img * dsa[k]).sum())
        den += float((img * img).sum())
    return f * (num / max(den, 1e-20))


class _Stopped(Exception):
    """A stop request seen at a stage boundary."""


class RunContext:
    """What every stage shares: the event sink, the stop flag, stage timing and the progress counters.

    `with ctx.stage(name):` checks for a stop (raising _Stopped), emits the stage's progress event and adds the
    stage's wall time (GPU synchronised, so that stages are not mixed up) to `times` (seconds).
    """

    def __init__(self, emit, should_stop, device):
        self.emit, self.should_stop, self.device = emit, should_stop, device
        self.t_start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.current: str | None = None
        self.iterations = 0
        self.iteration = 0
        self.n_gaussians: int | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    @contextmanager
    def stage(self, name: str, announce: bool = True, report: bool = True):
        """announce: a stage of STAGES (stop check, current stage); report: emit its progress event (train()
        reports its own)."""
        if announce:
            assert name in STAGES, name
            if self.current is not None and self.should_stop():
                raise _Stopped(self.current)
            self.current = name
        if announce and report:
            event = {"event": "progress", "stage": name, "iteration": self.iteration, "iterations": self.iterations,
                     "elapsed_s": self.elapsed()}
            if self.n_gaussians is not None:
                event["n_gaussians"] = self.n_gaussians
            self.emit(event)
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def render_frames(model: GaussianModel, geometry, frames, times, device, background=None) -> np.ndarray:
    """DSA [n, H, W] rendered with the camera of each frame index at the matching time (plus the static
    background's projection when one is given)."""
    out = []
    for k, t in zip(frames, times):
        cam = geometry.camera(int(k), device=device)
        img = rasterize(model.means, model.scales, model.rotations, model.rho(float(t)), cam).image
        out.append(img if background is None else img + background.render(cam.pack(device).params))
    return torch.stack(out).cpu().numpy()


@torch.no_grad()
def mean_volume(model: GaussianModel, times) -> torch.Tensor:
    """Time-averaged vessel volume [nx, ny, nz] (1/mm), METHOD §7."""
    return voxelize(model.means, model.scales, model.rotations, model.mean_rho(times), model.grid)


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def run_reconstruction(cfg: ReconstructConfig, on_event: Callable[[dict], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict:
    """Run the whole reconstruction; returns {"status", "outputs": {name: path}, "metrics": {...}}.

    should_stop() is polled before each stage and every iteration; a stop before training returns status
    "cancelled" with nothing to resume, a stop during or after training keeps a checkpoint (a stop during the
    write stage lets the files being written finish).  Problems a user can fix (bad inputs, a full disk, too
    little memory, a busy or foreign output folder) raise DRGSInputError before or instead of a partial result.
    """
    try:
        return _run(cfg, on_event or (lambda e: None), should_stop or (lambda: False))
    except torch.cuda.OutOfMemoryError as exc:
        raise DRGSInputError("the GPU ran out of memory", str(exc).splitlines()[0][:160],
                             "a problem that fits the card",
                             "lower --max-gaussians or --n-gaussians, close other GPU programs, or use --device cpu"
                             ) from None
    except OSError as exc:
        if isinstance(exc, WriteVerificationError) or exc.errno in _DISK_FULL:
            raise DRGSInputError("an output file could not be written completely (the disk is full?)",
                                 f"{exc}", f"free space in {cfg.out}",
                                 "free some disk space or choose an --out on another disk; the previous results "
                                 "in the folder are unchanged") from None
        raise


def _cancelled(ctx: RunContext, stage: str, checkpoint: Path | None) -> dict:
    event = {"event": "cancelled", "checkpoint": str(checkpoint) if checkpoint else None,
             "iteration": ctx.iteration, "stage": stage}
    ctx.emit(event)
    return {"status": "cancelled", "outputs": {"checkpoint": str(checkpoint)} if checkpoint else {}, "metrics": {}}


def _identity(cfg: ReconstructConfig) -> dict:
    """Which inputs a result folder belongs to (a re-run on the same inputs may replace its results)."""
    paths = {k: getattr(cfg, k) for k in ("case", "dicom", "fill", "mask", "geometry") if getattr(cfg, k)}
    identity = {k: str(Path(v).expanduser().resolve()) for k, v in paths.items()}
    identity.update({k: getattr(cfg, k) for k in ("fill_uid", "mask_uid") if getattr(cfg, k)})  # a pair, not a path
    return identity


def _cpu_sized(cfg: ReconstructConfig, device) -> tuple[ReconstructConfig, str | None]:
    """On the CPU without a preset, the `demo` sizes (explicit values still win): the GPU sizes take hours."""
    if device.type != "cpu" or cfg.preset is not None:
        return cfg, None
    note = ("running on the CPU: using the 'demo' problem sizes (--preset demo; options you set explicitly still "
            "apply). The GPU-sized default (10k iterations, 30k Gaussians) would take hours on a CPU")
    log.warning(note)
    return cfg.with_preset("demo"), note


def _run(cfg: ReconstructConfig, emit, should_stop) -> dict:
    device = resolve_device(cfg.device)
    cfg, note = _cpu_sized(cfg, device)
    ctx = RunContext(emit, should_stop, device)
    out = check_out_folder(cfg.out, [cfg.fill, cfg.mask, cfg.geometry], cfg.case)
    with RunFolder(out, _identity(cfg), overwrite=cfg.overwrite, resume=cfg.resume) as folder:
        try:
            return _stages(cfg, ctx, folder, note)
        except _Stopped as stop:
            done_training = stop.args[0] not in ("load", "fdk", "init")
            return _cancelled(ctx, stop.args[0], out / "checkpoint.pt" if done_training else None)


def _stages(cfg: ReconstructConfig, ctx: RunContext, folder: RunFolder, note: str | None) -> dict:
    out, stage_dir, device = folder.out, folder.staging, ctx.device
    warm = _import_in_background("torch._dynamo")
    with ctx.stage("load"):
        case = load_case(cfg, device)
        n = case.n_frames
        _check_sizes(cfg, case)
    tcfg = cfg.train_config()
    ctx.iterations = tcfg.iterations
    train_idx = view_indices(n, cfg.views)
    held_idx = held_out_indices(n, train_idx)
    save_json(stage_dir / "config.json", {"drgs4d_version": __version__, "reconstruct": cfg.to_dict(),
                                          "train": asdict(tcfg), "train_frames": train_idx.tolist(),
                                          "identity": folder.identity})
    started = {"event": "started", "run_dir": str(out), "n_frames": n, "views": int(cfg.views),
               "iterations": tcfg.iterations, "device": str(device), "backend": active_backend(device),
               "preset": cfg.preset}
    if note:
        started["note"] = note
    ctx.emit(started)
    check_free_space(out, _output_bytes(cfg, case), "the results")

    dsa_train = torch.as_tensor(case.dsa[train_idx], device=device)
    with ctx.stage("fdk"):
        fdk_vol = fdk(dsa_train, case.geometry.subset(train_idx), case.grid).clamp_min(0)

    with ctx.stage("init"), _one_cpu_thread(device):
        warm.join()
        model, init_info, cameras = _init_model(cfg, case, fdk_vol, dsa_train, train_idx, out / "checkpoint.pt",
                                                device)
        ctx.n_gaussians = model.n
    del fdk_vol

    with ctx.stage("train", report=False):
        result = train(model, dsa_train, cameras, case.times[train_idx], tcfg, n_views=int(cfg.views),
                       on_event=ctx.emit, should_stop=ctx.should_stop, checkpoint_path=out / "checkpoint.pt",
                       resume=cfg.resume, snapshot=_snapshotter(cfg, model, case, out),
                       vessel_voxels=init_info["candidates"], fingerprint=fingerprint(case, cfg))
    ctx.iteration, ctx.n_gaussians = result["iteration"], model.n
    if result["status"] == "cancelled":
        return _cancelled(ctx, "train", out / "checkpoint.pt")

    # The result files are written on background threads from the moment their data exists, overlapping the
    # mesh, the renders and the image metrics; all are joined (and a failed write raised) before metrics.json
    # and the commit.
    check_free_space(out, _output_bytes(cfg, case), "the results")
    with BackgroundWrites() as writes:
        with ctx.stage("voxelize"), torch.no_grad():
            mean_rho = model.mean_rho(case.times)
            vol = voxelize(model.means, model.scales, model.rotations, mean_rho, case.grid).cpu().numpy()
        writes.submit(write_volume, stage_dir / OUTPUT_FILES["volume"], vol, case.grid)
        with ctx.stage("mesh"):
            level = _iso_level(cfg, vol)
            if cfg.iso_level is None:
                level, vol_clean, seg, speck_info = haze_aware_segmentation(vol, level, cfg.min_speck_voxels,
                                                                            case.grid.spacing, cfg.speck_gap_mm)
            else:
                vol_clean, seg, speck_info = drop_specks(vol, level, cfg.min_speck_voxels, case.grid.spacing,
                                                            cfg.speck_gap_mm)
            verts, faces = mesh_from_volume(vol_clean, case.grid, level)
        with ctx.stage("write"):
            renders = _write_outputs(cfg, case, model, mean_rho, seg, verts, faces, stage_dir, device, writes,
                                     result["background"])
        with ctx.stage("image_metrics", announce=False):
            q_train = psnr_ssim_2d(renders[train_idx], case.dsa[train_idx], device=device)
            q_held = (psnr_ssim_2d(renders[held_idx], case.dsa[held_idx], device=device) if len(held_idx)
                      else {"psnr": None, "ssim": None})
        with ctx.stage("write", announce=False):  # what the writes took beyond the image metrics
            writes.wait()
    metrics = {
        "train_psnr": q_train["psnr"], "train_ssim": q_train["ssim"],
        "heldout_psnr": q_held["psnr"], "heldout_ssim": q_held["ssim"],
        "n_gaussians": model.n, "n_gaussians_init": init_info["n_gaussians"],
        "init_threshold": init_info["threshold"], "init_fit_rel_error": init_info.get("fit_rel_error"),
        "iso_level": level,
        "iterations": result["iteration"], "it_per_s": result["it_per_s"],
        "fdk_s": ctx.times["fdk"], "timings_s": dict(ctx.times),
        "end_to_end_s": ctx.elapsed(), "device": str(device), "backend": active_backend(device),
        "views": int(cfg.views), "n_frames": n, "static_field": cfg.static_field, "preset": cfg.preset,
        "detector_binning": case.meta.get("detector_binning", 1),
        "registration": case.meta.get("registration"), "specks": speck_info,
        "densify": result["densify"], "density": result["density"], "loss_history": result["history"],
        "cuda_graph": result["cuda_graph"], "graph_captures": result["graph_captures"],
        "skipped_iterations": result["skipped_iterations"],
        "static_background": cfg.static_background,
    }
    if result["background"] is not None:
        metrics["background"] = result["background"].summary()  # B's range (1/mm) and grid
    if device.type == "cuda":
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    truth = _truth_dir(cfg)
    if truth is not None:
        from .evaluate import evaluate_against_truth
        t_eval = time.perf_counter()
        metrics["truth"] = evaluate_against_truth(stage_dir, truth, level)
        metrics["timings_s"]["truth_evaluation"] = time.perf_counter() - t_eval
    metrics["total_s"] = ctx.elapsed()
    save_json(stage_dir / "metrics.json", metrics)
    names = sorted(p.name for p in stage_dir.iterdir())
    folder.commit(names)
    outputs = {key: str(out / name) for key, name in OUTPUT_FILES.items()}
    if result["background"] is not None:
        outputs["background"] = str(out / BACKGROUND_FILE)
    outputs["checkpoint"] = str(out / "checkpoint.pt")
    ctx.emit({"event": "done", "outputs": outputs, "metrics": _summary(metrics)})
    return {"status": "done", "outputs": outputs, "metrics": metrics}


#: output key -> file name in the run folder
OUTPUT_FILES = {"volume": "volume.nii.gz", "mesh_stl": "mesh.stl", "mesh_vtk": "mesh.vtk",
                "segmentation": "segmentation.nii.gz", "volume_4d": "volume_4d.seq.nrrd",
                "renders": "renders.nii.gz", "cine": "cine.nii.gz", "gaussians": "gaussians.ply",
                "model": "model.pt", "config": "config.json", "metrics": "metrics.json"}
#: the static background B (only with static_background): its own coarse grid over the same box
BACKGROUND_FILE = "background.nii.gz"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_sizes(cfg: ReconstructConfig, case) -> None:
    """Refuse impossible views / cine frame and volumes that cannot fit in this machine's memory, before
    allocating them."""
    n_frames = case.n_frames
    check_views(case, cfg.views)
    if not cfg.cine_frame < n_frames:
        raise DRGSInputError("cine_frame is out of range", str(cfg.cine_frame), f"0..{n_frames - 1}",
                             f"pass --cine-frame between 0 and {n_frames - 1}")
    voxels = int(np.prod(np.asarray(case.grid.resolution, dtype=np.float64)))
    # float32 copies alive at once: FDK volume, mean volume, the 4D volumes and the marching-cubes input
    need = 4 * voxels * (min(cfg.times_4d, n_frames) + 4)
    total = _memory_bytes()
    if total is not None and need > total:
        raise DRGSInputError("the reconstruction volume does not fit in this machine's memory",
                             f"volume_resolution {list(case.grid.resolution)} needs about {need / 2**30:.3g} GiB, "
                             f"the machine has {total / 2**30:.3g} GiB",
                             "a volume grid of a few hundred voxels per axis",
                             "check volume_resolution in transforms.json (or use fewer --times-4d)")


def _output_bytes(cfg: ReconstructConfig, case) -> int:
    """A generous estimate of the result files' size (compressed files counted at half their raw size)."""
    voxels = int(np.prod(case.grid.resolution))
    pixels = int(np.prod(case.dsa.shape))
    raw = 4 * voxels * min(cfg.times_4d, case.n_frames)  # the 4D NRRD, counted raw (gzip makes it far smaller)
    compressed = 4 * voxels + voxels + 2 * 4 * pixels
    model = 64 * int(cfg.max_gaussians) + 8 * int(cfg.n_levels) * 2 ** int(cfg.log2_table_size)
    return raw + compressed // 2 + 2 * model


def _import_in_background(name: str) -> threading.Thread:
    """Import module `name` on a side thread; join() it before the first use.  torch.optim's first optimizer
    imports torch._dynamo (sympy, torch.fx, ...: 2-4 s), which is done here while the case loads and the FDK
    runs.  A failure is left to the main thread's own import, which then reports it."""
    def run():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - re-raised by the main thread's import
            pass
    thread = threading.Thread(target=run, name=f"import {name}", daemon=True)
    thread.start()
    return thread


@contextmanager
def _one_cpu_thread(device):
    """On the CPU, run the block on one thread.  The init stage's tensors are small (thousands of Gaussians):
    OpenMP's fan-out costs more than it gains, and on a busy machine its waiting threads made the demo's init
    take 29 s instead of 2.9 s on one thread (2 cores shared with other work, 2026-12-02)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _init_model(cfg, case, fdk_vol, dsa_train, train_idx, checkpoint: Path, device):
    cameras = [case.geometry.camera(int(k), device=device) for k in train_idx]
    resuming = cfg.resume and checkpoint.exists()
    torch.manual_seed(cfg.seed)  # the field's tables and MLP are initialised from the global generator
    model = GaussianModel(case.grid, static=cfg.static_field, log2_table_size=cfg.log2_table_size,
                          n_levels=cfg.n_levels).to(device)
    init_info = model.init_from_volume(fdk_vol, cfg.n_gaussians, threshold=cfg.init_threshold, seed=cfg.seed)
    if not resuming:
        target = calibrate_initial_attenuation(model, dsa_train, cameras)
        init_info["fit_rel_error"] = model.set_initial_attenuation(target, seed=cfg.seed)
    return model, init_info, cameras


def _snapshotter(cfg, model, case, out: Path):
    """snapshot(it) for train(): a small preview volume and mesh in out/snapshots (drgs_core.preview).

    The files of the latest two snapshots are kept, so the files an event names exist at least until the next
    snapshot event."""

    def snapshot(it: int) -> dict:
        vol = mean_volume(model, case.times).cpu().numpy()
        level = cfg.iso_level if cfg.iso_level is not None else vessel_iso_level(vol)
        return write_preview(out / "snapshots", it, vol, case.grid, level)

    return snapshot


def _iso_level(cfg: ReconstructConfig, vol: np.ndarray) -> float:
    level = float(cfg.iso_level) if cfg.iso_level is not None else float(vessel_iso_level(vol))
    if level > 0 and vol.max() > level:
        return level
    if cfg.iso_level is not None:
        raise DRGSInputError("the iso-level is above every value of the reconstructed volume",
                             f"--iso-level {cfg.iso_level:g}, volume maximum {vol.max():g} (1/mm)",
                             f"a level between 0 and {vol.max():g}",
                             "pass a lower --iso-level, or leave it out for the automatic level "
                             "(the trained model is kept: rerun with --resume)")
    raise DRGSInputError("the reconstructed volume is empty", f"maximum {vol.max():g} (1/mm), automatic "
                         f"iso-level {level:g}", "vessels brighter than the background",
                         "check the inputs (fill/mask order, angles), or pass --iso-level explicitly "
                         "(the trained model is kept: rerun with --resume)")


def _write_outputs(cfg, case, model, mean_rho, seg, verts, faces, folder: Path, device,
                   writes: BackgroundWrites, background=None) -> np.ndarray:
    """Start writing every result file but the volume into `folder` on `writes`; returns the renders of all
    frames [n, H, W] (for the image metrics).  With a static background B: background.nii.gz, and the frame
    renders include B's projection (they model the measured DSA); volumes, mesh and cine are the Gaussians'.

    Time-resolved volumes at evenly spaced frame times (4D DSA, laid out time-fastest on the device so that the
    NRRD is written without a transposing copy); renders of every frame at its time; a fixed-view cine over all
    frame times."""
    n, grid, geometry, all_times = case.n_frames, case.grid, case.geometry, case.times
    f = {k: folder / name for k, name in OUTPUT_FILES.items()}
    writes.submit(write_labelmap, f["segmentation"], seg, grid)
    writes.submit(write_mesh, f["mesh_stl"], verts, faces)
    writes.submit(write_mesh, f["mesh_vtk"], verts, faces)
    writes.submit(write_gaussians_ply, f["gaussians"], model, mean_rho)
    writes.submit(save_model, f["model"], model)
    if background is not None:
        writes.submit(write_volume, folder / BACKGROUND_FILE, background.values.detach().cpu().numpy(),
                      background.grid)
    with torch.no_grad():
        t4 = all_times[np.unique(np.linspace(0, n - 1, min(cfg.times_4d, n)).round().astype(int))]
        vols4 = torch.empty((*reversed(grid.resolution), len(t4)), device=device)  # [nz, ny, nx, T]
        for k, rho_t in enumerate(model.rho_at_times(t4)):
            vols4[..., k] = voxelize(model.means, model.scales, model.rotations, rho_t, grid).permute(2, 1, 0)
        vols4 = vols4.cpu().numpy().transpose(3, 2, 1, 0)  # [T, nx, ny, nz], Fortran-contiguous
        writes.submit(write_sequence_nrrd, f["volume_4d"], vols4, grid, t4)
        spacing = geometry.detector_spacing
        renders = render_frames(model, geometry, range(n), all_times, device, background)
        writes.submit(write_stack, f["renders"], renders, spacing)
        writes.submit(write_stack, f["cine"], render_frames(model, geometry, [cfg.cine_frame] * n, all_times,
                                                            device), spacing)
    return renders


def run_fdk(case_path, out, views: int = 30, device: str = "auto", iso_level: float | None = None,
            use_secondary_angle: bool = True, detector_binning: int | str = "auto") -> dict:
    """Classical baseline: FDK from `views` evenly spaced frames -> out/volume.nii.gz and out/metrics.json.

    The iso-level (for the evaluation surface of a phantom) defaults to `robust_iso_level`, which separates the
    vessels from FDK's streak haze.  Returns the metrics (with a "truth" section for phantom cases).
    """
    from .config import check_value

    views = check_value("views", views, option_names=True)
    iso_level = check_value("iso_level", iso_level, option_names=True)
    out = check_out_folder(out, [], case_path)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    case = read_case(case_path, use_secondary=use_secondary_angle)
    case = case.binned(binning_factor(detector_binning, case))
    idx = view_indices(case.n_frames, views)
    proj = torch.as_tensor(case.dsa[idx], device=dev)
    t1 = time.perf_counter()
    vol = fdk(proj, case.geometry.subset(idx), case.grid).clamp_min(0).cpu().numpy()
    t_fdk = time.perf_counter() - t1
    out.mkdir(parents=True, exist_ok=True)
    write_volume(out / "volume.nii.gz", vol, case.grid)
    level = float(iso_level) if iso_level is not None else float(robust_iso_level(vol))
    metrics = {"method": "FDK", "views": int(views), "fdk_s": t_fdk, "total_s": time.perf_counter() - t0,
               "iso_level": level, "device": str(dev), "detector_binning": case.meta.get("detector_binning", 1)}
    truth = Path(case_path) / "truth"
    if (truth / "volume.nii.gz").exists():
        from .evaluate import evaluate_volume

        metrics["truth"] = evaluate_volume(vol, case.grid, level, truth)
    save_json(out / "metrics.json", metrics)
    return metrics


def _truth_dir(cfg: ReconstructConfig) -> Path | None:
    """A phantom case folder carries its ground truth in truth/; real cases do not."""
    if cfg.case is None:
        return None
    t = Path(cfg.case) / "truth"
    return t if (t / "volume.nii.gz").exists() else None


def _summary(m: dict) -> dict:
    keys = ("train_psnr", "train_ssim", "heldout_psnr", "heldout_ssim", "n_gaussians", "it_per_s", "fdk_s", "total_s",
            "iso_level")
    s = {k: m[k] for k in keys}
    if "truth" in m:
        s["truth"] = m["truth"]
    return s
