"""The in-memory DSA case: what every reader produces and every consumer reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import ConeBeamGeometry, VolumeGrid, frame_times


@dataclass
class Case:
    """A rotational DSA acquisition.

    dsa: [N, H, W] float32 line integrals, log(mask) - log(fill) clipped at 0 (dimensionless).
    geometry: per-frame C-arm geometry (METHOD §3); grid: the reconstruction volume grid.
    times: [N] normalised frame times t_k = k / N.
    fill, mask: the raw runs [N, H, W] when read from files (None for a DSA-only case).
    """

    dsa: np.ndarray
    geometry: ConeBeamGeometry
    grid: VolumeGrid
    times: np.ndarray = None
    fill: np.ndarray | None = None
    mask: np.ndarray | None = None
    name: str = "case"
    source: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dsa = np.asarray(self.dsa, dtype=np.float32)
        if self.times is None:
            self.times = frame_times(self.dsa.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.dsa.shape[0])

    def binned(self, factor: int) -> "Case":
        """This case with factor x factor detector pixels averaged into one (the DSA line integrals, which is
        what the renderer models; the raw runs are dropped).  factor 1 returns the case itself."""
        if int(factor) == 1:
            return self
        geometry = self.geometry.binned(factor)
        n, H, W = self.dsa.shape
        dsa = self.dsa.reshape(n, H // factor, factor, W // factor, factor).mean(axis=(2, 4), dtype=np.float64)
        meta = {**self.meta, "detector_binning": int(factor), "detector_shape_unbinned": [int(H), int(W)]}
        return dataclasses.replace(self, dsa=dsa.astype(np.float32), geometry=geometry, fill=None, mask=None,
                                   meta=meta)
