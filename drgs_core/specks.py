"""Isolated specks: connected components of a segmentation that are too small to be vessels (docs/METHOD.md §10).

Sparse-view reconstructions leave small blobs far from the vessel tree (floaters, streak crossings).  They
are a handful of voxels each but dominate the surface distances (HD95).  `drop_specks` removes every
26-connected component of `volume >= level` smaller than `min_voxels` and says how much it removed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import DRGSInputError

#: "auto" size: components below this fraction of all segmented voxels (at least AUTO_MIN_VOXELS) are specks.
AUTO_FRACTION = 0.002
AUTO_MIN_VOXELS = 4


def speck_size(setting, n_segmented: int) -> int:
    """The minimum component size in voxels for a setting: "auto", 0 (keep everything) or a positive int."""
    if setting == "auto" or setting is None:
        return max(AUTO_MIN_VOXELS, int(np.ceil(AUTO_FRACTION * n_segmented)))
    try:
        value = int(setting)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise DRGSInputError("min_speck_voxels must be 'auto' or a non-negative integer", repr(setting),
                             "'auto', 0 (keep all components) or a voxel count such as 20")
    return value


def drop_specks(volume: np.ndarray, level: float, min_voxels="auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """Remove the small components of the segmentation volume >= level.

    volume [nx, ny, nz] (any units); returns (cleaned volume: the dropped voxels set to 0, segmentation
    [nx, ny, nz] bool without the specks, info {"min_voxels", "components", "dropped_components",
    "dropped_voxels", "dropped_fraction"}).
    """
    vol = np.asarray(volume)
    seg = vol >= level
    n_seg = int(seg.sum())
    size = speck_size(min_voxels, n_seg)
    info = {"min_voxels": size, "components": 0, "dropped_components": 0, "dropped_voxels": 0,
            "dropped_fraction": 0.0}
    if n_seg == 0:
        return vol, seg, info
    labels, n = ndimage.label(seg, structure=np.ones((3, 3, 3), bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    small = counts < size
    small[0] = False
    info["components"] = int(n)
    if size == 0 or not small.any():
        return vol, seg, info
    drop = small[labels]
    cleaned = np.where(drop, np.zeros_like(vol), vol)
    info.update(dropped_components=int(small.sum()), dropped_voxels=int(drop.sum()),
                dropped_fraction=float(drop.sum() / n_seg))
    return cleaned, seg & ~drop, info
