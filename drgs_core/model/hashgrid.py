"""Multiresolution hash-grid encoding (METHOD §4), written from the equations in pure torch.

For a point x in [0, 1]^D (clamped) and level l = 0 .. L-1:

    N_l   = floor(base * growth**l)                    grid resolution (cells per axis)
    s     = x * N_l                                    scaled position
    c     = clamp(floor(s), 0, N_l - 1)   (int)        lower corner of the cell; x = 1 uses the last cell
    f     = s - c   in [0, 1]^D                        position inside the cell
    out_l = sum over the 2^D corners b in {0,1}^D of   w_b * table_l[ index_l(c + b) ]
    w_b   = prod_d ( f_d if b_d == 1 else 1 - f_d )    D-linear interpolation weights

Grid vertices sit at the integer coordinates 0 .. N_l of every axis.  The per-level index is

    direct   (when (N_l + 1)^D <= T):  grid_index(v) = sum_d v_d * (N_l + 1)^d       (x fastest)
    hashed   (otherwise):              hash_index(v) = (XOR_d ((v_d * pi_d) & 0xFFFFFFFF)) mod T

with T = 2^log2_table_size and pi = (1, 2654435761, 805459861, 3674653429).  The product is formed in
int64 and masked to 32 bits after each multiply, i.e. exactly unsigned 32-bit arithmetic (valid while
v_d < 2^31, far beyond any resolution used here).  A direct level keeps only (N_l + 1)^D rows; a hashed
level keeps T rows.  All levels live in one flat parameter ``table`` [total_rows, F]; level l owns rows
``level_offsets[l] : level_offsets[l] + level_sizes[l]``.  Output: the L levels concatenated level-major,
[P, L * F] (level 0 features first).

Gradients come from autograd: w.r.t. the table (dense, via a gather) and w.r.t. x (through f; zero
outside [0, 1] because of the clamp, and piecewise-linear inside).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DRGSInputError

#: Per-dimension hash multipliers (dimension 0 first).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429)
_MASK32 = 0xFFFFFFFF


def level_resolution(base_resolution: float, growth: float, level: int) -> int:
    """N_l = floor(base * growth**l), evaluated in float64 (cells per axis at level `level`)."""
    return int(math.floor(float(base_resolution) * float(growth) ** int(level)))


def hash_index(coords: torch.Tensor, table_size: int) -> torch.Tensor:
    """Spatial hash of integer grid vertices.

    coords: int64 [..., D] (D <= 4), non-negative vertex coordinates (< 2^31).
    Returns int64 [...] in [0, table_size): (XOR_d ((coords_d * pi_d) & 0xFFFFFFFF)) mod table_size.
    """
    coords = torch.as_tensor(coords).to(torch.int64)
    n_dims = coords.shape[-1]
    if n_dims > len(HASH_PRIMES):
        raise DRGSInputError("hash_index: too many dimensions", f"{n_dims}", f"at most {len(HASH_PRIMES)}")
    acc = torch.zeros(coords.shape[:-1], dtype=torch.int64, device=coords.device)
    for d in range(n_dims):
        acc = torch.bitwise_xor(acc, (coords[..., d] * HASH_PRIMES[d]) & _MASK32)
    return torch.remainder(acc, int(table_size))


def grid_index(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Direct (dense) index of integer grid vertices of a level with `resolution` = N_l cells per axis.

    coords: int64 [..., D] with 0 <= coords <= N_l.  Returns int64 [...]: sum_d coords_d * (N_l + 1)^d
    (dimension 0 varies fastest).
    """
    coords = torch.as_tensor(coords).to(torch.int64)
    side = int(resolution) + 1
    acc = torch.zeros(coords.shape[:-1], dtype=torch.int64, device=coords.device)
    stride = 1
    for d in range(coords.shape[-1]):
        acc = acc + coords[..., d] * stride
        stride *= side
    return acc


def _expand_corners(per_dim: torch.Tensor, combine) -> torch.Tensor:
    """Combine per-dimension corner terms [..., D, 2] into [..., 2^D] with `combine` (add, xor, mul).

    Corner k of the result has bit d of k equal to the offset b_d in dimension d.
    """
    acc = per_dim[..., 0, :]
    for d in range(1, per_dim.shape[-2]):
        term = per_dim[..., d, :]
        acc = combine(term.unsqueeze(-1), acc.unsqueeze(-2)).flatten(-2)
    return acc


