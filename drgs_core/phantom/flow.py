"""Contrast flow: arrival times along the trees and gamma-variate concentration curves.

Time is the normalised acquisition time t in [0, 1) (frame k at t_k = k / N, METHOD §2).

* Arteries: the bolus enters the root at `arrival` and travels at constant speed, reaching the farthest
  arterial capsule `transit` later: t_arr = arrival + transit * path_from_root / max(path_from_root).
* Veins (draining): the contrast leaves the capillaries at every venous leaf at `arrival` and flows towards the
  venous root (the sinus drain): t_arr = arrival + transit * path_to_leaf / max(path_to_leaf), where
  path_to_leaf is the centreline distance to the nearest leaf upstream of the flow.
* Concentration at a capsule: c(t) = ((t - t_arr) / tmax)^alpha * exp(alpha * (1 - (t - t_arr) / tmax)) for
  t > t_arr (peak 1 at t_arr + tmax), 0 before.  Attenuation = peak_mu * scale * c (1/mm).

Each capsule (a sub-capsule of length <= flow_step mm) carries one arrival time, so the field is piecewise
constant along the tree and its line integrals stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tree import ARTERY, VEIN


@dataclass(frozen=True)
class BolusParams:
    """Timing of one vascular phase (normalised time units) and its dilution (dimensionless)."""

    arrival: float
    transit: float
    tmax: float
    alpha: float
    scale: float = 1.0


def gamma_variate(tau, tmax, alpha):
    """Normalised gamma variate of tau = t - t_arr (normalised time), torch or numpy, broadcasting:
    (tau/tmax)^alpha * exp(alpha (1 - tau/tmax)) for tau > 0, else 0; peak 1 at tau = tmax."""
    if isinstance(tau, torch.Tensor):
        x = (tau / tmax).clamp_min(1e-12)
        val = torch.exp(alpha * (torch.log(x) + 1.0 - x))
        return torch.where(tau > 0, val, torch.zeros_like(val))
    x = np.clip(np.asarray(tau, np.float64) / tmax, 1e-12, None)
    val = np.exp(alpha * (np.log(x) + 1.0 - x))
    return np.where(np.asarray(tau) > 0, val, 0.0)


def arrival_times(path_from_root, path_to_leaf, kind, artery: BolusParams, vein: BolusParams) -> np.ndarray:
    """Per-capsule arrival time [C] (normalised time) from the tree path lengths (mm)."""
    t = np.zeros(len(kind))
    a, v = kind == ARTERY, kind == VEIN
    if a.any():
        t[a] = artery.arrival + artery.transit * path_from_root[a] / max(path_from_root[a].max(), 1e-9)
    if v.any():
        t[v] = vein.arrival + vein.transit * path_to_leaf[v] / max(path_to_leaf[v].max(), 1e-9)
    return t


class ContrastModel:
    """Attenuation value of every capsule as a function of time.

    arrival [C] normalised time, kind [C] (ARTERY / VEIN), peak_mu (1/mm), static: constant full
    concentration c = 1 (still scaled per phase) at every time.
    """

    def __init__(self, arrival, kind, peak_mu: float, artery: BolusParams, vein: BolusParams, static: bool):
        self.arrival = torch.as_tensor(np.asarray(arrival, np.float64))
        self.kind = torch.as_tensor(np.asarray(kind, np.int64))
        self.peak_mu = float(peak_mu)
        self.artery, self.vein, self.static = artery, vein, bool(static)
        is_vein = self.kind == VEIN
        self._tmax = torch.where(is_vein, vein.tmax, artery.tmax).double()
        self._alpha = torch.where(is_vein, vein.alpha, artery.alpha).double()
        self._scale = torch.where(is_vein, vein.scale, artery.scale).double() * self.peak_mu

    def _eval(self, t, arr, tmax, alpha, scale) -> torch.Tensor:
        if self.static:
            return scale * torch.ones_like(t + arr)
        return scale * gamma_variate(t - arr, tmax, alpha)

    def values(self, t, capsules=None) -> torch.Tensor:
        """Attenuation (1/mm, float64) of the selected capsules at time(s) t.

        capsules: index tensor [P] (all capsules if None); t: scalar or a tensor of the selection's shape [P]
        (one time per capsule entry, e.g. per ray-capsule pair).
        """
        idx = slice(None) if capsules is None else capsules
        t = torch.as_tensor(t, dtype=torch.float64)
        return self._eval(t, self.arrival[idx], self._tmax[idx], self._alpha[idx], self._scale[idx])

    def table(self, times) -> torch.Tensor:
        """[C, T] attenuation (1/mm) of every capsule at the given times [T]."""
        t = torch.as_tensor(np.asarray(times, np.float64)).reshape(1, -1)
        col = lambda x: x.unsqueeze(1)  # noqa: E731
        return self._eval(t, col(self.arrival), col(self._tmax), col(self._alpha), col(self._scale))

    def ever_filled(self, times, threshold: float = 0.05) -> torch.Tensor:
        """[C] bool: concentration reaches `threshold` (fraction of the phase peak) at one of the times."""
        tab = self.table(times) / self._scale.unsqueeze(1).clamp_min(1e-300)
        return (tab >= threshold).any(1)
