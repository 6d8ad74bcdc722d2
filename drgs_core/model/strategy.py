"""Adaptive density control as one strategy object (docs/METHOD.md §6 and §10).

`DensityStrategy` owns its settings (`DensityConfig`), its running statistics (`DensityStats`, filled inside the
training step, also inside a captured CUDA graph) and a log of what every round added and removed, and why.
The trainer only calls

    stats = strategy.statistics(iteration)   # tensors the step accumulates into, or None outside the window
    record = strategy.step(model, optimizer, iteration)   # after the iteration; a dict when it acted

A round (every `every` iterations inside [start, stop)):
- grow: a Gaussian is cloned (small) or split (large) when its mean projected-centre gradient exceeds
  `grad_threshold` AND the smoothed image residual (measured - rendered) at its projected centre, averaged over
  the views that saw it, is positive by more than `grow_sigmas` noise standard deviations (structure is
  missing there, not just noise).  Growth never takes the count above the budget: `budget` =
  min(max_gaussians, max(n_init, per_vessel_voxel x vessel voxels of the FDK)); at most `max_growth` x n per
  round, the largest gradients first.
- prune: outside the volume box; negligible contribution (mean attenuation x Gaussian volume below
  `min_contribution` x the median contribution, or mean attenuation below `min_rho`);
  rejected by the views (the residual at its centre says "too bright" in more than `max_reject` of the
  views that saw it: a sparse-view floater that only its own view wanted); oversized (largest standard
  deviation above `max_scale_voxels` voxels).
- decay: every `decay_every` iterations the per-Gaussian statistics restart and, for a static attenuation,
  rho is multiplied by `decay_factor`: floaters must earn their place again (the 3DGS opacity reset).

Units: gradients in normalised device coordinates; residuals in the trainer's image units (DSA / its robust
maximum); scales in mm; rho in 1/mm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from .density import RESIDUAL_BOX, DensityStats, replace_parameters
from .gaussians import PARAM_NAMES, GaussianModel
from ..render.common import quaternion_to_rotation

log = logging.getLogger(__name__)

@dataclass
class DensityConfig:
    """Settings of the density control (defaults: the `fast` schedule's window, METHOD §6 / §10)."""

    start: int = 500
    stop: int = 5000
    every: int = 200
    grad_threshold: float = 3e-5
    clone_voxels_start: float = 2.5     # p of METHOD §6, decaying linearly to clone_voxels_end over the window
    clone_voxels_end: float = 0.5
    grow_sigmas: float = 2.0            # residual gate in noise standard deviations (0 disables the gate)
    max_growth: float = 0.25            # at most this fraction of n added per round
    max_gaussians: int = 150_000        # hard cap on any case
    per_vessel_voxel: float = 1.0       # budget per FDK vessel voxel
    min_rho: float = 1e-6
    min_contribution: float = 0.01      # x the median of rho x volume
    max_reject: float = 0.8             # prune when more than this fraction of views say "too bright"
    min_views_for_reject: int = 3
    max_scale_voxels: float = 6.0
    decay_every: int = 3000
    decay_factor: float = 0.5

    def __post_init__(self):
        self.every = max(1, int(self.every))
        self.max_gaussians = int(self.max_gaussians)


class DensityStrategy:
    """The density control of one training run (see the module docstring).

    noise_sigma: pixel noise of the training images in the trainer's image units (`measure_noise`);
    vessel_voxels: FDK voxels above the initialisation threshold (None: budget = max_gaussians)."""

    def __init__(self, cfg: DensityConfig, model: GaussianModel, noise_sigma: float = 0.0,
                 vessel_voxels: int | None = None):
        self.cfg = cfg
        self.noise_sigma = float(noise_sigma)
        # Noise of one view's residual after the box filter.
        self.box_sigma = self.noise_sigma / RESIDUAL_BOX
        n0 = model.n
        budget = cfg.max_gaussians
        if vessel_voxels is not None:
            budget = min(budget, max(n0, int(round(cfg.per_vessel_voxel * vessel_voxels))))
        self.budget = int(budget)
        self.device = model.means.device
        self.stats = self._fresh(n0)
        self.log: list[dict] = []

    def _fresh(self, n: int) -> DensityStats:
        # A view rejects a Gaussian when the smoothed residual at its centre is clearly negative: 2 noise
        # standard deviations, and at least 1 % of the image scale (noise-free data).
        return DensityStats(n, self.device, reject_level=max(2.0 * self.box_sigma, 0.01))

    # ------------------------------------------------------------------ trainer interface
    def active(self, iteration: int) -> bool:
        """True while the statistics of iteration `iteration` (0-based, before it runs) are gathered."""
        return self.cfg.start <= iteration < self.cfg.stop

    def statistics(self, iteration: int) -> DensityStats | None:
        return self.stats if self.active(iteration) else None

    @torch.no_grad()
    def step(self, model: GaussianModel, optimizer, iteration: int) -> dict | None:
        """Call after each iteration; `iteration` = iterations done.  Returns the round's record or None."""
        cfg = self.cfg
        record = None
        if self.active(iteration - 1) and iteration % cfg.every == 0:
            frac = (iteration - 1 - cfg.start) / max(cfg.stop - cfg.start, 1)
            p = cfg.clone_voxels_start + (cfg.clone_voxels_end - cfg.clone_voxels_start) * frac
            record = self.densify_and_prune(model, optimizer, clone_limit=p * model.grid.min_spacing)
            record["iteration"] = iteration
            self.log.append(record)
            if model.n == 0:
                raise RuntimeError("density control removed every Gaussian; lower min_contribution")
            self.stats = self._fresh(model.n)
        if cfg.decay_every and iteration % cfg.decay_every == 0 and cfg.start < iteration < cfg.stop:
            self._decay(model)
            self.stats = self._fresh(model.n)
            entry = {"iteration": iteration, "decay": cfg.decay_factor if model.static else None, "n": model.n}
            self.log.append(entry)
            record = (record or {}) | {"decayed": True}
        return record

    def _decay(self, model: GaussianModel) -> None:
        # A static attenuation is per Gaussian: shrink it.  The dynamic field is shared by neighbours, so there
        # the reset is a fresh statistics window (every Gaussian must be re-earned by the views' residuals).
        if model.static:
            model.rho_raw.data.mul_(self.cfg.decay_factor)

    # ------------------------------------------------------------------ one round
    @torch.no_grad()
    def densify_and_prune(self, model: GaussianModel, optimizer, clone_limit: float,
                          generator: torch.Generator | None = None) -> dict:
        cfg, st = self.cfg, self.stats
        n0 = model.n
        dev = model.means.device
        seen = st.visible_count > 0
        grads = st.mean_grad()
        scales = model.scales
        max_scale = scales.max(dim=-1).values

        # ---- prune (decided on the Gaussians as they were before the round)
        out_box = ~model.grid.contains(model.means)
        mean_rho = st.mean_rho()
        weight = mean_rho * scales.prod(dim=-1) * (2 * math.pi) ** 1.5      # integrated attenuation, mm^2
        ref = weight[seen].median() if bool(seen.any()) else weight.new_tensor(0.0)
        low = seen & ((mean_rho < cfg.min_rho) | (weight < cfg.min_contribution * ref)) & ~out_box
        enough = st.visible_count >= cfg.min_views_for_reject
        rejected = (enough & (st.reject_count > cfg.max_reject * st.visible_count)) & ~out_box & ~low
        oversized = (max_scale > cfg.max_scale_voxels * model.grid.min_spacing) & ~out_box & ~low & ~rejected
        doomed = out_box | low | rejected | oversized

        # ---- grow (only where the residual says structure is missing), within the budget
        # The DSA is clipped at 0, so pure noise leaves a positive mean residual of sigma / sqrt(2 pi) where
        # nothing is rendered; structure must stand `grow_sigmas` (box-filtered, view-averaged) sigmas above it.
        floor = self.noise_sigma / math.sqrt(2 * math.pi)
        gate = st.mean_residual() > floor + cfg.grow_sigmas * self.box_sigma / st.visible_count.clamp_min(1).sqrt()
        want = (grads >= cfg.grad_threshold) & seen & ~doomed
        selected = want & gate if cfg.grow_sigmas > 0 else want
        n_left = n0 - int(doomed.sum())
        room = max(0, min(self.budget - n_left, int(cfg.max_growth * n0)))
        n_sel = int(selected.sum())
        capped = 0
        if n_sel > room:
            # a split adds one net Gaussian, like a clone: `room` selections fill the budget exactly
            score = torch.where(selected, grads, torch.full_like(grads, -1.0))
            keep_sel = torch.zeros_like(selected)
            keep_sel[torch.argsort(score, descending=True)[:room]] = True
            capped = n_sel - room
            selected &= keep_sel
        clone = selected & (max_scale <= clone_limit)
        split = selected & (max_scale > clone_limit)

        params = {name: getattr(model, name).detach() for name in PARAM_NAMES}
        added = {name: [params[name][clone]] for name in PARAM_NAMES}
        if split.any():
            idx = torch.nonzero(split).squeeze(1).repeat(2)
            s = scales[idx]
            R = quaternion_to_rotation(params["rotations"][idx])
            z = torch.randn(idx.shape[0], 3, device=dev, generator=generator)
            added["means"].append(params["means"][idx] + torch.einsum("pij,pj->pi", R, z * s))
            added["scales_raw"].append(model.scales_to_raw(s / 1.6))
            added["rotations"].append(params["rotations"][idx])
            added["rho_raw"].append(params["rho_raw"][idx])
        keep = ~(doomed | split)
        new_values = {name: torch.cat([params[name][keep]] + added[name]) for name in PARAM_NAMES}
        n_added = new_values["means"].shape[0] - int(keep.sum())
        replace_parameters(optimizer, model, new_values, keep, n_added)
        return {
            "n_before": n0, "n": model.n, "budget": self.budget,
            "cloned": int(clone.sum()), "split": int(split.sum()),
            "pruned_box": int(out_box.sum()), "pruned_rho": int(low.sum()),
            "pruned_rejected": int(rejected.sum()), "pruned_oversized": int(oversized.sum()),
            "grow_candidates": int(want.sum()),
            "grow_gated_out": int((want & ~gate).sum()) if cfg.grow_sigmas > 0 else 0, "grow_capped": capped,
        }

    # ------------------------------------------------------------------ persistence
    def summary(self) -> dict:
        return {"settings": asdict(self.cfg), "noise_sigma": self.noise_sigma, "budget": self.budget}

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "log": list(self.log), "budget": self.budget,
                "noise_sigma": self.noise_sigma}

    def load_state_dict(self, d: dict) -> None:
        if "stats" not in d:  # an older checkpoint: the statistics only
            d = {"stats": d}
        self.stats = self._fresh(int(d["stats"]["visible_count"].shape[0]))
        self.stats.load_state_dict(d["stats"])
        self.log = list(d.get("log", []))
        self.budget = int(d.get("budget", self.budget))
        self.noise_sigma = float(d.get("noise_sigma", self.noise_sigma))
        self.box_sigma = self.noise_sigma / RESIDUAL_BOX