class _WeightedGather(torch.autograd.Function):
    """out[g, p, :] = sum_c weights[g, p, c] * table[rows[g, p, c], :].

    Same result as index_select + weighted sum, with a cheaper backward on CPU: the table gradient is
    accumulated with a 1-D index_add_ over the flattened table (row * F + feature) instead of the row-wise
    scatter that index_select's own backward uses.
    """

    @staticmethod
    def forward(ctx, table, rows, weights):
        n_feat = table.shape[1]
        feats = table.index_select(0, rows.reshape(-1)).view(*rows.shape, n_feat)  # [G, P, C, F]
        out = torch.einsum("gpc,gpcf->gpf", weights, feats)
        ctx.save_for_backward(rows, weights, feats if weights.requires_grad else None)
        ctx.table_shape = tuple(table.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, weights, feats = ctx.saved_tensors
        n_rows, n_feat = ctx.table_shape
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            vals = weights.unsqueeze(-1) * grad_out.unsqueeze(2)                      # [G, P, C, F]
            flat = (rows.unsqueeze(-1) * n_feat + torch.arange(n_feat, device=rows.device)).reshape(-1)
            grad_table = torch.zeros(n_rows * n_feat, dtype=grad_out.dtype, device=grad_out.device)
            grad_table.index_add_(0, flat, vals.reshape(-1))
            grad_table = grad_table.view(n_rows, n_feat)
        if ctx.needs_input_grad[2]:
            grad_weights = torch.einsum("gpcf,gpf->gpc", feats, grad_out)
        return grad_table, None, grad_weights


class HashGridEncoding(nn.Module):
    """Multiresolution hash-grid encoding of points in [0, 1]^D.

    Args:
        n_dims: D, 1..4.
        n_levels: L.
        n_features: F features per level.
        log2_table_size: T = 2**log2_table_size rows per hashed level.
        base_resolution, growth: N_l = floor(base_resolution * growth**l).
        seed: optional int seed for the uniform(-1e-4, 1e-4) table initialisation.

    forward(x [P, D]) -> [P, L*F] in the table's dtype (float32 by default).
    """

    def __init__(self, n_dims: int, n_levels: int = 12, n_features: int = 2, log2_table_size: int = 19,
                 base_resolution: float = 8, growth: float = 1.45, seed: int | None = None):
        super().__init__()
        if not 1 <= int(n_dims) <= len(HASH_PRIMES):
            raise DRGSInputError("HashGridEncoding n_dims", f"{n_dims}", f"1..{len(HASH_PRIMES)}")
        if int(n_levels) < 1 or int(n_features) < 1 or not 1 <= int(log2_table_size) <= 30:
            raise DRGSInputError("HashGridEncoding sizes",
                                 f"n_levels={n_levels}, n_features={n_features}, log2_table_size={log2_table_size}",
                                 "n_levels >= 1, n_features >= 1, 1 <= log2_table_size <= 30")
        if float(base_resolution) < 1 or float(growth) < 1:
            raise DRGSInputError("HashGridEncoding resolution", f"base={base_resolution}, growth={growth}",
                                 "base_resolution >= 1 and growth >= 1")
        self.n_dims = int(n_dims)
        self.n_levels = int(n_levels)
        self.n_features = int(n_features)
        self.log2_table_size = int(log2_table_size)
        self.table_size = 1 << self.log2_table_size
        self.base_resolution = base_resolution
        self.growth = float(growth)
        self.n_output_dims = self.n_levels * self.n_features

        self.level_resolutions = [level_resolution(base_resolution, growth, l) for l in range(self.n_levels)]
        self._hashed = [(n + 1) ** self.n_dims > self.table_size for n in self.level_resolutions]
        self.level_sizes = [self.table_size if h else (n + 1) ** self.n_dims
                            for n, h in zip(self.level_resolutions, self._hashed)]
        self.level_offsets = [0]
        for size in self.level_sizes[:-1]:
            self.level_offsets.append(self.level_offsets[-1] + size)
        self.total_rows = self.level_offsets[-1] + self.level_sizes[-1]

        table = torch.empty(self.total_rows, self.n_features, dtype=torch.float32)
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            table.uniform_(-1e-4, 1e-4, generator=gen)
        self.table = nn.Parameter(table)

        # Levels grow monotonically, so direct levels form a prefix and hashed levels a suffix.
        self._n_direct = sum(1 for h in self._hashed if not h)
        if any(self._hashed[:self._n_direct]) or not all(self._hashed[self._n_direct:]):
            raise DRGSInputError("HashGridEncoding levels", "non-monotonic resolutions", "growth >= 1")
        res = torch.tensor(self.level_resolutions, dtype=torch.int64)
        self.register_buffer("_res", res, persistent=False)
        self.register_buffer("_offsets", torch.tensor(self.level_offsets, dtype=torch.int64), persistent=False)
        strides = torch.stack([(res + 1) ** d for d in range(self.n_dims)], dim=-1)  # [L, D]
        self.register_buffer("_strides", strides, persistent=False)
        self.register_buffer("_primes", torch.tensor(HASH_PRIMES[:self.n_dims], dtype=torch.int64),
                             persistent=False)
        self.register_buffer("_bits", torch.tensor([0, 1], dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ introspection
    def uses_hash(self, level: int) -> bool:
        """True if level `level` is spatially hashed, False if directly indexed."""
        return self._hashed[int(level)]

    def hashed_levels(self) -> list[int]:
        """Indices of the hashed levels."""
        return [l for l in range(self.n_levels) if self._hashed[l]]

    def level_table(self, level: int) -> torch.Tensor:
        """View of level `level`'s rows of the flat table, [level_sizes[level], F]."""
        o = self.level_offsets[level]
        return self.table[o:o + self.level_sizes[level]]

    def vertex_index(self, level: int, coords: torch.Tensor) -> torch.Tensor:
        """Row in the flat table of integer vertices `coords` int64 [..., D] of level `level` -> int64 [...]."""
        if self._hashed[level]:
            local = hash_index(coords, self.table_size)
        else:
            local = grid_index(coords, self.level_resolutions[level])
        return local + self.level_offsets[level]

    def extra_repr(self) -> str:
        return (f"n_dims={self.n_dims}, n_levels={self.n_levels}, n_features={self.n_features}, "
                f"log2_table_size={self.log2_table_size}, base={self.base_resolution}, growth={self.growth}, "
                f"hashed_levels={self.hashed_levels()}")

    # ------------------------------------------------------------------ forward
    def _corner_rows_and_weights(self, x: torch.Tensor, levels: slice, hashed: bool):
        """Rows [G, P, 2^D] (int64, global) and weights [G, P, 2^D] for the levels in `levels`."""
        res = self._res[levels]                                   # [G]
        g = res.shape[0]
        scaled = x.unsqueeze(0) * res.to(x.dtype).view(g, 1, 1)   # [G, P, D]
        with torch.no_grad():
            cell = torch.floor(scaled).to(torch.int64)
            cell = torch.minimum(cell.clamp_min(0), (res - 1).view(g, 1, 1))
            corner = cell.unsqueeze(-1) + self._bits                  # [G, P, D, 2]
            if hashed:
                per_dim = (corner * self._primes.view(1, 1, -1, 1)) & _MASK32
                rows = torch.remainder(_expand_corners(per_dim, torch.bitwise_xor), self.table_size)
            else:
                per_dim = corner * self._strides[levels].view(g, 1, -1, 1)
                rows = _expand_corners(per_dim, torch.add)
            rows = rows + self._offsets[levels].view(g, 1, 1)
        frac = scaled - cell.to(x.dtype)                          # [G, P, D]
        w = torch.stack((1.0 - frac, frac), dim=-1)               # [G, P, D, 2]
        weights = _expand_corners(w, torch.mul)                   # [G, P, 2^D]
        return rows, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points.

        x: [P, D] positions, normalised to [0, 1]^D (values outside are clamped).
        Returns [P, n_levels * n_features] in the table's dtype; columns l*F .. l*F+F-1 belong to level l.
        """
        if x.dim() != 2 or x.shape[1] != self.n_dims:
            raise DRGSInputError("HashGridEncoding input", f"shape {tuple(x.shape)}", f"[P, {self.n_dims}]")
        if x.is_cuda and self.table.is_cuda:
            from .. import cuda  # GPU kernels chosen by drgs_core.cuda (same indexing, bit-exact rows)

            name = cuda.active_backend(x.device)
            if name != "torch":
                module = cuda.backend_module(name)
                if module.hashgrid_supports(self, x):
                    return module.hashgrid_encode(self, x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` on the PyTorch reference path, whatever the backend (x [P, D] -> [P, L*F])."""
        x = x.to(self.table.dtype).clamp(0.0, 1.0)
        n_points = x.shape[0]
        parts = []
        if self._n_direct > 0:
            parts.append(self._corner_rows_and_weights(x, slice(0, self._n_direct), hashed=False))
        if self._n_direct < self.n_levels:
            parts.append(self._corner_rows_and_weights(x, slice(self._n_direct, self.n_levels), hashed=True))
        if len(parts) == 1:
            rows, weights = parts[0]
        else:
            rows = torch.cat([p[0] for p in parts], dim=0)
            weights = torch.cat([p[1] for p in parts], dim=0)
        out = _WeightedGather.apply(self.table, rows, weights)    # [L, P, F]
        return out.permute(1, 0, 2).reshape(n_points, self.n_output_dims)
