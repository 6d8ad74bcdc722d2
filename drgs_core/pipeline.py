"""load -> FDK init -> train -> voxelise -> mesh -> export: what the CLI and the Slicer worker call.

All outputs are in the world frame (DICOM LPS mm) and written atomically into `out`:
volume.nii.gz, mesh.stl, mesh.vtk, segmentation.nii.gz, volume_4d.seq.nrrd, renders.nii.gz, cine.nii.gz,
gaussians.ply, model.pt, config.json, metrics.json, checkpoint.pt.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .ct import fdk
from .errors import DRGSInputError
from .geometry import held_out_indices, view_indices
from .io import (read_case, read_runs, write_labelmap, write_mesh, write_sequence_nrrd, write_stack,
                 write_volume)
from .metrics import mesh_from_volume, psnr_ssim_2d, robust_iso_level, vessel_iso_level
from .model.gaussians import GaussianModel
from .model.serialize import save_json, save_model, write_gaussians_ply
from .preview import write_preview
from .render import active_backend, rasterize, voxelize
from .train import TrainConfig, train

log = logging.getLogger(__name__)

# Problem sizes for machines without a GPU; values the user sets explicitly win. The CPU presets use fewer
# hash-grid levels: on their 64^3 grids, levels finer than the voxels add cost and nothing else.
PRESETS = {
    None: {"iterations": None, "n_gaussians": 30_000, "log2_table_size": 19, "n_levels": 12,
           "max_gaussians": 500_000},
    "demo": {"iterations": 1200, "n_gaussians": 3000, "log2_table_size": 15, "n_levels": 8, "max_gaussians": 8_000},
    "tiny": {"iterations": 150, "n_gaussians": 800, "log2_table_size": 12, "n_levels": 6, "max_gaussians": 2_000},
}


@dataclass
class ReconstructConfig:
    """One reconstruction run. Give either `case` (a case folder) or `fill` + `mask` + `geometry` files."""

    out: str
    case: str | None = None
    fill: str | None = None
    mask: str | None = None
    geometry: str | None = None
    views: int = 30
    schedule: str = "fast"
    iterations: int | None = None
    device: str = "auto"
    seed: int = 0
    preset: str | None = None
    n_gaussians: int | None = None
    init_threshold: str | float = "auto"
    log2_table_size: int | None = None
    n_levels: int | None = None
    max_gaussians: int | None = None
    static_field: bool = False
    iso_level: float | None = None
    times_4d: int = 8
    cine_frame: int = 0
    snapshot_every: int = 0
    checkpoint_every: int = 1000
    progress_every: int = 50
    resume: bool = False
    densify_until: int | None = None
    use_secondary_angle: bool = True   # False: treat SecondaryAngle as 0, as the reference implementation does
    cuda_graph: bool = True            # replay training iterations from a CUDA graph (GPU with the CUDA kernels)
    detector_binning: int | str = "auto"  # merge k x k detector pixels; "auto": down to about the voxel size

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise DRGSInputError("unknown preset", repr(self.preset), "none, 'demo' or 'tiny'")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.case is None and not (self.fill and self.mask and self.geometry):
            raise DRGSInputError("no input given", "neither a case folder nor fill + mask + geometry files",
                                 "a case folder, or all three of fill, mask and geometry",
                                 "pass CASE (a folder with fill_run, mask_run and transforms.json) or "
                                 "--fill/--mask/--geometry")
        if self.schedule not in ("fast", "full"):
            raise DRGSInputError("unknown schedule", repr(self.schedule), "'fast' or 'full'")
        if int(self.views) < 1:
            raise DRGSInputError("views must be at least 1", str(self.views), ">= 1")
        if self.times_4d < 1:
            raise DRGSInputError("times_4d must be at least 1", str(self.times_4d), ">= 1")
        if self.detector_binning != "auto":
            self.detector_binning = binning_factor(self.detector_binning, None)

    @classmethod
    def from_dict(cls, d: dict) -> "ReconstructConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DRGSInputError("unknown configuration keys", ", ".join(unknown),
                                 "keys among " + ", ".join(sorted(names)))
        if "out" not in d:
            raise DRGSInputError("the configuration has no 'out' folder", "", "out: a folder for the results")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def train_config(self) -> TrainConfig:
        return TrainConfig(schedule=self.schedule, iterations=self.iterations, densify_until=self.densify_until,
                           seed=self.seed, checkpoint_every=self.checkpoint_every,
                           snapshot_every=self.snapshot_every, progress_every=self.progress_every,
                           max_gaussians=self.max_gaussians, min_densify_every=int(self.views),
                           cuda_graph=self.cuda_graph)


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


def load_case(cfg: ReconstructConfig):
    if cfg.case is not None:
        case = read_case(cfg.case, use_secondary=cfg.use_secondary_angle)
    else:
        case = read_runs(cfg.fill, cfg.mask, cfg.geometry, use_secondary=cfg.use_secondary_angle)
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


class _Timer:
    """Wall time per stage (seconds, summed), with the GPU synchronised so that stages are not mixed up."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def render_frames(model: GaussianModel, geometry, frames, times, device) -> np.ndarray:
    """DSA [n, H, W] rendered with the camera of each frame index at the matching time."""
    out = []
    for k, t in zip(frames, times):
        cam = geometry.camera(int(k), device=device)
        out.append(rasterize(model.means, model.scales, model.rotations, model.rho(float(t)), cam).image)
    return torch.stack(out).cpu().numpy()


