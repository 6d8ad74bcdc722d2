"""Build a complete synthetic rotational-DSA case with ground truth: :func:`make_phantom`, :func:`write_phantom`.

Not an inverse crime: vessels are analytic capsules (never Gaussians) and the projections are exact analytic
line integrals (never the project's rasteriser or voxel projector).  Conventions are those of
:mod:`drgs_core.geometry`: world mm (LPS, isocentre origin), volumes [nx, ny, nz], stacks [N, H, W].
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import torch

from ..geometry import ConeBeamGeometry, VolumeGrid, frame_times
from ..io.case import Case
from .acquisition import make_geometry, simulate_runs
from .anatomy import background_attenuation, background_line_integrals, head_ellipsoids, inner_skull
from .field import VesselField, match_kind, auto_mesh_factor
from .flow import BolusParams, ContrastModel, arrival_times
from .presets import PhantomConfig
from .tree import Domain, TreeParams, VesselTree, assemble_tree, grow_arterial_tree, grow_venous_tree
from .tubes import as_f64

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` torch CPU threads (None: unchanged); the previous setting is restored."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)

#: a capsule counts as "filled at some time" (truth mask and mesh) when its concentration reaches this fraction
#: of its phase peak at one of the frame times.
FILLED_THRESHOLD = 0.05


@dataclass
class Phantom:
    """A synthetic case and its ground truth.

    case: the DSA case (noisy runs, DSA, geometry, grid, times).
    truth_volume [nx, ny, nz] float32: time-averaged vessel attenuation mean_k mu(x, t_k) (1/mm), averaged over
        truth_supersample^3 points per voxel (partial volume).
    truth_mask [nx, ny, nz] bool: voxel centre inside a vessel that is filled at some frame time.
    truth_mesh (vertices [V, 3] world mm, faces [F, 3] int64): surface of the filled vessels (marching cubes of
        the analytic signed distance, outward normals).
    clean_dsa [N, H, W] float32: noise-, scatter- and motion-free DSA (the exact vessel line integrals,
        sub-pixel averaged).
    tree: the :class:`VesselTree`; field: the :class:`VesselField`; ellipsoids: the background anatomy.
    """

    case: Case
    truth_volume: np.ndarray
    truth_mask: np.ndarray
    truth_mesh: tuple
    clean_dsa: np.ndarray
    config: PhantomConfig
    tree: VesselTree
    field: VesselField
    ellipsoids: list
    timings: dict = dc_field(default_factory=dict)

    @property
    def grid(self) -> VolumeGrid:
        return self.case.grid

    @property
    def geometry(self) -> ConeBeamGeometry:
        return self.case.geometry

    @property
    def times(self) -> np.ndarray:
        return self.case.times

    def line_integrals(self, origins, directions, t):
        """Vessel line integrals ∫ mu(x, t) ds (dimensionless) along origins + s * directions.

        origins [3] or [R, 3] mm, directions [R, 3] (any length, normalised internally; any leading shape),
        t scalar or per ray (normalised time).  Numpy in -> numpy out; torch in -> torch out.
        """
        with torch_threads(self.config.threads):
            return self.field.line_integrals(origins, directions, t)

    def attenuation(self, points, t):
        """Vessel attenuation mu(x, t) (1/mm) at points [..., 3] mm; t scalar or per point."""
        with torch_threads(self.config.threads):
            return self.field.attenuation(points, t)

    def background_line_integrals(self, origins, directions):
        """∫ mu_background ds (dimensionless) along origins [3] or [..., 3] + s * directions [..., 3] (mm), in the
        fill-run pose.  Same kind (numpy / torch) as `directions`."""
        d = as_f64(directions)
        d = d / d.norm(dim=-1, keepdim=True)
        o = torch.broadcast_to(as_f64(origins), d.shape)
        return match_kind(background_line_integrals(o, d, self.ellipsoids), directions)

    def background_attenuation(self, points):
        """Background attenuation (1/mm) at points [..., 3] mm.  Same kind as `points`."""
        return match_kind(background_attenuation(as_f64(points), self.ellipsoids), points)

    @property
    def tubes(self) -> dict:
        """The analytic vessel capsules as numpy arrays: p0, p1 [C, 3] mm, radius [C] mm, kind [C] (0 artery,
        1 vein), branch [C], arrival [C] (normalised time at which contrast reaches the capsule)."""
        t = self.tree
        return {"p0": t.p0, "p1": t.p1, "radius": t.radius, "kind": t.kind, "branch": t.branch,
                "arrival": self.field.contrast.arrival.numpy()}

    def volume_at(self, t, supersample: int | None = None) -> np.ndarray:
        """Vessel-only attenuation volume at time t (4D ground truth): [nx, ny, nz] float32 (1/mm), voxel means
        over supersample^3 points (default: config.truth_supersample)."""
        f = self.config.truth_supersample if supersample is None else int(supersample)
        with torch_threads(self.config.threads):
            return self.field.grid_mean(self.grid, [float(t)], f)

    def frame_indices_filled(self, capsule: int, threshold: float = 0.5) -> np.ndarray:
        """Frames at which a capsule's concentration is at least `threshold` of its phase peak."""
        tab = self.field.contrast.table(self.times)[capsule].numpy()
        return np.nonzero(tab >= threshold * tab.max())[0] if tab.max() > 0 else np.zeros(0, np.int64)


