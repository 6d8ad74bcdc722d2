"""Random vessel trees made of capsules: an arterial tree entering from below and a draining venous tree.

World millimetres (z = rotation axis = superior, LPS: +x left, +y posterior).  A tree is a set of *branches*
(vessel pieces between bifurcations) with constant radius; each branch is a slightly tortuous polyline.  At a
bifurcation the parent radius r and the child radii obey Murray's law r^3 = r1^3 + r2^3 (random split of r^3);
the branching angles are Murray's minimum-work angles, cos θ1 = (r^4 + r1^4 - r2^4) / (2 r^2 r1^2), plus
random jitter.  For rendering, every straight polyline piece is cut into short capsules ("sub-capsules") so
that each carries its own contrast arrival time (see :mod:`.flow`).

The tree is kept inside a convex *domain*: the cylinder inscribed in the volume box (axis z), shrunk by a
margin, intersected with the inner skull ellipsoid shrunk by the same margin.  Because the domain is convex,
a capsule lies inside as soon as the balls at both of its ends do.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import DRGSInputError

log = logging.getLogger(__name__)

ARTERY = 0
VEIN = 1


@dataclass
class TreeParams:
    """Growth parameters of one tree (lengths in mm, angles in degrees)."""

    root_radius: float
    min_radius: float
    length_per_radius: float = 10.0   # branch length ~ length_per_radius * radius * U(0.6, 1.4)
    split_range: tuple = (0.3, 0.7)   # fraction of r^3 that goes to the first child
    angle_jitter_deg: float = 8.0
    tortuosity_deg: float = 7.0       # random turn between consecutive polyline pieces
    piece_length: float = 6.0         # length of the straight polyline pieces
    max_generations: int = 8
    max_branches: int = 60


class Domain:
    """Convex region for vessel centrelines: cylinder r <= rc, |z| <= hz, inside an ellipsoid; all shrunk by margin."""

    def __init__(self, rc: float, hz: float, margin: float, ellipsoid_centre=None, ellipsoid_matrix=None,
                 ellipsoid_min_semi: float = 1.0):
        self.rc, self.hz, self.margin = float(rc), float(hz), float(margin)
        self.e_c = None if ellipsoid_centre is None else np.asarray(ellipsoid_centre, float)
        self.e_m = None if ellipsoid_matrix is None else np.asarray(ellipsoid_matrix, float)
        self.e_min = float(ellipsoid_min_semi)

    def inside(self, p, r: float) -> bool:
        """True if the ball of radius r (mm) at p lies inside the domain with the margin."""
        gap = self.margin + r
        if math.hypot(p[0], p[1]) > self.rc - gap or abs(p[2]) > self.hz - gap:
            return False
        if self.e_m is not None:
            q = self.e_m @ (np.asarray(p) - self.e_c)
            if float(q @ q) > (1.0 - gap / self.e_min) ** 2:
                return False
        return True

    def inward(self, p) -> np.ndarray:
        """Unit vector from p towards the domain centre."""
        v = -np.asarray(p, float)
        n = np.linalg.norm(v)
        return v / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


@dataclass
class Branch:
    """One vessel branch: polyline points [n+1, 3] mm, constant radius (mm)."""

    points: np.ndarray
    radius: float
    kind: int
    parent: int
    generation: int
    children: list = field(default_factory=list)

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())


@dataclass
class VesselTree:
    """All branches (arteries and veins) and their sub-capsules.

    Per capsule ([C] arrays): p0, p1 [C, 3] mm, radius mm, kind (ARTERY/VEIN), branch index,
    path_from_root (mm of centreline from the tree root to the capsule midpoint),
    path_to_leaf (mm of centreline from the capsule midpoint to the nearest leaf downstream of it).
    bifurcations [B, 3]: (parent, child1, child2) branch indices.
    """

    branches: list
    p0: np.ndarray
    p1: np.ndarray
    radius: np.ndarray
    kind: np.ndarray
    branch: np.ndarray
    path_from_root: np.ndarray
    path_to_leaf: np.ndarray
    bifurcations: np.ndarray

    @property
    def n_capsules(self) -> int:
        return int(self.radius.size)

    def summary(self) -> dict:
        out = {}
        for name, k in (("arteries", ARTERY), ("veins", VEIN)):
            br = [b for b in self.branches if b.kind == k]
            out[name] = {
                "branches": len(br),
                "leaves": sum(1 for b in br if not b.children),
                "total_length_mm": float(sum(b.length for b in br)),
                "radius_range_mm": [float(min((b.radius for b in br), default=0)),
                                    float(max((b.radius for b in br), default=0))],
            }
        out["capsules"] = self.n_capsules
        return out

    def to_json(self) -> dict:
        """Centrelines and radii of every branch (world mm), for the truth folder."""
        return {
            "units": "mm, world frame (LPS, isocentre origin)",
            "branches": [
                {"kind": "artery" if b.kind == ARTERY else "vein", "radius_mm": b.radius, "parent": b.parent,
                 "children": list(b.children), "generation": b.generation,
                 "points_mm": np.round(b.points, 4).tolist()}
                for b in self.branches
            ],
            "bifurcations": self.bifurcations.tolist(),
        }


# ----------------------------------------------------------------------------------------------------------
# growth
# ----------------------------------------------------------------------------------------------------------
def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _perpendicular(d: np.ndarray) -> np.ndarray:
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    return _unit(np.cross(d, helper))


def _turn(d: np.ndarray, angle: float, azimuth: float) -> np.ndarray:
    """Rotate unit d by `angle` (rad) away from itself, towards the perpendicular at `azimuth` (rad)."""
    e1 = _perpendicular(d)
    e2 = np.cross(d, e1)
    e = math.cos(azimuth) * e1 + math.sin(azimuth) * e2
    return _unit(math.cos(angle) * d + math.sin(angle) * e)


def murray_angle(r: float, r_a: float, r_b: float) -> float:
    """Murray's minimum-work angle (rad) between parent (r) and child a (r_a), sibling r_b."""
    c = (r ** 4 + r_a ** 4 - r_b ** 4) / (2.0 * r ** 2 * r_a ** 2)
    return math.acos(max(-1.0, min(1.0, c)))


