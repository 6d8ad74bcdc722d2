"""Evaluation of a reconstruction against ground truth (METHOD §8): mesh CD/HD95, Dice, correlation.

Ground truth comes either from a phantom's `truth/` folder (volume.nii.gz, mask.nii.gz, mesh.stl) or, for a
real case, from a reference mesh (e.g. the public cases' mesh_ref.obj, vertices in voxel index units of the
case grid), which may need ICP because the scanner's frame differs from ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DRGSInputError
from .geometry import VolumeGrid
from .io import read_mesh, read_volume
from .metrics import best_dice, chamfer_hd95, correlation, dice, mesh_from_volume, resample_to_grid


def _on_grid(path: Path, grid: VolumeGrid) -> np.ndarray:
    arr, info = read_volume(path)
    if info.grid is not None and info.grid == grid:
        return arr.astype(np.float32)
    if info.grid is None:
        raise DRGSInputError(f"{path.name} is not on a grid centred on the isocentre",
                             f"origin {np.round(info.origin, 3).tolist()}", "a volume written by DRGS4D")
    return np.asarray(resample_to_grid(arr.astype(np.float32), info.grid, grid))


def evaluate_volume(volume: np.ndarray, grid: VolumeGrid, level: float, truth_dir, *, vertices=None) -> dict:
    """Compare a reconstructed volume [nx,ny,nz] (and its iso-surface at `level`) with a phantom's truth/."""
    truth_dir = Path(truth_dir)
    for name in ("volume.nii.gz", "mask.nii.gz", "mesh.stl"):
        if not (truth_dir / name).exists():
            raise DRGSInputError("the ground-truth folder is incomplete", f"{truth_dir / name} is missing",
                                 "volume.nii.gz, mask.nii.gz and mesh.stl", "regenerate it with `drgs4d phantom`")
    truth_vol = _on_grid(truth_dir / "volume.nii.gz", grid)
    truth_mask = _on_grid(truth_dir / "mask.nii.gz", grid) > 0.5
    if vertices is None:
        vertices, _ = mesh_from_volume(volume, grid, level)
    truth_verts, _ = read_mesh(truth_dir / "mesh.stl")
    dist = chamfer_hd95(np.asarray(vertices), np.asarray(truth_verts))
    bd, bthr = best_dice(volume, truth_mask)
    return {
        "cd_mm": float(dist["cd"]), "hd95_mm": float(dist["hd95"]),
        "dice": float(dice(volume, truth_mask, level)), "best_dice": float(bd), "best_dice_threshold": float(bthr),
        "correlation": float(correlation(volume, truth_vol)), "iso_level": float(level),
    }


def evaluate_against_truth(run_dir, truth_dir, level: float | None = None) -> dict:
    """Evaluate a run folder (volume.nii.gz, mesh.stl; iso level from metrics.json unless given) against truth/."""
    run_dir = Path(run_dir)
    vol, info = read_volume(run_dir / "volume.nii.gz")
    if info.grid is None:
        raise DRGSInputError("the run volume is not on a DRGS4D grid", str(run_dir / "volume.nii.gz"))
    verts, _ = read_mesh(run_dir / "mesh.stl")
    if level is None:
        level = float(json.loads((run_dir / "metrics.json").read_text())["iso_level"])
    return evaluate_volume(vol.astype(np.float32), info.grid, level, truth_dir, vertices=verts)


def evaluate_reference_mesh(vertices, reference_mesh, grid: VolumeGrid, *, index_units: bool = True,
                            icp: bool = True) -> dict:
    """CD/HD95 between our mesh (world mm) and a scanner reference mesh (voxel index units of `grid` by default)."""
    ref, _ = read_mesh(reference_mesh)
    ref = np.asarray(ref, dtype=np.float64)
    if index_units:
        ref = grid.index_to_world(ref)
    dist = chamfer_hd95(np.asarray(vertices), ref, icp=icp)
    return {"cd_mm": float(dist["cd"]), "hd95_mm": float(dist["hd95"]), "icp": icp}
