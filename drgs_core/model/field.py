"""Time-dependent attenuation field D of METHOD §4: rho(p_hat, t) = MLP([h3D(p_hat), h4D(p_hat, t)]).

    h3D : HashGridEncoding(3, base 8, growth 1.45)    -> L*F features (24 by default)
    h4D : HashGridEncoding(4, base 2, growth 1.4)     -> L*F features, input (p_hat, t)
    MLP : Linear(2*L*F, 64) - ReLU - Linear(64, 64) - ReLU - Linear(64, 1) - ReLU  -> rho >= 0 (1/mm)

p_hat = (mu - origin) / phy in [0, 1]^3 (normalised Gaussian centre), t in [0, 1] (normalised frame time).

Initialisation.  The hash tables start at U(-1e-4, 1e-4), so at start the MLP input is ~0 and every point
gets almost the same output; with default nn.Linear initialisation that output is a random number of
either sign, and a negative one is dead under the output ReLU for *all* points at once (no gradient ever).
We therefore keep PyTorch's default init for the two hidden layers, scale the last layer's weights by
`last_layer_scale` (0.01) and set its bias so that the output for a zero encoding equals `init_rho`
(default 1e-2 1/mm, below typical contrast-filled vessel attenuation so early gradients push rho up).
Every point then starts at rho ~= init_rho > 0, inside the linear part of the ReLU, with non-zero
gradients for all parameters (including the hash tables, through the small but non-zero last layer).
`fit_to` can instead pre-train the field to given per-point values (e.g. FDK samples).

Encoding: `model.hashgrid.HashGridEncoding` (deterministic indexing documented there); on CUDA tensors its
forward runs the GPU kernels that `drgs_core.cuda` selects (compiled extension or Triton), with the same
indexing, so state_dicts move freely between devices and backends.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DRGSInputError
from .hashgrid import HashGridEncoding

H3D_BASE, H3D_GROWTH = 8, 1.45
H4D_BASE, H4D_GROWTH = 2, 1.4


def _make_encoding(n_dims, n_levels, n_features, log2_table_size, base, growth, seed):
    return HashGridEncoding(n_dims, n_levels, n_features, log2_table_size, base, growth, seed=seed)


class AttenuationField(nn.Module):
    """rho(p_hat, t) >= 0 in 1/mm.

    Args:
        log2_table_size: rows per hashed level = 2**log2_table_size (both encodings).
        n_levels, n_features: per encoding; the MLP input is 2 * n_levels * n_features (48 by default).
        hidden: width of the two hidden layers (64).
        init_rho: initial output (1/mm) for every point, > 0 (see module docstring).
        last_layer_scale: factor applied to the default-initialised last-layer weights.
        backend: "auto" or "torch" (the same thing: the GPU kernels are chosen by `drgs_core.cuda`).
        device: where to build the parameters.
        seed: optional int; seeds both hash tables (h4D uses seed + 1).  The MLP uses torch's global RNG.
    """

    def __init__(self, log2_table_size: int = 19, n_levels: int = 12, n_features: int = 2, hidden: int = 64,
                 init_rho: float = 1e-2, last_layer_scale: float = 0.01, backend: str = "auto",
                 device: torch.device | str | None = None, seed: int | None = None):
        super().__init__()
        if backend not in ("auto", "torch"):
            raise DRGSInputError("AttenuationField backend", repr(backend), '"auto" or "torch"')
        if not init_rho > 0:
            raise DRGSInputError("AttenuationField init_rho", f"{init_rho}", "> 0 (1/mm)",
                                 "a non-positive start is dead under the output ReLU")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = "torch"
        self.n_levels, self.n_features = int(n_levels), int(n_features)
        self.log2_table_size = int(log2_table_size)
        seed4 = None if seed is None else int(seed) + 1
        self.h3d = _make_encoding(3, n_levels, n_features, log2_table_size, H3D_BASE, H3D_GROWTH, seed)
        self.h4d = _make_encoding(4, n_levels, n_features, log2_table_size, H4D_BASE, H4D_GROWTH, seed4)
        n_in = self.h3d.n_output_dims + self.h4d.n_output_dims
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self._init_output(float(init_rho), float(last_layer_scale))
        self.to(dev)

    @torch.no_grad()
    def _init_output(self, init_rho: float, scale: float) -> None:
        last = self.mlp[-1]
        last.weight.mul_(scale)
        last.bias.zero_()
        zero_out = self.mlp(torch.zeros(1, self.mlp[0].in_features)).item()
        last.bias.fill_(init_rho - zero_out)

    # ------------------------------------------------------------------ parameters for the trainer
    def encoders(self) -> list[nn.Module]:
        """[h3d, h4d]."""
        return [self.h3d, self.h4d]

    def param_groups(self, lr: float = 1e-3, weight_decay: float = 5e-5) -> list[dict]:
        """Optimizer groups {"name", "params", "lr", "weight_decay"}: "field_encoding" (both hash tables)
        and "field_mlp" (the MLP), with the same lr / weight decay (METHOD §6: 1e-3 -> 1e-4, wd 5e-5)."""
        enc = [p for m in self.encoders() for p in m.parameters()]
        return [{"name": "field_encoding", "params": enc, "lr": lr, "weight_decay": weight_decay},
                {"name": "field_mlp", "params": list(self.mlp.parameters()), "lr": lr, "weight_decay": weight_decay}]

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _time_column(t, n_points: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        if t.dim() == 0:
            return t.expand(n_points, 1)
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 1 or t.shape[0] != n_points:
            raise DRGSInputError("AttenuationField time", f"shape {tuple(t.shape)}",
                                 f"a scalar, [{n_points}] or [{n_points}, 1]")
        return t.unsqueeze(1)

    def _mlp_out(self, f3: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.mlp(torch.cat([f3, f4], dim=1))).squeeze(1)

    def forward(self, p_hat: torch.Tensor, t) -> torch.Tensor:
        return torch.relu(self.pre_activation(p_hat, t))

    def pre_activation(self, p_hat: torch.Tensor, t) -> torch.Tensor:
        """The MLP output before the final ReLU, [P].

        rho [P] (1/mm, >= 0) at normalised positions p_hat [P, 3] in [0,1]^3 and normalised time t
        (float, 0-d tensor, [P] or [P, 1], in [0, 1]; values outside [0, 1] are clamped by the encodings)."""
        if p_hat.dim() != 2 or p_hat.shape[1] != 3:
            raise DRGSInputError("AttenuationField positions", f"shape {tuple(p_hat.shape)}", "[P, 3]")
        p_hat = p_hat.float()
        tcol = self._time_column(t, p_hat.shape[0], p_hat)
        f3 = self.h3d(p_hat)
        f4 = self.h4d(torch.cat([p_hat, tcol], dim=1))
        return self.mlp(torch.cat([f3, f4], dim=1)).squeeze(1)

    def forward_times(self, p_hat: torch.Tensor, times) -> torch.Tensor:
        """rho [n_t, P] for every time in `times` ([n_t] or list, in [0, 1]); h3D is evaluated once.
        Differentiable; for large n_t * P call it under torch.no_grad() or in chunks."""
        p_hat = p_hat.float()
        times = torch.as_tensor(times, dtype=p_hat.dtype, device=p_hat.device).reshape(-1)
        f3 = self.h3d(p_hat)
        rows = []
        for tk in times:
            f4 = self.h4d(torch.cat([p_hat, tk.expand(p_hat.shape[0], 1)], dim=1))
            rows.append(self._mlp_out(f3, f4))
        return torch.stack(rows, dim=0)

    def fit_to(self, p_hat: torch.Tensor, t, target_rho: torch.Tensor, steps: int = 500, lr: float = 1e-2,
               batch_size: int | None = None, generator: torch.Generator | None = None) -> float:
        """Pre-train the field so that rho(p_hat, t) ~= target_rho (mean squared error, Adam).

        p_hat [P, 3] in [0,1]^3; t as in forward; target_rho [P] (1/mm).  batch_size: random subset per
        step (None = all points).  Returns the final MSE over all points ((1/mm)^2), evaluated after the
        last step.  Uses its own Adam optimiser; leaves the field in train mode.  The loss is taken before the
        output ReLU so that a large first step cannot switch every point off for good (a dead field).
        """
        p_hat = p_hat.detach().float()
        target = torch.as_tensor(target_rho, dtype=p_hat.dtype, device=p_hat.device).reshape(-1).detach()
        n = p_hat.shape[0]
        if target.shape[0] != n:
            raise DRGSInputError("fit_to target", f"{target.shape[0]} values", f"{n} (one per point)")
        tcol = self._time_column(t, n, p_hat).detach()
        opt = torch.optim.Adam(self.parameters(), lr=lr, eps=1e-15)
        self.train()
        for _ in range(int(steps)):
            if batch_size is not None and batch_size < n:
                idx = torch.randint(0, n, (int(batch_size),), generator=generator).to(p_hat.device)
                pred = self.pre_activation(p_hat[idx], tcol[idx])
                loss = torch.mean((pred - target[idx]) ** 2)
            else:
                loss = torch.mean((self.pre_activation(p_hat, tcol) - target) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = torch.mean((self(p_hat, tcol) - target) ** 2).item()
        return float(final) if math.isfinite(final) else float("inf")