def grow_polyline(rng, start, direction, length: float, radius: float, domain: Domain, params: TreeParams):
    """A tortuous polyline from `start` along `direction`, staying in the domain.

    Returns (points [n+1, 3], complete): complete is False if the domain stopped it early.
    """
    n = max(1, int(math.ceil(length / params.piece_length)))
    step = length / n
    pts = [np.asarray(start, float)]
    d = _unit(direction)
    tort = math.radians(params.tortuosity_deg)
    for i in range(n):
        if i > 0:
            d = _turn(d, abs(rng.normal(0.0, tort)), rng.uniform(0, 2 * math.pi))
        p = pts[-1]
        ok = False
        for attempt in range(10):
            q = p + step * d
            if domain.inside(q, radius):
                ok = True
                break
            d = _unit(d + 0.3 * (attempt + 1) * domain.inward(p))
        if not ok:
            return np.array(pts), False
        pts.append(q)
    return np.array(pts), True


def _branch_length(rng, radius: float, params: TreeParams) -> float:
    return max(3.0 * radius, params.length_per_radius * radius * rng.uniform(0.6, 1.4))


def _try_bifurcation(rng, parent: Branch, domain: Domain, params: TreeParams):
    """Sample a Murray bifurcation at the end of `parent`.

    Returns [(points, radius, complete), (points, radius, complete)] for the two children, or None when the
    parent is too thin to split into two children of at least min_radius or no placement fits the domain.
    """
    r = parent.radius
    frac_min = (params.min_radius / r) ** 3
    lo = max(params.split_range[0], frac_min)
    hi = min(params.split_range[1], 1.0 - frac_min)
    if lo > hi:
        return None
    end = parent.points[-1]
    d = _unit(parent.points[-1] - parent.points[-2])
    jit = math.radians(params.angle_jitter_deg)
    for _ in range(8):
        s = rng.uniform(lo, hi)
        r1, r2 = r * s ** (1.0 / 3.0), r * (1.0 - s) ** (1.0 / 3.0)
        th1 = min(max(murray_angle(r, r1, r2) + rng.normal(0, jit), math.radians(5)), math.radians(85))
        th2 = min(max(murray_angle(r, r2, r1) + rng.normal(0, jit), math.radians(5)), math.radians(85))
        az = rng.uniform(0, 2 * math.pi)
        d1, d2 = _turn(d, th1, az), _turn(d, th2, az + math.pi)
        c1, ok1 = grow_polyline(rng, end, d1, _branch_length(rng, r1, params), r1, domain, params)
        c2, ok2 = grow_polyline(rng, end, d2, _branch_length(rng, r2, params), r2, domain, params)
        if len(c1) >= 2 and len(c2) >= 2:
            return [(c1, r1, ok1), (c2, r2, ok2)]
    return None