def _domain(config: PhantomConfig, grid: VolumeGrid, ellipsoids) -> Domain:
    hx, hy, hz = 0.5 * grid.physical_size
    if ellipsoids:
        inner = inner_skull(ellipsoids)
        return Domain(min(hx, hy), hz, config.margin_mm, inner.centre, inner.matrix, min(inner.semi_axes))
    return Domain(min(hx, hy), hz, config.margin_mm)


def build_tree(config: PhantomConfig, grid: VolumeGrid, ellipsoids) -> VesselTree:
    """The seeded arterial (+ venous) tree of a configuration."""
    rng = np.random.default_rng(config.seed)
    dom = _domain(config, grid, ellipsoids)
    common = dict(length_per_radius=config.length_per_radius, tortuosity_deg=config.tortuosity_deg,
                  piece_length=config.piece_length, max_generations=config.max_generations)
    art = TreeParams(config.artery_root_radius, config.artery_min_radius, max_branches=config.max_branches, **common)
    arterial = grow_arterial_tree(rng, dom, art, 0.5 * grid.physical_size[2])
    venous = None
    if config.include_veins:
        ven = TreeParams(config.vein_root_radius, config.vein_min_radius,
                         max_branches=max(3, config.max_branches // 2), **common)
        venous = grow_venous_tree(rng, dom, ven)
    return assemble_tree(arterial, venous, config.flow_step)


def build_contrast(config: PhantomConfig, tree: VesselTree) -> ContrastModel:
    artery = BolusParams(config.artery_arrival, config.artery_transit, config.artery_tmax, config.artery_alpha, 1.0)
    vein = BolusParams(config.vein_arrival, config.vein_transit, config.vein_tmax, config.vein_alpha,
                       config.vein_scale)
    arr = arrival_times(tree.path_from_root, tree.path_to_leaf, tree.kind, artery, vein)
    return ContrastModel(arr, tree.kind, config.peak_mu, artery, vein, config.static)


def _mesh(field: VesselField, grid: VolumeGrid, capsules: torch.Tensor, factor: int):
    from skimage.measure import marching_cubes

    if capsules.numel() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    sdf, first, step = field.grid_sdf(grid, capsules, factor, band=2.0 * max(grid.spacing) / factor)
    if not (sdf.min() < 0 < sdf.max()):  # no lattice point inside a vessel: nothing to mesh
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    verts, faces, _, _ = marching_cubes(sdf, level=0.0, spacing=tuple(float(s) for s in step),
                                        allow_degenerate=False)
    verts = verts.astype(np.float64) + first
    faces = faces.astype(np.int64)
    tri = verts[faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if signed_volume < 0:  # make the normals point outwards (right-handed faces, positive enclosed volume)
        faces = faces[:, ::-1].copy()
    return verts, faces


def make_phantom(config: PhantomConfig | str = "demo", on_frame=None) -> Phantom:
    """Generate the phantom described by `config` (a :class:`PhantomConfig` or a preset name).

    on_frame(k, n): optional progress callback, called before frame k of n is simulated.
    """
    if isinstance(config, str):
        config = PhantomConfig.preset(config)
    config.validate()
    with torch_threads(config.threads):
        return _make_phantom(config, on_frame)


def _make_phantom(config: PhantomConfig, on_frame=None) -> Phantom:
    tick = time.perf_counter()
    timings = {}
    grid = VolumeGrid(config.volume_resolution, config.volume_spacing)
    ellipsoids = head_ellipsoids(config.mu_tissue, config.mu_bone) if config.background else []
    # the venous/arterial domain always uses the head shape, even without background attenuation
    tree = build_tree(config, grid, head_ellipsoids(config.mu_tissue, config.mu_bone))
    contrast = build_contrast(config, tree)
    field_ = VesselField(tree, contrast, config.device)
    geometry = make_geometry(config, grid)
    times = frame_times(config.n_frames)
    timings["tree_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    runs = simulate_runs(config, geometry, field_, ellipsoids, times, on_frame)
    timings["projection_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    truth_volume = field_.grid_mean(grid, times, config.truth_supersample)
    filled = torch.nonzero(contrast.ever_filled(times, FILLED_THRESHOLD)).reshape(-1).to(field_.device)
    truth_mask = field_.grid_mask(grid, filled)
    r_min = float(tree.radius[filled.cpu().numpy()].min()) if filled.numel() else 1.0
    factor = config.mesh_supersample or auto_mesh_factor(grid, r_min)
    truth_mesh = _mesh(field_, grid, filled, factor)
    timings["truth_s"] = time.perf_counter() - tick

    meta = {"phantom": True, "phantom_preset": config.name, "phantom_seed": config.seed}
    case = Case(dsa=runs["dsa"], geometry=geometry, grid=grid, times=times, fill=runs["fill"], mask=runs["mask"],
                name=config.name, meta=meta)
    log.info("phantom %s: %d capsules, %d frames %dx%d, timings %s", config.name, tree.n_capsules,
             geometry.n_frames, geometry.height, geometry.width, timings)
    return Phantom(case=case, truth_volume=truth_volume, truth_mask=truth_mask, truth_mesh=truth_mesh,
                   clean_dsa=runs["clean_dsa"], config=config, tree=tree, field=field_, ellipsoids=ellipsoids,
                   timings=timings)


def write_phantom(phantom: Phantom, folder, sequence_frames: int | None = None) -> dict:
    """Write the case folder (drgs_core.io.write_case) plus ``truth/``: volume.nii.gz, mask.nii.gz, mesh.stl,
    mesh.vtk, clean_dsa.nii.gz, phantom.json (configuration and tree summary) and tree.json (centrelines, radii
    and per-capsule arrival times).  With `sequence_frames` = T, also volume_4d.seq.nrrd: the vessel volume at T
    evenly spaced frame times (a 3D Slicer sequence; T x the volume's memory).

    Returns a dict of the written paths.
    """
    from ..io import write_case, write_labelmap, write_mesh, write_sequence_nrrd, write_stack, write_volume

    folder = Path(folder)
    write_case(phantom.case, folder)
    truth = folder / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    grid = phantom.grid
    paths = {"case": folder}
    paths["volume"] = truth / "volume.nii.gz"
    write_volume(paths["volume"], phantom.truth_volume, grid)
    paths["mask"] = truth / "mask.nii.gz"
    write_labelmap(paths["mask"], phantom.truth_mask.astype(np.uint8), grid)
    verts, faces = phantom.truth_mesh
    for ext in ("stl", "vtk"):
        paths[f"mesh_{ext}"] = truth / f"mesh.{ext}"
        write_mesh(paths[f"mesh_{ext}"], verts, faces)
    paths["clean_dsa"] = truth / "clean_dsa.nii.gz"
    write_stack(paths["clean_dsa"], phantom.clean_dsa, phantom.geometry.detector_spacing)
    info = {
        "config": phantom.config.to_dict(),
        "tree": phantom.tree.summary(),
        "units": {"volume": "1/mm, time-averaged vessel attenuation", "mesh": "world mm (LPS)",
                  "clean_dsa": "dimensionless line integral", "times": "normalised t_k = k/N"},
        "filled_threshold": FILLED_THRESHOLD,
        "background": [{"name": e.name, "centre_mm": list(e.centre), "semi_axes_mm": list(e.semi_axes),
                        "weight_per_mm": e.weight} for e in phantom.ellipsoids],
    }
    if sequence_frames:
        n = phantom.case.n_frames
        frames = np.unique(np.linspace(0, n - 1, int(sequence_frames)).round().astype(int))
        times = phantom.times[frames]
        volumes = np.stack([phantom.volume_at(t) for t in times])
        paths["volume_4d"] = truth / "volume_4d.seq.nrrd"
        write_sequence_nrrd(paths["volume_4d"], volumes, grid, times)
        info["sequence_frames"] = frames.tolist()
    paths["phantom_json"] = truth / "phantom.json"
    _write_json(paths["phantom_json"], info)
    tree = phantom.tree.to_json()
    tree["arrival_time_per_capsule"] = np.round(phantom.field.contrast.arrival.numpy(), 6).tolist()
    paths["tree_json"] = truth / "tree.json"
    _write_json(paths["tree_json"], tree)
    return paths


def _write_json(path: Path, data: dict):
    try:
        from ..io import atomic_path
    except ImportError:  # pragma: no cover - io module always provides it
        atomic_path = None
    text = json.dumps(data, indent=1)
    if atomic_path is None:
        path.write_text(text)
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
