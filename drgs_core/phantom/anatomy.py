"""Background anatomy present in both runs: head soft tissue, skull shell and skull base, as ellipsoids.

The background attenuation is a weighted sum of ellipsoid indicators, mu_bg(x) = Σ_e w_e 1[x in E_e] (1/mm),
so its line integral is exactly Σ_e w_e · chord_e.  With nested ellipsoids and signed weights this gives:
soft tissue (mu_tissue) inside the inner skull surface, bone (mu_bone) in the shell between the outer and inner
skull surfaces, and bone in a flattened, tilted skull-base ellipsoid inside the head.
Sizes are fixed in mm (an adult head, LPS: +x left, +y posterior, +z superior), independent of the volume box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tubes import as_f64, ellipsoid_chords, ellipsoid_matrix, inside_ellipsoid, rotation_matrix_xyz


@dataclass(frozen=True)
class Ellipsoid:
    """centre [3] mm, semi_axes [3] mm, rotation [3, 3] (axes as columns), weight (1/mm)."""

    name: str
    centre: tuple
    semi_axes: tuple
    rotation: tuple
    weight: float

    @property
    def matrix(self) -> np.ndarray:
        return ellipsoid_matrix(self.semi_axes, np.asarray(self.rotation))


HEAD_CENTRE = (0.0, 4.0, 12.0)
HEAD_OUTER = (74.0, 94.0, 90.0)
SKULL_THICKNESS = 6.5


def head_ellipsoids(mu_tissue: float = 0.02, mu_bone: float = 0.05) -> list[Ellipsoid]:
    """The background ellipsoids (weights in 1/mm)."""
    eye = tuple(map(tuple, np.eye(3)))
    inner = tuple(a - SKULL_THICKNESS for a in HEAD_OUTER)
    base_rot = tuple(map(tuple, rotation_matrix_xyz((-10.0, 0.0, 0.0))))
    return [
        Ellipsoid("skull_outer", HEAD_CENTRE, HEAD_OUTER, eye, mu_bone),
        Ellipsoid("skull_inner", HEAD_CENTRE, inner, eye, mu_tissue - mu_bone),
        Ellipsoid("skull_base", (0.0, 6.0, -34.0), (44.0, 52.0, 6.0), base_rot, mu_bone - mu_tissue),
    ]


def inner_skull(ellipsoids: list[Ellipsoid]) -> Ellipsoid:
    return next(e for e in ellipsoids if e.name == "skull_inner")


def background_line_integrals(o: torch.Tensor, d: torch.Tensor, ellipsoids: list[Ellipsoid]) -> torch.Tensor:
    """∫ mu_bg ds (dimensionless) along lines o + s d; o broadcastable to d [..., 3] (unit), float64."""
    out = torch.zeros(d.shape[:-1], dtype=torch.float64, device=d.device)
    for e in ellipsoids:
        out = out + e.weight * ellipsoid_chords(o, d, e.centre, e.matrix)
    return out


def background_attenuation(points, ellipsoids: list[Ellipsoid]) -> torch.Tensor:
    """mu_bg (1/mm) at points [..., 3] mm."""
    p = as_f64(points)
    out = torch.zeros(p.shape[:-1], dtype=torch.float64, device=p.device)
    for e in ellipsoids:
        out = out + e.weight * inside_ellipsoid(p, e.centre, e.matrix).double()
    return out