def _grow_subtrees(rng, branches: list, queue: deque, domain: Domain, params: TreeParams, budget: int):
    """Breadth-first bifurcation of queued branch indices until the branch budget is used."""
    bifs = []
    while queue and budget > 1:
        bi = queue.popleft()
        parent = branches[bi]
        if parent.generation >= params.max_generations:
            continue
        kids = _try_bifurcation(rng, parent, domain, params)
        if kids is None:
            continue
        ids = []
        for pts, rad, complete in kids:
            branches.append(Branch(pts, rad, parent.kind, bi, parent.generation + 1))
            ids.append(len(branches) - 1)
            if complete:
                queue.append(ids[-1])
        parent.children = ids
        bifs.append((bi, ids[0], ids[1]))
        budget -= 2
    return bifs


def grow_arterial_tree(rng, domain: Domain, params: TreeParams, box_half_z: float):
    """Arterial tree whose root enters from the inferior (-z) side, internal-carotid-like (off midline)."""
    branches: list = []
    r0 = params.root_radius
    start = None
    for _ in range(50):
        side = rng.choice([-1.0, 1.0])
        xy = (side * rng.uniform(0.1, 0.3) * domain.rc, rng.uniform(-0.25, 0.05) * domain.rc)
        # lowest point of the domain above (x, y): the vessel enters there from below (through the skull base)
        for z in np.arange(-box_half_z + domain.margin + r0 + 0.5, 0.0, 1.0):
            if domain.inside((xy[0], xy[1], z), r0):
                start = np.array([xy[0], xy[1], z])
                break
        if start is not None:
            break
    if start is None:
        raise DRGSInputError("the volume box is too small for the vessel tree",
                             f"no room for a root of radius {r0} mm with a margin of {domain.margin} mm",
                             "a box of at least ~80 mm", "enlarge the volume or reduce margin_mm/radii")
    top = box_half_z - domain.margin
    direction = _turn(np.array([0.0, 0.0, 1.0]), math.radians(rng.uniform(0, 12)), rng.uniform(0, 2 * math.pi))
    root_len = rng.uniform(0.30, 0.42) * (top - start[2])
    pts, complete = grow_polyline(rng, start, direction, root_len, r0, domain, params)
    branches.append(Branch(pts, r0, ARTERY, -1, 0))
    queue = deque([0] if complete else [])
    bifs = _grow_subtrees(rng, branches, queue, domain, params, params.max_branches - 1)
    return branches, bifs


def grow_venous_tree(rng, domain: Domain, params: TreeParams):
    """Sinus-like venous tree: a midline trunk along an arc over the top (the drain, i.e. the root, sits at the
    posterior-inferior end) with Murray side tributaries that grow into random subtrees.

    Returns (branches, bifurcations) with branch indices local to this tree.
    """
    r0 = params.root_radius
    zc = -0.15 * domain.hz
    rho = min(domain.rc, domain.hz - zc) - domain.margin - r0 - 2.0
    psi0, psi1 = math.radians(-25.0), math.radians(150.0)
    x_off = rng.uniform(-0.03, 0.03) * domain.rc

    def arc(psi):
        return np.array([x_off, rho * math.cos(psi), zc + rho * math.sin(psi)])

    while rho > 10 and not all(domain.inside(arc(p), r0) for p in np.linspace(psi0, psi1, 90)):
        rho *= 0.95

    def trunk_polyline(psi_a, radius, start=None):
        seg_len = 1.5 * _branch_length(rng, radius, params)
        psi_b = min(psi1, psi_a + seg_len / rho)
        n = max(2, int(math.ceil((psi_b - psi_a) * rho / params.piece_length)))
        ps = np.linspace(psi_a, psi_b, n + 1)
        pts = np.array([arc(p) for p in ps])
        pts[1:] += rng.normal(0, 0.5, size=(n, 3))
        for j in range(1, n + 1):  # keep jittered points only where they stay inside
            if not domain.inside(pts[j], radius):
                pts[j] = arc(ps[j])
        if start is not None:
            pts[0] = start
        return pts, psi_b

    pts, psi = trunk_polyline(psi0, r0)
    branches = [Branch(pts, r0, VEIN, -1, 0)]
    bifs, tributaries = [], []
    cur, radius = 0, r0
    side = float(rng.choice([-1.0, 1.0]))
    while psi < psi1 - 1e-9 and len(branches) + 2 <= params.max_branches:
        frac_min = (params.min_radius / radius) ** 3
        s = rng.uniform(0.72, 0.88)
        s = min(s, 1.0 - frac_min)
        if s <= 0.5:
            break
        r_trunk, r_trib = radius * s ** (1.0 / 3.0), radius * (1.0 - s) ** (1.0 / 3.0)
        end = branches[cur].points[-1]
        tangent = _unit(end - branches[cur].points[-2])
        placed = None
        for _ in range(8):
            th = math.radians(rng.uniform(45.0, 80.0))
            outward = 0.8 * np.array([side, 0.0, 0.0]) + rng.uniform(0.0, 0.6) * domain.inward(end)
            outward = outward + rng.normal(0, 0.15, 3)
            outward = _unit(outward - (outward @ tangent) * tangent)
            d = _unit(math.cos(th) * tangent + math.sin(th) * outward)
            tp, complete = grow_polyline(rng, end, d, _branch_length(rng, r_trib, params), r_trib, domain, params)
            if len(tp) >= 2:
                placed = (tp, complete)
                break
        if placed is None:
            break
        cont_pts, psi = trunk_polyline(psi, r_trunk, start=end)
        branches.append(Branch(cont_pts, r_trunk, VEIN, cur, 0))
        cont = len(branches) - 1
        branches.append(Branch(placed[0], r_trib, VEIN, cur, 1))
        trib = len(branches) - 1
        branches[cur].children = [cont, trib]
        bifs.append((cur, cont, trib))
        if placed[1]:
            tributaries.append(trib)
        cur, radius, side = cont, r_trunk, -side
    bifs += _grow_subtrees(rng, branches, deque(tributaries), domain, params,
                           params.max_branches - len(branches))
    return branches, bifs


