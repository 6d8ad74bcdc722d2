"""The in-memory DSA case: what every reader produces and every consumer reads."""

from __future__ import annotations

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