@torch.no_grad()
def mean_volume(model: GaussianModel, times) -> torch.Tensor:
    """Time-averaged vessel volume [nx, ny, nz] (1/mm), METHOD §7."""
    return voxelize(model.means, model.scales, model.rotations, model.mean_rho(times), model.grid)


def run_reconstruction(cfg: ReconstructConfig, on_event: Callable[[dict], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict:
    """Run the whole reconstruction; returns {"status", "outputs": {name: path}, "metrics": {...}}.

    should_stop() is polled between stages and every iteration; a stop before training returns
    status "cancelled" with nothing to resume, a stop during training keeps a checkpoint.
    """
    try:
        return _run(cfg, on_event or (lambda e: None), should_stop or (lambda: False))
    except torch.cuda.OutOfMemoryError as exc:
        raise DRGSInputError("the GPU ran out of memory", str(exc).splitlines()[0][:160],
                             "a problem that fits the card",
                             "lower --max-gaussians or --n-gaussians, close other GPU programs, or use --device cpu"
                             ) from None


def _cancelled_early(emit, stage: str) -> dict:
    emit({"event": "cancelled", "checkpoint": None, "iteration": 0, "stage": stage})
    return {"status": "cancelled", "outputs": {}, "metrics": {}}


def _run(cfg: ReconstructConfig, emit, should_stop) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    timer = _Timer(device)

    emit({"event": "progress", "stage": "load", "iteration": 0, "iterations": 0, "elapsed_s": 0.0})
    with timer("load"):
        case = load_case(cfg)
    n = case.n_frames
    if cfg.views > n:
        raise DRGSInputError("more training views requested than frames", f"views={cfg.views}",
                             f"at most {n} (the number of frames in the run)", f"pass --views {n} or fewer")
    if not 0 <= cfg.cine_frame < n:
        raise DRGSInputError("cine_frame is out of range", str(cfg.cine_frame), f"0..{n - 1}")
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train_config()
    train_idx = view_indices(n, cfg.views)
    held_idx = held_out_indices(n, train_idx)
    save_json(out / "config.json", {"drgs4d_version": __version__, "reconstruct": cfg.to_dict(),
                                    "train": asdict(tcfg), "train_frames": train_idx.tolist()})
    emit({"event": "started", "run_dir": str(out.resolve()), "n_frames": n, "views": int(cfg.views),
          "iterations": tcfg.iterations, "device": str(device), "backend": active_backend(device)})

    if should_stop():
        return _cancelled_early(emit, "load")
    geometry, grid = case.geometry, case.grid
    dsa_train = torch.as_tensor(case.dsa[train_idx], device=device)
    emit({"event": "progress", "stage": "fdk", "iteration": 0, "iterations": tcfg.iterations,
          "elapsed_s": time.perf_counter() - t_start})
    with timer("fdk"):
        fdk_vol = fdk(dsa_train, geometry.subset(train_idx), grid).clamp_min(0)

    if should_stop():
        return _cancelled_early(emit, "fdk")
    cameras = [geometry.camera(int(k), device=device) for k in train_idx]
    checkpoint = out / "checkpoint.pt"
    resuming = cfg.resume and checkpoint.exists()
    with timer("init"):
        torch.manual_seed(cfg.seed)  # the field's tables and MLP are initialised from the global generator
        model = GaussianModel(grid, static=cfg.static_field, log2_table_size=cfg.log2_table_size,
                              n_levels=cfg.n_levels).to(device)
        init_info = model.init_from_volume(fdk_vol, cfg.n_gaussians, threshold=cfg.init_threshold, seed=cfg.seed)
        if not resuming:
            target = calibrate_initial_attenuation(model, dsa_train, cameras)
            init_info["fit_rel_error"] = model.set_initial_attenuation(target, seed=cfg.seed)
    emit({"event": "progress", "stage": "init", "iteration": 0, "iterations": tcfg.iterations,
          "n_gaussians": model.n, "elapsed_s": time.perf_counter() - t_start})

    all_times = case.times

    def snapshot(it: int) -> dict:
        vol = mean_volume(model, all_times).cpu().numpy()
        level = cfg.iso_level if cfg.iso_level is not None else vessel_iso_level(vol)
        return write_preview(out / "snapshots", it, vol, grid, level)

    with timer("train"):
        result = train(model, dsa_train, cameras, all_times[train_idx], tcfg, n_views=int(cfg.views),
                       on_event=emit, should_stop=should_stop, checkpoint_path=checkpoint, resume=cfg.resume,
                       snapshot=snapshot)
    if result["status"] == "cancelled":
        emit({"event": "cancelled", "checkpoint": str(checkpoint), "iteration": result["iteration"]})
        return {"status": "cancelled", "outputs": {"checkpoint": str(checkpoint)}, "metrics": {}}

    outputs = {}
    emit({"event": "progress", "stage": "voxelize", "iteration": tcfg.iterations, "iterations": tcfg.iterations,
          "n_gaussians": model.n, "elapsed_s": time.perf_counter() - t_start})
    with timer("voxelize"), torch.no_grad():
        mean_rho = model.mean_rho(all_times)
        vol_t = voxelize(model.means, model.scales, model.rotations, mean_rho, grid)
        vol = vol_t.cpu().numpy()
    emit({"event": "progress", "stage": "mesh", "iteration": tcfg.iterations, "iterations": tcfg.iterations,
          "n_gaussians": model.n, "elapsed_s": time.perf_counter() - t_start})
    with timer("mesh"):
        level = float(cfg.iso_level) if cfg.iso_level is not None else float(vessel_iso_level(vol))
        if not (level > 0 and vol.max() > level):
            raise RuntimeError(f"the reconstructed volume has nothing above the iso-level {level:g} "
                               f"(max {vol.max():g}); pass --iso-level")
        verts, faces = mesh_from_volume(vol, grid, level)
    emit({"event": "progress", "stage": "write", "iteration": tcfg.iterations, "iterations": tcfg.iterations,
          "n_gaussians": model.n, "elapsed_s": time.perf_counter() - t_start})
    with timer("write"), torch.no_grad():
        # Time-resolved volumes at evenly spaced frame times (4D DSA); renders of every frame at its time;
        # a fixed-view cine over all frame times.  GPU work first, then all files written in parallel
        # (compression and file I/O release the GIL).
        t4 = all_times[np.unique(np.linspace(0, n - 1, min(cfg.times_4d, n)).round().astype(int))]
        vols4 = np.stack([voxelize(model.means, model.scales, model.rotations, rho_t, grid).cpu().numpy()
                          for rho_t in model.rho_at_times(t4)])
        renders = render_frames(model, geometry, range(n), all_times, device)
        cine = render_frames(model, geometry, [cfg.cine_frame] * n, all_times, device)
        spacing = geometry.detector_spacing
        jobs = {
            "volume": (write_volume, out / "volume.nii.gz", vol, grid),
            "mesh_stl": (write_mesh, out / "mesh.stl", verts, faces),
            "mesh_vtk": (write_mesh, out / "mesh.vtk", verts, faces),
            "segmentation": (write_labelmap, out / "segmentation.nii.gz", vol >= level, grid),
            "volume_4d": (write_sequence_nrrd, out / "volume_4d.seq.nrrd", vols4, grid, t4),
            "renders": (write_stack, out / "renders.nii.gz", renders, spacing),
            "cine": (write_stack, out / "cine.nii.gz", cine, spacing),
            "gaussians": (write_gaussians_ply, out / "gaussians.ply", model, mean_rho),
            "model": (save_model, out / "model.pt", model),
        }
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {name: pool.submit(job[0], *job[1:]) for name, job in jobs.items()}
            for name, fut in futures.items():
                fut.result()
                outputs[name] = str(jobs[name][1])
    outputs["config"] = str(out / "config.json")
    outputs["checkpoint"] = str(checkpoint)

    with timer("image_metrics"):
        q_train = psnr_ssim_2d(renders[train_idx], case.dsa[train_idx], device=device)
        q_held = (psnr_ssim_2d(renders[held_idx], case.dsa[held_idx], device=device) if len(held_idx)
                  else {"psnr": None, "ssim": None})
    metrics = {
        "train_psnr": q_train["psnr"], "train_ssim": q_train["ssim"],
        "heldout_psnr": q_held["psnr"], "heldout_ssim": q_held["ssim"],
        "n_gaussians": model.n, "n_gaussians_init": init_info["n_gaussians"],
        "init_threshold": init_info["threshold"], "iso_level": level,
        "iterations": result["iteration"], "it_per_s": result["it_per_s"],
        "fdk_s": timer.times["fdk"], "timings_s": dict(timer.times),
        "end_to_end_s": time.perf_counter() - t_start, "device": str(device), "backend": active_backend(device),
        "views": int(cfg.views), "n_frames": n, "static_field": cfg.static_field,
        "detector_binning": case.meta.get("detector_binning", 1),
        "densify": result["densify"], "loss_history": result["history"],
        "cuda_graph": result["cuda_graph"], "graph_captures": result["graph_captures"],
        "skipped_iterations": result["skipped_iterations"],
    }
    if device.type == "cuda":
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    truth = _truth_dir(cfg)
    if truth is not None:
        from .evaluate import evaluate_against_truth
        t_eval = time.perf_counter()
        metrics["truth"] = evaluate_against_truth(out, truth, level)
        metrics["timings_s"]["truth_evaluation"] = time.perf_counter() - t_eval
    metrics["total_s"] = time.perf_counter() - t_start
    save_json(out / "metrics.json", metrics)
    outputs["metrics"] = str(out / "metrics.json")
    emit({"event": "done", "outputs": outputs, "metrics": _summary(metrics)})
    return {"status": "done", "outputs": outputs, "metrics": metrics}


def run_fdk(case_path, out, views: int = 30, device: str = "auto", iso_level: float | None = None,
            use_secondary_angle: bool = True, detector_binning: int | str = "auto") -> dict:
    """Classical baseline: FDK from `views` evenly spaced frames -> out/volume.nii.gz and out/metrics.json.

    The iso-level (for the evaluation surface of a phantom) defaults to `robust_iso_level`, which separates the
    vessels from FDK's streak haze.  Returns the metrics (with a "truth" section for phantom cases).
    """
    dev = resolve_device(device)
    t0 = time.perf_counter()
    case = read_case(case_path, use_secondary=use_secondary_angle)
    case = case.binned(binning_factor(detector_binning, case))
    idx = view_indices(case.n_frames, views)
    proj = torch.as_tensor(case.dsa[idx], device=dev)
    t1 = time.perf_counter()
    vol = fdk(proj, case.geometry.subset(idx), case.grid).clamp_min(0).cpu().numpy()
    t_fdk = time.perf_counter() - t1
    out = Path(out)
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