def _sub_capsules(branches: list, flow_step: float):
    """Cut every polyline piece into capsules of length <= flow_step; arc positions along the branch."""
    rows = []
    for bi, b in enumerate(branches):
        s0 = 0.0
        for a, c in zip(b.points[:-1], b.points[1:]):
            seg = np.linalg.norm(c - a)
            m = max(1, int(math.ceil(seg / flow_step - 1e-9)))
            for j in range(m):
                f0, f1 = j / m, (j + 1) / m
                rows.append((a + f0 * (c - a), a + f1 * (c - a), b.radius, b.kind, bi, s0 + 0.5 * (f0 + f1) * seg))
            s0 += seg
    return rows


def assemble_tree(arterial: tuple, venous: tuple | None, flow_step: float) -> VesselTree:
    """Join the arterial and (optional) venous trees into one :class:`VesselTree` with sub-capsules.

    arterial, venous: (branches, bifurcations) with local indices.  flow_step: sub-capsule length (mm).
    """
    branches = list(arterial[0])
    bifs = [tuple(b) for b in arterial[1]]
    if venous is not None:
        off = len(branches)
        for b in venous[0]:
            b.parent = b.parent + off if b.parent >= 0 else -1
            b.children = [c + off for c in b.children]
            branches.append(b)
        bifs += [(a + off, b + off, c + off) for a, b, c in venous[1]]
    # arc length from the root at each branch start, and nearest-leaf distance from each branch end
    lengths = np.array([b.length for b in branches])
    start = np.zeros(len(branches))
    for i, b in enumerate(branches):  # parents always precede children
        if b.parent >= 0:
            start[i] = start[b.parent] + lengths[b.parent]
    to_leaf_end = np.zeros(len(branches))
    for i in range(len(branches) - 1, -1, -1):
        kids = branches[i].children
        if kids:
            to_leaf_end[i] = min(lengths[c] + to_leaf_end[c] for c in kids)
    rows = _sub_capsules(branches, flow_step)
    p0 = np.array([r[0] for r in rows])
    p1 = np.array([r[1] for r in rows])
    radius = np.array([r[2] for r in rows])
    kind = np.array([r[3] for r in rows], dtype=np.int64)
    br = np.array([r[4] for r in rows], dtype=np.int64)
    s_in = np.array([r[5] for r in rows])
    return VesselTree(
        branches=branches, p0=p0, p1=p1, radius=radius, kind=kind, branch=br,
        path_from_root=start[br] + s_in,
        path_to_leaf=to_leaf_end[br] + (lengths[br] - s_in),
        bifurcations=np.array(bifs, dtype=np.int64).reshape(-1, 3),
    )
