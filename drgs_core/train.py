"""The 4DRGS optimisation loop (METHOD §6), emitting structured progress events.

One iteration: a random training frame (shuffled without replacement per epoch), a temporally perturbed
time t' = clip(t_k + N(0, sigma_t^2), 0, 1), a rendering, loss 0.8 L1 + 0.2 (1 - SSIM), Adam with
exponentially decaying learning rates, then density-control statistics; after it the density strategy
(`model.strategy.DensityStrategy`) may grow / prune / decay.  The iteration itself is `train_step.StepRunner`
(a CUDA graph on the GPU), which accumulates the strategy's statistics inside the captured step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import fingerprint as fingerprints
from .errors import DRGSInputError
from .io.atomic import atomic_path
from .model.density import measure_noise
from .model.background import StaticBackground
from .model.gaussians import GaussianModel
from .model.strategy import DensityConfig, DensityStrategy
from .train_step import StepRunner

log = logging.getLogger(__name__)

SCHEDULES = {"fast": (10_000, 5_000), "full": (30_000, 15_000)}


@dataclass
class TrainConfig:
    """Training schedule and hyper-parameters (defaults: METHOD §6, `fast` schedule)."""

    schedule: str = "fast"
    iterations: int | None = None          # None: from the schedule
    densify_from: int = 500
    densify_until: int | None = None       # None: from the schedule (scaled if iterations is overridden)
    densify_every: int = 200
    grad_threshold: float = 3e-5
    min_rho: float = 1e-6
    clone_voxels_start: float = 2.5        # p decays linearly from this to the end value (voxels)
    clone_voxels_end: float = 0.5
    max_gaussians: int = 150_000
    min_densify_every: int = 1             # e.g. the number of views: statistics over at least one epoch
    decay_every: int | None = None         # None: 3000 iterations, scaled with an overridden iteration count
    density: dict = field(default_factory=dict)   # further DensityConfig settings (docs/METHOD.md §10)
    temporal_sigma: float | None = None    # None: 1 / n_views
    ssim_weight: float = 0.2
    lr_position: tuple[float, float] = (1e-4, 1e-5)   # times max(volume_phy)
    lr_scale: tuple[float, float] = (5e-3, 5e-4)
    lr_rotation: tuple[float, float] = (1e-3, 1e-4)
    lr_field: tuple[float, float] = (1e-3, 1e-4)
    field_weight_decay: float = 5e-5
    lr_static_rho: tuple[float, float] = (1e-3, 1e-4)
    # Static signed background B (model/background.py, METHOD §10.8): off by default (an ablation until measured).
    static_background: bool = False
    # L1 weight on B (StaticBackground.penalty: mean |B| in B's unit, i.e. in the loss's image units): explaining
    # a blob-shaped residue costs B about 0.8 x this weight of what it gains in the L1 data term, so B takes
    # residues only where that gain is clear; the Gaussians pay nothing, and keep what both could explain.
    background_l1: float = 0.5
    # Adam moves each of B's voxels by about the learning rate per step, in B's unit (the attenuation whose chord
    # through the box gives the image's full scale).  B starts at zero while the Gaussians start from the FDK, so
    # it needs about 10x the field's rate (1e-3 -> 1e-4) to build a residue of the image's scale within the
    # first few hundred iterations, while the Gaussians are still settling.
    lr_background: tuple[float, float] = (1e-2, 1e-3)
    background_factor: int = 4   # B's voxels are this many times the grid's spacing (at most 64 per axis)
    seed: int = 0
    progress_every: int = 50
    checkpoint_every: int = 1000
    snapshot_every: int = 0
    cuda_graph: bool = True                # replay each iteration from a CUDA graph when the CUDA kernels run

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise DRGSInputError("unknown schedule", repr(self.schedule), f"one of {sorted(SCHEDULES)}")
        total, until = SCHEDULES[self.schedule]
        if self.iterations is None:
            self.iterations = total
        elif self.densify_until is None:
            # Keep the schedule's proportions for an overridden iteration count.
            until = int(round(self.iterations * until / total))
            self.densify_from = max(1, int(round(self.densify_from * self.iterations / total)))
            self.densify_every = max(1, int(round(self.densify_every * self.iterations / total)))
        if self.densify_until is None:
            self.densify_until = until
        if self.decay_every is None:
            self.decay_every = max(1, int(round(3000 * int(self.iterations) / total)))
        self.densify_every = max(self.densify_every, self.min_densify_every)
        if int(self.iterations) < 1:
            raise DRGSInputError("iterations must be positive", str(self.iterations), ">= 1")
        self.lr_position = tuple(self.lr_position)
        self.lr_scale = tuple(self.lr_scale)
        self.lr_rotation = tuple(self.lr_rotation)
        self.lr_field = tuple(self.lr_field)
        self.lr_static_rho = tuple(self.lr_static_rho)
        self.lr_background = tuple(self.lr_background)

    def density_config(self) -> DensityConfig:
        return DensityConfig(start=self.densify_from, stop=self.densify_until, every=self.densify_every,
                             grad_threshold=self.grad_threshold, clone_voxels_start=self.clone_voxels_start,
                             clone_voxels_end=self.clone_voxels_end, max_gaussians=self.max_gaussians,
                             min_rho=self.min_rho, decay_every=self.decay_every, **self.density)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DRGSInputError("unknown training options", ", ".join(sorted(unknown)), ", ".join(sorted(names)))
        return cls(**d)


def exp_lr(init_final: tuple[float, float], step: int, total: int) -> float:
    a, b = init_final
    f = min(max(step / max(total, 1), 0.0), 1.0)
    return math.exp((1 - f) * math.log(a) + f * math.log(b))


def make_optimizer(model: GaussianModel, cfg: TrainConfig, capturable: bool = False,
                   background: StaticBackground | None = None) -> torch.optim.Adam:
    groups = [
        {"params": [model.means], "name": "means"},
        {"params": [model.scales_raw], "name": "scales_raw"},
        {"params": [model.rotations], "name": "rotations"},
        {"params": [model.rho_raw], "name": "rho_raw"},
    ]
    if model.field is not None:
        groups.append({"params": list(model.field.parameters()), "name": "field",
                       "weight_decay": cfg.field_weight_decay})
    if background is not None:  # learning rates in B's unit (1/mm): see TrainConfig.lr_background
        groups.append({"params": [background.values], "name": "background", "unit": background.unit})
    # The fused CUDA step is ~2x faster over the hash tables' millions of parameters; `capturable` keeps its
    # step counts and learning rates on the device so that a CUDA graph can replay it.
    cuda = model.means.is_cuda
    opt = torch.optim.Adam(groups, lr=0.0, eps=1e-15, fused=cuda, capturable=cuda and capturable)
    set_learning_rates(opt, model, cfg, 0)
    return opt


def set_learning_rates(opt, model: GaussianModel, cfg: TrainConfig, step: int) -> None:
    extent = float(max(model.grid.physical_size))
    n = cfg.iterations
    rates = {
        "means": exp_lr(cfg.lr_position, step, n) * extent,
        "scales_raw": exp_lr(cfg.lr_scale, step, n),
        "rotations": exp_lr(cfg.lr_rotation, step, n),
        "rho_raw": exp_lr(cfg.lr_static_rho, step, n) if model.static else 0.0,
        "field": exp_lr(cfg.lr_field, step, n),
        "background": exp_lr(cfg.lr_background, step, n),
    }
    for g in opt.param_groups:
        rate = rates[g["name"]] * g.get("unit", 1.0)
        if not g.get("capturable"):
            g["lr"] = rate
        elif torch.is_tensor(g["lr"]) and g["lr"].device == model.means.device:
            g["lr"].fill_(rate)   # in place: a captured graph reads this tensor
        else:
            g["lr"] = torch.tensor(float(rate), device=model.means.device)


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    iteration: int = 0
    order: list = field(default_factory=list)   # remaining frames of the current epoch
    rng: dict | None = None                     # numpy bit generator state
    torch_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    history: list = field(default_factory=list)  # (iteration, loss, n_gaussians)
    rates: list = field(default_factory=list)    # iterations/s over each progress window


def save_checkpoint(path: Path, model: GaussianModel, opt, stats: DensityStrategy, state: TrainState,
                    cfg: TrainConfig, n_train: int, fingerprint: dict | None = None,
                    background: StaticBackground | None = None) -> None:
    payload = {
        "fingerprint": fingerprint,  # drgs_core.fingerprint: which case and settings this belongs to
        "n_train": n_train,
        "model": model.state_dict(),
        "static": model.static,
        "optimizer": opt.state_dict(),
        "stats": stats.state_dict(),
        "state": asdict(state),
        "train_config": asdict(cfg),
        "background": None if background is None else background.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, model: GaussianModel, cfg: TrainConfig, device,
                    capturable: bool = False, fingerprint: dict | None = None,
                    background: StaticBackground | None = None) -> tuple:
    payload = fingerprints.load_payload(path, device)
    # the fingerprint holds the case and every model setting (views, schedule, iterations, seed, ...)
    fingerprints.check(payload.get("fingerprint"), fingerprint, path)
    model.resize_like(payload["model"])
    model.load_state_dict(payload["model"])
    if background is not None:  # the fingerprint holds static_background: a checkpoint with it on has B
        background.load_state_dict(payload["background"])
    opt = make_optimizer(model, cfg, capturable, background)
    modes = [(g["fused"], g["capturable"]) for g in opt.param_groups]
    opt.load_state_dict(payload["optimizer"])
    for g, (fused, capt) in zip(opt.param_groups, modes):  # this run's mode, not the one that saved it
        g["fused"], g["capturable"] = fused, capt
    set_learning_rates(opt, model, cfg, 0)
    stats = payload["stats"]   # the density strategy's state_dict
    state = TrainState(**payload["state"])
    return opt, stats, state


def train(model: GaussianModel, dsa: torch.Tensor, cameras: list, times: np.ndarray, cfg: TrainConfig, *,
          n_views: int, on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          checkpoint_path: Path | None = None, resume: bool = False,
          snapshot: Callable[[int], dict] | None = None, vessel_voxels: int | None = None,
          fingerprint: dict | None = None) -> dict:
    """Optimise `model` on the training frames.

    dsa: [n, H, W] measured DSA of the training frames on the model's device; cameras: n Camera objects;
    times: [n] normalised times of those frames; vessel_voxels: FDK voxels above the initialisation threshold
    (sets the density budget).  Returns {"status": "done"|"cancelled", "iteration", "it_per_s", "history",
    "densify" (the density strategy's per-round log), "density" (its settings, noise level and budget)}.
    fingerprint: stored in checkpoints and checked on resume (drgs_core.fingerprint).
    With cfg.static_background the result also holds "background": the trained `StaticBackground`.
    """
    emit = on_event or (lambda e: None)
    stop = should_stop or (lambda: False)
    device = model.means.device
    n_train = dsa.shape[0]
    # The loss sees images in units of the DSA's robust maximum: SSIM's constants assume a data range of
    # about 1, and the density-control gradient threshold then means the same on any intensity scale.
    flat = dsa.reshape(-1)
    if flat.numel() > 2**24:
        flat = flat[torch.randperm(flat.numel(), device=flat.device)[: 2**24]]
    inv_scale = 1.0 / max(float(torch.quantile(flat.float(), 0.999)), 1e-12)
    sigma_t = cfg.temporal_sigma if cfg.temporal_sigma is not None else 1.0 / n_views
    background = None
    if cfg.static_background:
        background = StaticBackground(model.grid, cameras[0], image_scale=inv_scale,
                                      factor=cfg.background_factor).to(device)
    runner = StepRunner(model, dsa, cameras, inv_scale, cfg.ssim_weight, use_graph=cfg.cuda_graph,
                        background=background, background_l1=cfg.background_l1)
    opt = make_optimizer(model, cfg, capturable=runner.use_graph, background=background)
    strategy = DensityStrategy(cfg.density_config(), model, noise_sigma=measure_noise(runner.gt_stack),
                               vessel_voxels=vessel_voxels)
    state = TrainState()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        opt, stats, state = load_checkpoint(checkpoint_path, model, cfg, device, runner.use_graph,
                                            fingerprint, background)
        strategy.load_state_dict(stats)
        rng.bit_generator.state = state.rng
        torch.set_rng_state(state.torch_rng.cpu())
        if state.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state.cuda_rng.cpu(), device)
        log.info("resumed from %s at iteration %d", checkpoint_path, state.iteration)
    t0 = time.perf_counter()
    start_iter = state.iteration
    window = (start_iter, t0)

    def checkpoint():
        if checkpoint_path is not None:
            state.rng = rng.bit_generator.state
            state.torch_rng = torch.get_rng_state()
            state.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            save_checkpoint(checkpoint_path, model, opt, strategy, state, cfg, n_train, fingerprint, background)

    while state.iteration < cfg.iterations:
        if stop():
            checkpoint()
            return {"status": "cancelled", "iteration": state.iteration, "history": state.history,
                    "it_per_s": _rate(state), "densify": strategy.log}
        step = state.iteration
        set_learning_rates(opt, model, cfg, step)
        if not state.order:
            state.order = rng.permutation(n_train).tolist()
        k = state.order.pop()
        t = float(np.clip(times[k] + rng.normal(0.0, sigma_t), 0.0, 1.0))
        runner.load(k, t)
        loss = runner.run(model, opt, strategy.statistics(step))

        state.iteration += 1
        it = state.iteration
        strategy.step(model, opt, it)
        if it % cfg.progress_every == 0 or it == cfg.iterations or it == start_iter + 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runner.check()
            now = time.perf_counter()
            if it - window[0] >= cfg.progress_every:
                state.rates.append((it - window[0]) / max(now - window[1], 1e-9))
                window = (it, now)
            lv = float(loss.detach())
            state.history.append((it, lv, model.n))
            elapsed = now - t0
            rate = (it - start_iter) / max(elapsed, 1e-9)
            emit({"event": "progress", "stage": "train", "iteration": it, "iterations": cfg.iterations,
                  "loss": lv, "n_gaussians": model.n, "elapsed_s": elapsed,
                  "eta_s": (cfg.iterations - it) / max(rate, 1e-9)})
        if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.iterations:
            checkpoint()
        if snapshot is not None and cfg.snapshot_every and it % cfg.snapshot_every == 0 and it < cfg.iterations:
            emit({"event": "snapshot", "iteration": it, **snapshot(it)})
    checkpoint()
    if runner.skipped:
        log.warning("%d iterations were skipped: their view needed more rasteriser pairs than the graph held",
                    runner.skipped)
    return {"status": "done", "iteration": state.iteration, "history": state.history,
            "it_per_s": _rate(state), "densify": strategy.log, "density": strategy.summary(),
            "cuda_graph": runner.use_graph,
            "graph_captures": runner.captures, "skipped_iterations": runner.skipped, "background": background}


def _rate(state: TrainState) -> float:
    """Median iterations per second over the progress windows (robust to warm-up and density control)."""
    return float(np.median(state.rates)) if state.rates else 0.0
