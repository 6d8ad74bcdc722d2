"""Phantom configuration (:class:`PhantomConfig`) and its presets ``demo``, ``paper``, ``paper1024``, and the
hard-physics variants ``hard`` (paper size) and ``hard-demo`` (demo size).

Units: mm, degrees for angles in the configuration (converted to radians for the geometry), 1/mm for
attenuation, normalised acquisition time [0, 1) for the flow timings, photons per detector pixel for I0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..errors import DRGSInputError


@dataclass
class PhantomConfig:
    """Everything that defines a synthetic rotational-DSA phantom (all defaults = the ``paper`` preset).

    Acquisition: `n_frames` frames at primary angles linspace(angle_start_deg, angle_stop_deg), constant
    `secondary_angle_deg`; `sad`, `sid` (mm); detector `detector_shape` (H, W) pixels with `detector_spacing`
    (sx, sy) mm, or None to choose the smallest square pixel that covers `detector_cover` ("fov": the cylinder
    inscribed in the volume box, full height; "box": all 8 box corners) in every frame, plus `detector_margin`.
    `subpixel` x `subpixel` rays per pixel; `pixel_average` = "line_integral" (the pixel's line integral is the
    mean of the sub-ray integrals, so DSA is exactly linear in the vessels) or "intensity" (the detector averages
    intensities: physical partial-volume non-linearity).

    Volume: `volume_resolution` (nx, ny, nz), `volume_spacing` (mm); `truth_supersample` points per voxel axis
    for the truth volumes; `mesh_supersample` (None = automatic from the smallest radius).

    Vessels: radii (mm) of the roots and the smallest branches, `length_per_radius`, `max_branches` per tree,
    `tortuosity_deg`, `piece_length` (mm, straight polyline pieces), `flow_step` (mm, sub-capsule length = spatial
    resolution of the flow front), `margin_mm` from the domain boundary.  `peak_mu` (1/mm) is the attenuation of
    fully opacified arterial blood; veins reach `vein_scale` * peak_mu.

    Flow (normalised time): arrival at the arterial root / venous leaves, transit to the farthest capsule,
    gamma-variate `tmax` and `alpha`.  `static`: constant full concentration (for FDK tests).

    Runs: `photons` I0 per pixel, `noise` (Poisson, seeded by `noise_seed`, default seed + 1) plus Gaussian
    `electronic_noise` (counts); `scatter_fraction` of a Gaussian-blurred primary (sigma `scatter_sigma` x detector
    width) added to each run; `motion_shift_mm` / `motion_rotation_deg`: rigid misregistration of the patient in
    the mask run relative to the fill run (the vessels, and hence the truth, are in the fill-run pose).

    Compute: `device` for the torch work ("cpu" or "cuda"); `threads`: torch CPU threads while generating and
    while evaluating the phantom's methods (None keeps the process setting; the demo preset uses 1 because the
    work items are small and multi-threading them on a busy machine is much slower).
    """

    name: str = "paper"
    seed: int = 0
    noise_seed: int | None = None
    # acquisition
    n_frames: int = 133
    angle_start_deg: float = -100.0
    angle_stop_deg: float = 100.0
    secondary_angle_deg: float = 0.0
    sad: float = 750.0
    sid: float = 1200.0
    detector_shape: tuple = (512, 512)
    detector_spacing: tuple | None = None
    detector_cover: str = "fov"
    detector_margin: float = 0.03
    subpixel: int = 2
    pixel_average: str = "line_integral"
    # volume
    volume_resolution: tuple = (256, 256, 256)
    volume_spacing: tuple = (0.625, 0.625, 0.625)
    truth_supersample: int = 2
    mesh_supersample: int | None = None
    # vessels
    artery_root_radius: float = 2.4
    artery_min_radius: float = 0.7
    vein_root_radius: float = 3.0
    vein_min_radius: float = 0.9
    include_veins: bool = True
    length_per_radius: float = 10.0
    max_branches: int = 120
    max_generations: int = 9
    tortuosity_deg: float = 7.0
    piece_length: float = 6.0
    flow_step: float = 1.5
    margin_mm: float = 6.0
    peak_mu: float = 0.25
    vein_scale: float = 0.6
    # flow
    static: bool = False
    artery_arrival: float = 0.05
    artery_transit: float = 0.15
    artery_tmax: float = 0.15
    artery_alpha: float = 3.0
    vein_arrival: float = 0.35
    vein_transit: float = 0.15
    vein_tmax: float = 0.25
    vein_alpha: float = 3.0
    # background and runs
    background: bool = True
    mu_tissue: float = 0.02
    mu_bone: float = 0.05
    photons: float = 1.0e5
    noise: bool = True
    electronic_noise: float = 0.0
    scatter_fraction: float = 0.0
    scatter_sigma: float = 0.15
    motion_shift_mm: tuple = (0.0, 0.0, 0.0)
    motion_rotation_deg: tuple = (0.0, 0.0, 0.0)
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self):
        self.validate()

    # ---- validation -----------------------------------------------------------------------------------
    def _bad(self, name: str, expected: str, fix: str = ""):
        raise DRGSInputError(f"phantom setting '{name}' is invalid", repr(getattr(self, name)), expected,
                             fix or f"set {name} to {expected}")

    def validate(self) -> "PhantomConfig":
        """Check every field; raises DRGSInputError naming the first bad one.  Normalises tuples."""
        for name in ("detector_shape", "volume_resolution", "volume_spacing", "motion_shift_mm",
                     "motion_rotation_deg"):
            value = getattr(self, name)
            try:
                setattr(self, name, tuple(value))
            except TypeError:
                self._bad(name, "a list of numbers")
        if self.detector_spacing is not None:
            try:
                self.detector_spacing = tuple(float(x) for x in self.detector_spacing)
            except (TypeError, ValueError):
                self._bad("detector_spacing", "null or two positive numbers (mm)")
            if len(self.detector_spacing) != 2 or min(self.detector_spacing) <= 0:
                self._bad("detector_spacing", "null or two positive numbers (mm)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            self._bad("seed", "a non-negative integer")
        if self.noise_seed is not None and (not isinstance(self.noise_seed, int) or self.noise_seed < 0):
            self._bad("noise_seed", "null or a non-negative integer")
        if not (isinstance(self.n_frames, int) and self.n_frames >= 1):
            self._bad("n_frames", "a positive integer")
        if len(self.detector_shape) != 2 or min(int(x) for x in self.detector_shape) < 2:
            self._bad("detector_shape", "two integers (H, W) >= 2")
        self.detector_shape = tuple(int(x) for x in self.detector_shape)
        if len(self.volume_resolution) != 3 or min(int(x) for x in self.volume_resolution) < 4:
            self._bad("volume_resolution", "three integers >= 4")
        self.volume_resolution = tuple(int(x) for x in self.volume_resolution)
        if len(self.volume_spacing) != 3 or min(float(x) for x in self.volume_spacing) <= 0:
            self._bad("volume_spacing", "three positive lengths (mm)")
        self.volume_spacing = tuple(float(x) for x in self.volume_spacing)
        if not (0 < self.sad < self.sid):
            self._bad("sad", "0 < sad < sid (mm)")
        half = 0.5 * max(r * s for r, s in zip(self.volume_resolution, self.volume_spacing)) * math.sqrt(2)
        if half >= 0.8 * self.sad:
            self._bad("volume_spacing",
                      f"a volume box well inside the source orbit (half diagonal < {0.8 * self.sad:g} mm)",
                      "use a smaller volume or a larger sad")
        if self.angle_stop_deg == self.angle_start_deg and self.n_frames > 1:
            self._bad("angle_stop_deg", "different from angle_start_deg")
        if self.detector_cover not in ("fov", "box"):
            self._bad("detector_cover", "'fov' or 'box'")
        if not 0 <= self.detector_margin < 1:
            self._bad("detector_margin", "a fraction in [0, 1)")
        if not (isinstance(self.subpixel, int) and 1 <= self.subpixel <= 8):
            self._bad("subpixel", "an integer 1..8")
        if self.pixel_average not in ("line_integral", "intensity"):
            self._bad("pixel_average", "'line_integral' or 'intensity'")
        if not (isinstance(self.truth_supersample, int) and 1 <= self.truth_supersample <= 4):
            self._bad("truth_supersample", "an integer 1..4")
        if self.mesh_supersample is not None and not (isinstance(self.mesh_supersample, int)
                                                      and 1 <= self.mesh_supersample <= 6):
            self._bad("mesh_supersample", "null or an integer 1..6")
        for name in ("artery_root_radius", "artery_min_radius", "vein_root_radius", "vein_min_radius",
                     "length_per_radius", "piece_length", "flow_step", "peak_mu", "photons",
                     "artery_tmax", "vein_tmax", "artery_alpha", "vein_alpha", "scatter_sigma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                self._bad(name, "a positive number")
        for name in ("margin_mm", "vein_scale", "mu_tissue", "mu_bone", "electronic_noise", "scatter_fraction",
                     "artery_transit", "vein_transit"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                self._bad(name, "a non-negative number")
        if self.artery_min_radius > self.artery_root_radius:
            self._bad("artery_min_radius", "at most artery_root_radius")
        if self.vein_min_radius > self.vein_root_radius:
            self._bad("vein_min_radius", "at most vein_root_radius")
        if not (isinstance(self.max_branches, int) and self.max_branches >= 1):
            self._bad("max_branches", "a positive integer")
        if not (isinstance(self.max_generations, int) and self.max_generations >= 0):
            self._bad("max_generations", "a non-negative integer")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            self._bad("threads", "null (keep torch's setting) or a positive integer")
        if len(self.motion_shift_mm) != 3 or len(self.motion_rotation_deg) != 3:
            self._bad("motion_shift_mm", "three numbers (mm) and motion_rotation_deg three numbers (deg)")
        return self

    # ---- convenience --------------------------------------------------------------------------------------
    @property
    def effective_noise_seed(self) -> int:
        return self.seed + 1 if self.noise_seed is None else self.noise_seed

    @property
    def has_motion(self) -> bool:
        return any(abs(x) > 0 for x in self.motion_shift_mm + self.motion_rotation_deg)

    def replace(self, **changes) -> "PhantomConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "PhantomConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DRGSInputError("unknown phantom settings", ", ".join(unknown), "names of PhantomConfig fields",
                                 "remove or rename them")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PhantomConfig":
        """A preset (a key of PRESETS: 'demo', 'paper', 'paper1024', 'hard', 'hard-demo') with optional field
        overrides."""
        if name not in PRESETS:
            raise DRGSInputError("unknown phantom preset", repr(name), "one of " + ", ".join(sorted(PRESETS)))
        data = dict(PRESETS[name])
        data.update(overrides)
        return cls(**data)


PRESETS: dict[str, dict] = {
    # CPU-sized: 60 frames, 96x96 detector, 64^3 volume of 2 mm voxels (128 mm box); a few seconds on one core.
    "demo": dict(
        name="demo", n_frames=60, detector_shape=(96, 96), volume_resolution=(64, 64, 64),
        volume_spacing=(2.0, 2.0, 2.0), artery_root_radius=2.5, artery_min_radius=1.0, vein_root_radius=3.0,
        vein_min_radius=1.1, max_branches=40, max_generations=7, flow_step=2.0, piece_length=6.0, threads=1,
    ),
    # Clinical-like: 133 frames over 200 degrees, 512^2 detector, 256^3 volume of 0.625 mm (160 mm box).
    "paper": dict(name="paper"),
    "paper1024": dict(name="paper1024", detector_shape=(1024, 1024)),
}

#: Hard physics on top of a size preset: a denser tree, the mask run rigidly misregistered by 0.5 mm / 0.4
#: degree, 10 % scatter, 10x fewer photons (I0 = 1e4) and 5 counts of electronic (read) noise.
HARD_PHYSICS = dict(
    max_branches=200, max_generations=10, motion_shift_mm=(0.35, -0.25, 0.25),
    motion_rotation_deg=(0.2, -0.2, 0.28), scatter_fraction=0.10, photons=1.0e4, electronic_noise=5.0,
)
PRESETS["hard"] = {**PRESETS["paper"], **HARD_PHYSICS, "name": "hard"}
PRESETS["hard-demo"] = {**PRESETS["demo"], **HARD_PHYSICS, "name": "hard-demo", "max_branches": 60,
                        "max_generations": 8}


def preset(name: str, **overrides) -> PhantomConfig:
    """Shortcut for :meth:`PhantomConfig.preset`."""
    return PhantomConfig.preset(name, **overrides)
