"""Density-control building blocks (docs/METHOD.md §6, §10): the per-Gaussian statistics gathered inside the
training step, the noise measurement that scales their thresholds, and the parameter/optimizer edit that
clone, split and prune share.  The policy that uses them is `strategy.DensityStrategy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gaussians import PARAM_NAMES, GaussianModel

#: width (pixels) of the box filter applied to the residual before it is read at projected centres.
RESIDUAL_BOX = 5


class DensityStats:
    """Per-Gaussian sums since the last round (device tensors; updated in place inside the training step).

    grad_sum: norm of dLoss/d(projected centre) in NDC; rho_sum: rho_i(t) (1/mm); visible_count: iterations
    it was visible; resid_sum: smoothed residual at its centre (image units); reject_count: views whose
    residual there was below -`reject_level` (the view wants less attenuation there)."""

    names = ("grad_sum", "rho_sum", "visible_count", "resid_sum", "reject_count")

    def __init__(self, n: int, device, reject_level: float = 0.0):
        for name in self.names:
            setattr(self, name, torch.zeros(n, device=device))
        self.reject_level = float(reject_level)

    @classmethod
    def zeros(cls, n: int, device, reject_level: float = 0.0) -> "DensityStats":
        return cls(n, device, reject_level)

    @torch.no_grad()
    def update(self, visible: torch.Tensor, means2d_grad: torch.Tensor, width: int, height: int,
               rho: torch.Tensor, weight: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               centres: torch.Tensor | None = None) -> None:
        """visible [P] bool; means2d_grad [P,2] dLoss/d(centre) in pixels; rho [P] 1/mm; weight: optional 0-d
        device tensor (0 or 1) masking the whole update (a skipped iteration); residual [H,W] measured -
        rendered and centres [P,2] (u, v) pixels: read the box-filtered residual at each centre.
        No host synchronisation (runs inside a CUDA graph)."""
        g = torch.hypot(means2d_grad[:, 0] * (width / 2.0), means2d_grad[:, 1] * (height / 2.0))
        v = visible.float()
        if weight is not None:
            v = v * weight
        self.grad_sum += g * v
        self.rho_sum += rho.detach() * v
        self.visible_count += v
        if residual is not None and centres is not None:
            r = F.avg_pool2d(residual.detach()[None, None].float(), RESIDUAL_BOX, stride=1,
                             padding=RESIDUAL_BOX // 2, count_include_pad=False)[0, 0]
            H, W = r.shape
            u = centres[:, 0].round().long().clamp(0, W - 1)
            vv = centres[:, 1].round().long().clamp(0, H - 1)
            at = r[vv, u]
            self.resid_sum += at * v
            self.reject_count += (at < -self.reject_level).float() * v

    def mean_grad(self) -> torch.Tensor:
        return self.grad_sum / self.visible_count.clamp_min(1)

    def mean_rho(self) -> torch.Tensor:
        return self.rho_sum / self.visible_count.clamp_min(1)

    def mean_residual(self) -> torch.Tensor:
        return self.resid_sum / self.visible_count.clamp_min(1)

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names} | {"reject_level": self.reject_level}

    def load_state_dict(self, d: dict) -> None:
        for name in self.names:
            if name in d:  # checkpoints of older versions lack the residual sums
                setattr(self, name, d[name])
            else:
                setattr(self, name, torch.zeros_like(d["visible_count"]))
        self.reject_level = float(d.get("reject_level", self.reject_level))


def measure_noise(images: torch.Tensor) -> float:
    """Robust noise standard deviation of images [n, H, W]: MAD of horizontal neighbour differences / sqrt(2).

    Vessels and edges are a minority of the differences, so the median absolute difference measures the
    pixel noise (same units as the images)."""
    d = (images[..., 1:] - images[..., :-1]).reshape(-1).float()
    if d.numel() > 2**22:
        d = d[torch.linspace(0, d.numel() - 1, 2**22, device=d.device).long()]
    mad = float(d.abs().median())
    return mad / 0.6745 / math.sqrt(2.0)


def replace_parameters(optimizer: torch.optim.Optimizer, model: GaussianModel, new_values: dict,
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
