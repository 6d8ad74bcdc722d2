"""Saving a trained model so that it can be reloaded for re-rendering: gaussians.ply + model.pt + config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..geometry import VolumeGrid
from ..io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from .gaussians import GaussianModel


def write_gaussians_ply(path, model: GaussianModel, mean_rho: torch.Tensor) -> None:
    """Binary little-endian PLY: x y z (world LPS mm), scale_0..2 (mm), rot_0..3 (w,x,y,z, unit), rho (1/mm, time mean)."""
    with torch.no_grad():
        q = model.rotations / model.rotations.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cols = [model.means, model.scales, q, mean_rho[:, None]]
        data = torch.cat([c.detach().float().cpu() for c in cols], dim=1).numpy().astype("<f4")
    names = ["x", "y", "z", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "rho"]
    header = ["ply", "format binary_little_endian 1.0", "comment DRGS4D radiative Gaussians, world LPS mm",
              f"element vertex {data.shape[0]}"] + [f"property float {n}" for n in names] + ["end_header"]
    write_bytes_atomic(path, ("\n".join(header) + "\n").encode("ascii") + np.ascontiguousarray(data).tobytes())


def read_gaussians_ply(path) -> dict:
    """Read a PLY written by write_gaussians_ply -> dict of numpy arrays (means, scales, rotations, rho)."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    n = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    props = [h.split()[-1] for h in header if h.startswith("property")]
    arr = np.frombuffer(raw[end:], dtype="<f4", count=n * len(props)).reshape(n, len(props))
    col = {p: arr[:, i] for i, p in enumerate(props)}
    return {
        "means": np.stack([col["x"], col["y"], col["z"]], 1),
        "scales": np.stack([col[f"scale_{i}"] for i in range(3)], 1),
        "rotations": np.stack([col[f"rot_{i}"] for i in range(4)], 1),
        "rho": col["rho"],
    }


def save_model(path, model: GaussianModel, extra: dict | None = None) -> None:
    payload = {"model": model.state_dict(), "static": model.static, "grid": model.grid.to_json(),
               "log2_table_size": model.log2_table_size,
               "n_levels": model.n_levels, **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(run_dir, device="cpu") -> GaussianModel:
    """Reload the trained model of a run folder (model.pt) for re-rendering at any time and view."""
    payload = torch.load(Path(run_dir) / "model.pt", map_location=device, weights_only=False)
    g = payload["grid"]
    grid = VolumeGrid(g["volume_resolution"], g["volume_spacing"])
    model = GaussianModel(grid, static=payload["static"], log2_table_size=payload["log2_table_size"],
                          n_levels=payload["n_levels"]).to(device)
    model.resize_like(payload["model"])
    model.load_state_dict(payload["model"])
    return model


def save_json(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
