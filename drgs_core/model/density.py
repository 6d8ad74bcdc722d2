"""Adaptive density control (METHOD §6): clone, split, box pruning and accumulated-attenuation pruning.

Statistics are gathered every iteration for the Gaussians visible in that view:
- the norm of the loss gradient w.r.t. the projected centre in normalised device coordinates
  (pixel gradient x (W/2, H/2)), averaged over the iterations a Gaussian was visible;
- its attenuation rho_i(t), averaged likewise (A_i), since the last densification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gaussians import PARAM_NAMES, GaussianModel
from ..render.common import quaternion_to_rotation


@dataclass
class DensityStats:
    grad_sum: torch.Tensor
    rho_sum: torch.Tensor
    visible_count: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device) -> "DensityStats":
        z = torch.zeros(n, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    @torch.no_grad()
    def update(self, visible: torch.Tensor, means2d_grad: torch.Tensor, width: int, height: int,
               rho: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """visible [P] bool; means2d_grad [P,2] dLoss/d(centre) in pixels; rho [P] 1/mm; weight: optional
        0-d tensor (0 or 1) that masks the whole update on the device (a skipped iteration)."""
        g = torch.hypot(means2d_grad[:, 0] * (width / 2.0), means2d_grad[:, 1] * (height / 2.0))
        v = visible.float()
        if weight is not None:
            v = v * weight
        self.grad_sum += g * v
        self.rho_sum += rho.detach() * v
        self.visible_count += v

    def mean_grad(self) -> torch.Tensor:
        return self.grad_sum / self.visible_count.clamp_min(1)

    def mean_rho(self) -> torch.Tensor:
        return self.rho_sum / self.visible_count.clamp_min(1)

    def state_dict(self) -> dict:
        return {"grad_sum": self.grad_sum, "rho_sum": self.rho_sum, "visible_count": self.visible_count}


def _edit_optimizer(optimizer: torch.optim.Optimizer, model: GaussianModel, new_values: dict,
                    keep: torch.Tensor, n_added: int) -> None:
    """Replace each per-Gaussian parameter by new_values[name] = cat(old[keep], added) and edit Adam state alike."""
    for name in PARAM_NAMES:
        old = getattr(model, name)
        new = nn.Parameter(new_values[name].contiguous())
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    state = optimizer.state.pop(old, None)
                    if state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            s = state[key][keep]
                            pad = torch.zeros((n_added,) + tuple(s.shape[1:]), device=s.device, dtype=s.dtype)
                            state[key] = torch.cat([s, pad])
                        optimizer.state[new] = state
        setattr(model, name, new)


@torch.no_grad()
def densify_and_prune(model: GaussianModel, optimizer: torch.optim.Optimizer, stats: DensityStats, *,
                      grad_threshold: float, clone_limit: float, min_rho: float, max_gaussians: int | None = None,
                      generator: torch.Generator | None = None) -> dict:
    """One density-control step; returns counts {cloned, split, pruned_box, pruned_rho, n}.

    clone_limit: the p*d of METHOD §6 in mm (clone if max scale <= clone_limit, else split in two).
    min_rho: prune Gaussians whose accumulated mean attenuation A_i < min_rho (only those seen at least once).
    """
    n0 = model.n
    dev = model.means.device
    grads = stats.mean_grad()
    # Prune decisions are taken on the Gaussians as they were before this step.
    in_box = model.grid.contains(model.means)
    seen = stats.visible_count > 0
    low_rho = seen & (stats.mean_rho() < min_rho)
    doomed = ~in_box | low_rho
    selected = (grads >= grad_threshold) & seen & ~doomed
    if max_gaussians is not None and n0 + int(selected.sum()) > max_gaussians:
        budget = max(0, max_gaussians - n0)
        order = torch.argsort(grads, descending=True)
        capped = torch.zeros_like(selected)
        capped[order[:budget]] = True
        selected &= capped
    max_scale = model.scales.max(dim=-1).values
    clone = selected & (max_scale <= clone_limit)
    split = selected & (max_scale > clone_limit)

    prune = doomed | split  # a split Gaussian is replaced by its two children

    params = {name: getattr(model, name).detach() for name in PARAM_NAMES}
    # Clones: exact copies; the next gradient steps move them apart.
    added = {name: [params[name][clone]] for name in PARAM_NAMES}
    # Splits: two children with centres drawn from the parent Gaussian and scales / 1.6.
    if split.any():
        idx = torch.nonzero(split).squeeze(1).repeat(2)
        s = model.scales[idx]
        R = quaternion_to_rotation(params["rotations"][idx])
        z = torch.randn(idx.shape[0], 3, device=dev, generator=generator)
        added["means"].append(params["means"][idx] + torch.einsum("pij,pj->pi", R, z * s))
        added["scales_raw"].append(model.scales_to_raw(s / 1.6))
        added["rotations"].append(params["rotations"][idx])
        added["rho_raw"].append(params["rho_raw"][idx])
    keep = ~prune
    new_values = {name: torch.cat([params[name][keep]] + added[name]) for name in PARAM_NAMES}
    n_added = new_values["means"].shape[0] - int(keep.sum())
    _edit_optimizer(optimizer, model, new_values, keep, n_added)
    return {
        "cloned": int(clone.sum()),
        "split": int(split.sum()),
        "pruned_box": int((~in_box).sum()),
        "pruned_rho": int((low_rho & in_box).sum()),
        "n": model.n,
        "n_before": n0,
    }
