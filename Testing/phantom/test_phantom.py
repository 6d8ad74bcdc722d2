"""The synthetic DSA phantom: exactness, flow, anatomy of the tree, truth consistency, determinism, presets."""

import math

import numpy as np
import pytest
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.phantom import PRESETS, PhantomConfig, make_phantom, preset
from drgs_core.phantom.acquisition import cover_points, subpixel_directions
from drgs_core.phantom.tree import ARTERY, VEIN
from drgs_core.phantom.tubes import segment_distance


# ---------------------------------------------------------------------------------------------------------------
# preset and timing
# ---------------------------------------------------------------------------------------------------------------
def test_demo_preset_is_cpu_sized_and_fast(demo_timed):
    phantom, seconds = demo_timed
    assert seconds < 10.0, f"demo generation took {seconds:.1f} s"
    case = phantom.case
    assert case.dsa.shape == (60, 96, 96) and case.fill.shape == case.mask.shape == (60, 96, 96)
    assert phantom.truth_volume.shape == (64, 64, 64) and phantom.truth_mask.shape == (64, 64, 64)
    assert phantom.clean_dsa.shape == (60, 96, 96)
    assert np.allclose(case.times, np.arange(60) / 60)
    angles = np.degrees(case.geometry.primary_angles)
    assert angles[0] == pytest.approx(-100) and angles[-1] == pytest.approx(100)
    # vessels give DSA line integrals of the order of real DSA (~0.5..2; more only where a vessel is end-on)
    signal = phantom.clean_dsa[phantom.clean_dsa > 0.05]
    assert 0.5 < np.percentile(signal, 99) < 2.5 and float(signal.max()) < 8.0
    root = np.nonzero(phantom.tree.branch == 0)[0]
    assert 2 * phantom.tree.radius[root[0]] * phantom.config.peak_mu == pytest.approx(1.25)


def test_paper_presets_sizes():
    paper = preset("paper")
    assert paper.n_frames == 133 and paper.detector_shape == (512, 512) and paper.volume_resolution == (256,) * 3
    assert preset("paper1024").detector_shape == (1024, 1024)
    assert set(PRESETS) == {"demo", "paper", "paper1024", "hard", "hard-demo"}
    assert paper.angle_stop_deg - paper.angle_start_deg == pytest.approx(200)
    assert (paper.sad, paper.sid) == (750.0, 1200.0)


def test_config_validation_and_round_trip():
    with pytest.raises(DRGSInputError):
        preset("demo", n_frames=0)
    with pytest.raises(DRGSInputError):
        preset("demo", sad=1300.0)
    with pytest.raises(DRGSInputError):
        preset("demo", pixel_average="median")
    with pytest.raises(DRGSInputError):
        preset("demo", artery_min_radius=5.0)
    with pytest.raises(DRGSInputError):
        preset("nope")
    with pytest.raises(DRGSInputError):
        PhantomConfig.from_dict({"n_frame": 3})
    cfg = preset("demo", seed=4, motion_shift_mm=[0.3, 0, 0])
    assert PhantomConfig.from_dict(cfg.to_dict()) == cfg


def test_detector_covers_the_field_of_view(demo):
    g = demo.geometry
    uv, depth = g.project(cover_points(demo.grid, "fov"))
    assert (depth > 0).all()
    assert uv[..., 0].min() >= -0.5 and uv[..., 0].max() <= g.width - 0.5
    assert uv[..., 1].min() >= -0.5 and uv[..., 1].max() <= g.height - 0.5
    # ... with little waste: the FOV reaches close to the detector border
    assert uv[..., 0].max() > g.width - 6 or uv[..., 1].max() > g.height - 6


# ---------------------------------------------------------------------------------------------------------------
# exactness of the projections
# ---------------------------------------------------------------------------------------------------------------
def test_line_integrals_match_brute_force_marching(demo):
    rng = np.random.default_rng(11)
    tree = demo.tree
    for t in (0.12, 0.3, 0.8):
        filled = np.nonzero(demo.field.contrast.values(t).numpy() > 0)[0]
        caps = rng.choice(filled, 25, replace=False)
        target = 0.5 * (tree.p0[caps] + tree.p1[caps]) + rng.normal(0, 0.6, (25, 3))
        dirs = rng.normal(size=(25, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = target - 400 * dirs
        exact = demo.line_integrals(origins, dirs, t)
        assert np.array_equal(demo.line_integrals(origins, dirs, np.full(25, t)), exact)  # per-ray times
        ns = 32000
        s = 400 - 80 + (np.arange(ns) + rng.random(ns)) / ns * 160  # stratified samples over 160 mm
        mu = demo.attenuation(origins[:, None] + s[None, :, None] * dirs[:, None], t)
        brute = mu.sum(1) * 160 / ns
        big = exact > 0.05
        assert big.sum() >= 5
        assert np.max(np.abs(exact - brute)[big] / exact[big]) < 0.01
        assert np.max(np.abs(exact - brute)) < 0.01


def test_frame_projection_equals_generic_line_integrals(demo):
    g = demo.geometry
    for k in (9, 40):
        d = subpixel_directions(g, k, 2, "cpu")
        per_frame = demo.field.frame_integrals(g, k, demo.times[k], d)
        rng = np.random.default_rng(k)
        pick = torch.as_tensor(rng.choice(d.shape[0] * d.shape[1], 800, replace=False))
        dd = d.reshape(-1, 4, 3)[pick].reshape(-1, 3)
        src = torch.as_tensor(g.source_positions([k])[0])
        generic = demo.line_integrals(src, dd, demo.times[k])
        ref = per_frame.reshape(-1, 4)[pick].reshape(-1)
        assert float(ref.max()) > 0.3
        assert torch.allclose(generic, ref, atol=1e-9)
        # the stored clean DSA is the mean of the 2x2 sub-ray integrals
        assert np.allclose(demo.clean_dsa[k], per_frame.mean(-1).numpy(), atol=1e-6)


def _subpixel_line_integrals(ph, k):
    """Mean of the vessel line integrals of the 2x2 sub-rays of every pixel of frame k (via geometry.rays)."""
    g = ph.geometry
    off = np.array([-0.25, 0.25])
    u = torch.arange(g.width, dtype=torch.float64)[None, :, None, None] + torch.as_tensor(off)[None, None, None, :]
    v = torch.arange(g.height, dtype=torch.float64)[:, None, None, None] + torch.as_tensor(off)[None, None, :, None]
    u, v = torch.broadcast_to(u, (g.height, g.width, 2, 2)), torch.broadcast_to(v, (g.height, g.width, 2, 2))
    src, dirs = g.rays(frames=[k], u=u, v=v, dtype=torch.float64)
    return ph.line_integrals(src[0], dirs[0], ph.times[k]).mean(dim=(-1, -2)).numpy()


def test_clean_runs_reproduce_vessel_integrals(clean_small):
    ph = clean_small
    assert ph.config.noise is False and ph.config.scatter_fraction == 0 and not ph.config.has_motion
    assert float(ph.clean_dsa.max()) > 0.5
    assert np.abs(ph.case.dsa - ph.clean_dsa).max() < 1e-5
    # independent route: geometry.rays at the 2x2 sub-pixel positions and the public line_integrals
    k = 6
    assert np.abs(_subpixel_line_integrals(ph, k) - ph.clean_dsa[k]).max() < 1e-5
    # the mask run holds the head: intensities well below I0 in the middle of the detector
    g = ph.geometry
    mid = ph.case.mask[:, g.height // 2, g.width // 2]
    assert (mid < 0.2 * ph.config.photons).all()


def test_secondary_angle_geometry(small):
    """A tilted C-arm (secondary angle) goes through the same geometry: DSA = line integrals, points land on vessels."""
    ph = make_phantom(small(noise=False, secondary_angle_deg=15.0, n_frames=6))
    g = ph.geometry
    assert np.allclose(np.degrees(g.secondary_angles), 15.0)
    assert np.abs(ph.case.dsa - ph.clean_dsa).max() < 1e-5
    k = 1
    assert np.abs(_subpixel_line_integrals(ph, k) - ph.clean_dsa[k]).max() < 1e-5
    tubes = ph.tubes
    filled = np.nonzero(ph.field.contrast.values(ph.times[k]).numpy() > 0.05)[0]  # 1/mm
    big = filled[tubes["radius"][filled] > 1.5][:20]
    assert big.size >= 5
    mids = 0.5 * (tubes["p0"][big] + tubes["p1"][big])
    uv, _ = g.project(mids, frames=[k])
    u, v = np.round(uv[0]).astype(int).T
    assert np.all(ph.clean_dsa[k, v, u] > 0.1)


def test_background_cancels_and_is_head_sized(clean_small):
    ph = clean_small
    g = ph.geometry
    src, dirs = g.rays(frames=[0], dtype=torch.float64)
    bg = ph.background_line_integrals(src[0], dirs[0]).numpy()
    mask_lines = -np.log(ph.case.mask[0] / ph.config.photons)
    # the mask run is the background alone (2x2 sub-pixel mean vs centre ray: close)
    assert np.corrcoef(bg.ravel(), mask_lines.ravel())[0, 1] > 0.99
    assert 2.0 < float(bg.max()) < 8.0
    assert float(ph.background_attenuation(np.zeros(3))) == pytest.approx(ph.config.mu_tissue)


def test_intensity_average_mode(small, clean_small):
    ph = make_phantom(small(noise=False, pixel_average="intensity"))
    assert np.abs(ph.case.dsa - ph.clean_dsa).max() < 1e-5
    ref = clean_small.clean_dsa
    # partial-volume non-linearity at vessel edges only (coarse 48x48 pixels here: under ~10% overall)
    assert np.abs(ph.clean_dsa - ref).sum() / ref.sum() < 0.12
    # -log(mean exp(-V)) <= mean V (Jensen; exact for a uniform background, nearly so for the smooth head)
    assert np.all(ph.clean_dsa <= ref + 0.03)
    assert (ph.clean_dsa - ref).min() < -0.05  # and the non-linearity is really there


def test_noise_scatter_and_motion(small, clean_small):
    noisy = make_phantom(small())
    assert np.array_equal(noisy.clean_dsa, clean_small.clean_dsa)
    # Poisson noise: residual std matches the photon statistics where the DSA is not clipped
    resid = noisy.case.dsa.astype(np.float64) - noisy.clean_dsa
    sel = noisy.clean_dsa > 0.6
    predicted = np.sqrt(1.0 / noisy.case.fill[sel] + 1.0 / noisy.case.mask[sel])
    assert 0.7 < resid[sel].std() / predicted.mean() < 1.4
    assert abs(resid[sel].mean()) < 3 * predicted.mean() / math.sqrt(sel.sum()) + 2e-3
    # scatter reduces the apparent vessel contrast
    scat = make_phantom(small(noise=False, scatter_fraction=0.2))
    vessel = clean_small.clean_dsa > 0.3
    ratio = scat.case.dsa[vessel] / clean_small.clean_dsa[vessel]
    assert 0.5 < ratio.mean() < 0.98
    # misregistration of the mask run leaves background residuals (edges of the skull), vessels unchanged
    moved = make_phantom(small(noise=False, motion_shift_mm=(1.0, 0.5, 0.0), motion_rotation_deg=(0.0, 0.0, 0.5)))
    assert np.array_equal(moved.clean_dsa, clean_small.clean_dsa)
    diff = np.abs(moved.case.dsa - clean_small.case.dsa)
    assert diff.max() > 0.05


# ---------------------------------------------------------------------------------------------------------------
# flow
# ---------------------------------------------------------------------------------------------------------------
def test_flow_front_early_frame(demo):
    tree, contrast, cfg = demo.tree, demo.field.contrast, demo.config
    arteries = np.nonzero(tree.kind == ARTERY)[0]
    k = int(round((cfg.artery_arrival + 0.5 * cfg.artery_transit) * cfg.n_frames))
    t = demo.times[k]
    val = contrast.values(t).numpy()
    filled = arteries[val[arteries] > 0]
    empty = arteries[val[arteries] == 0]
    assert filled.size > 10 and empty.size > 10
    # the front is a path-length level set: everything filled is more proximal than everything empty
    assert tree.path_from_root[filled].max() < tree.path_from_root[empty].min()
    # proximal (root) point attenuates now; the most distal one does not, but does later
    root = arteries[np.argmin(tree.path_from_root[arteries])]
    distal = arteries[np.argmax(tree.path_from_root[arteries])]
    p_root = 0.5 * (tree.p0[root] + tree.p1[root])
    p_dist = 0.5 * (tree.p0[distal] + tree.p1[distal])
    assert demo.attenuation(p_root, t) > 0.1 and demo.attenuation(p_dist, t) == 0
    late = demo.times[k + 8]
    assert demo.attenuation(p_dist, late) > 0.1
    # and in the image: the root projects onto DSA signal at frame k
    uv, _ = demo.geometry.project(p_root[None], frames=[k])
    u, v = np.round(uv[0, 0]).astype(int)
    assert demo.clean_dsa[k, v, u] > 0.3


def test_arrival_time_increases_along_the_tree(demo):
    tree = demo.tree
    arr = demo.field.contrast.arrival.numpy()
    by_branch = {b: arr[tree.branch == b] for b in np.unique(tree.branch)}
    n_checked = 0
    for parent, c1, c2 in tree.bifurcations:
        kind = tree.branches[parent].kind
        if kind == ARTERY:  # the bolus flows from the root towards the leaves
            assert by_branch[c1].min() >= by_branch[parent].max() - 1e-12
            assert by_branch[c2].min() >= by_branch[parent].max() - 1e-12
        else:  # draining veins: a vein fills only after one of its tributaries has filled
            assert by_branch[parent].min() >= min(by_branch[c1].max(), by_branch[c2].max()) - 1e-12
        n_checked += 1
    assert n_checked >= 10
    # within an arterial branch, arrival is monotone along the centreline
    for b in np.unique(tree.branch[tree.kind == ARTERY]):
        assert np.all(np.diff(arr[tree.branch == b]) >= 0)


def test_venous_phase_late_and_arterial_washout(demo):
    tree, contrast = demo.tree, demo.field.contrast
    tab = contrast.table(demo.times).numpy()  # [C, N]
    veins, arteries = tree.kind == VEIN, tree.kind == ARTERY
    assert veins.sum() > 20
    early, late = 12, 55
    assert tab[veins, late].mean() > 0.05 and tab[veins, early].max() == 0
    art_curve = tab[arteries].mean(0)
    assert art_curve[late] < 0.1 * art_curve.max()
    assert art_curve.argmax() < tab[veins].mean(0).argmax()
    # in the images: a sinus point is dark late and empty early
    trunk = np.nonzero(veins & (tree.branch == tree.branch[veins].min()))[0][0]
    p = 0.5 * (tree.p0[trunk] + tree.p1[trunk])
    for k, expect_signal in ((early, False), (late, True)):
        uv, _ = demo.geometry.project(p[None], frames=[k])
        u, v = np.round(uv[0, 0]).astype(int)
        assert (demo.clean_dsa[k, v, u] > 0.2) == expect_signal


# ---------------------------------------------------------------------------------------------------------------
# tree anatomy
# ---------------------------------------------------------------------------------------------------------------
def test_murray_law_at_every_bifurcation(demo):
    tree = demo.tree
    assert len(tree.bifurcations) >= 15
    for parent, c1, c2 in tree.bifurcations:
        rp, r1, r2 = (tree.branches[i].radius for i in (parent, c1, c2))
        assert rp ** 3 == pytest.approx(r1 ** 3 + r2 ** 3, rel=1e-12)
        end = tree.branches[parent].points[-1]
        assert np.allclose(tree.branches[c1].points[0], end) and np.allclose(tree.branches[c2].points[0], end)
    cfg = demo.config
    for b in tree.branches:
        lo = cfg.artery_min_radius if b.kind == ARTERY else cfg.vein_min_radius
        assert b.radius >= lo - 1e-12
    # the arterial root enters from the inferior side, going up
    root = tree.branches[0]
    assert root.kind == ARTERY and root.points[0, 2] < -0.3 * demo.grid.physical_size[2]
    assert root.points[-1, 2] > root.points[0, 2] + 20


def test_tree_inside_volume_box_with_margin(demo):
    half = 0.5 * demo.grid.physical_size - demo.config.margin_mm + 1e-9
    r = demo.tree.radius[:, None]
    for p in (demo.tree.p0, demo.tree.p1):
        assert np.all(np.abs(p) + r <= half)
    # nothing of the vessels is on the border voxels of the truth
    m = demo.truth_volume > 0
    assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or m[:, :, -1].any())


# ---------------------------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------------------------
def _sub_points(grid, idx, f):
    off = (np.arange(f) + 0.5) / f - 0.5
    o = np.stack(np.meshgrid(off, off, off, indexing="ij"), -1).reshape(-1, 3) * np.asarray(grid.spacing)
    centres = grid.first_voxel_centre + idx * np.asarray(grid.spacing)
    return centres[:, None, :] + o[None]


def test_truth_volume_is_time_average_of_the_field(demo):
    grid = demo.grid
    rng = np.random.default_rng(0)
    nz = np.argwhere(demo.truth_volume > 0)
    idx = np.concatenate([nz[rng.choice(len(nz), 150, replace=False)],
                          rng.integers(0, 64, (50, 3))])
    pts = _sub_points(grid, idx, demo.config.truth_supersample)
    acc = np.zeros(len(idx))
    for t in demo.times:
        acc += demo.attenuation(pts, t).mean(1)
    acc /= len(demo.times)
    truth = demo.truth_volume[tuple(idx.T)]
    assert np.allclose(truth, acc, rtol=1e-5, atol=1e-7)
    # a single time: volume_at
    t = demo.times[20]
    vol = demo.volume_at(t)
    assert np.allclose(vol[tuple(idx.T)], demo.attenuation(pts, t).mean(1), rtol=1e-5, atol=1e-7)


def test_mask_voxel_projects_onto_positive_dsa(demo):
    grid, geo = demo.grid, demo.geometry
    rng = np.random.default_rng(3)
    idx = np.argwhere(demo.truth_mask)
    assert len(idx) > 300
    tested = 0
    pick = idx[rng.choice(len(idx), 80, replace=False)]
    xs = grid.first_voxel_centre + pick * np.asarray(grid.spacing)
    mu = demo.attenuation(np.repeat(xs[:, None], len(demo.times), 1), demo.times[None, :])  # [80, N]
    assert np.all(mu.max(1) > 0)  # a mask voxel centre is inside a vessel that fills
    for x, mu_t in zip(xs, mu):
        k = int(mu_t.argmax())
        uv, depth = geo.project(x[None], frames=[k])
        u, v = np.round(uv[0, 0]).astype(int)
        assert 0 <= u < geo.width and 0 <= v < geo.height
        assert demo.clean_dsa[k, v, u] > 0.2 * mu_t.max()
        tested += 1
    assert tested == 80


def test_truth_mask_matches_field_for_static_phantom(small):
    ph = make_phantom(small(static=True, noise=False))
    grid = ph.grid
    centres = grid.voxel_centres(dtype=torch.float64).reshape(-1, 3)
    inside = (ph.attenuation(centres, 0.5) > 0).reshape(grid.resolution).numpy()
    assert np.array_equal(inside, ph.truth_mask)
    # static: no time dependence anywhere
    assert np.allclose(ph.truth_volume, ph.volume_at(0.0)) and np.allclose(ph.truth_volume, ph.volume_at(0.97))
    first = ph.clean_dsa[0]
    assert first.max() > 0.5  # filled from the first frame on
    p = 0.5 * (ph.tree.p0[0] + ph.tree.p1[0])
    assert float(ph.attenuation(p, 0.0)) == pytest.approx(ph.config.peak_mu)


def test_truth_mesh_is_closed_and_on_the_vessel_surface(demo):
    verts, faces = demo.truth_mesh
    assert verts.shape[1] == 3 and faces.shape[1] == 3 and len(faces) > 1000
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)  # watertight
    tri = verts[faces]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    mask_volume = demo.truth_mask.sum() * np.prod(demo.grid.spacing)
    assert volume > 0 and abs(volume / mask_volume - 1) < 0.15
    # vertices lie on the analytic surface of the union of capsules (signed distance ~ 0)
    caps = demo.field.caps
    v = torch.as_tensor(verts[::7])
    sd = torch.full((v.shape[0],), 1e9, dtype=torch.float64)
    for c in range(caps.n):
        sd = torch.minimum(sd, segment_distance(v, caps.p0[c], caps.p1[c]) - caps.radius[c])
    step = min(demo.grid.spacing) / 2
    assert float(sd.abs().max()) < 0.3 * step


def test_voxelised_truth_reprojects_like_the_analytic_tubes(demo):
    """Ray marchers through the voxelised truth at time t (a trilinear one here and drgs_core.ct.forward_project)
    agree with the exact tube integrals."""
    from scipy.ndimage import map_coordinates

    from drgs_core.ct import forward_project

    grid, g = demo.grid, demo.geometry
    for k in (15, 45):
        t = demo.times[k]
        vol = demo.volume_at(t).astype(np.float64)
        src, dirs = g.rays(frames=[k], dtype=torch.float64)
        exact = demo.line_integrals(src[0], dirs[0], t).numpy()
        d = dirs[0].reshape(-1, 3).numpy()
        step = 1.0
        s = g.sad - 120 + step * (np.arange(int(240 / step)) + 0.5)
        pts = src[0].numpy()[None, None] + s[None, :, None] * d[:, None]
        idx = grid.world_to_index(pts.reshape(-1, 3)).T
        marched = map_coordinates(vol, idx, order=1, mode="constant", cval=0.0).reshape(len(d), -1).sum(1) * step
        marched = marched.reshape(exact.shape)
        assert exact.max() > 0.5
        assert abs(marched.sum() / exact.sum() - 1) < 0.03
        assert np.corrcoef(marched.ravel(), exact.ravel())[0, 1] > 0.95
        # the project's own voxel projector (drgs_core.ct) on the same volume
        projected = forward_project(torch.as_tensor(vol, dtype=torch.float32), grid, g, frames=[k])[0].numpy()
        assert abs(projected.sum() / exact.sum() - 1) < 0.03
        assert np.corrcoef(projected.ravel(), exact.ravel())[0, 1] > 0.95


# ---------------------------------------------------------------------------------------------------------------
# determinism and files
# ---------------------------------------------------------------------------------------------------------------
def test_determinism_with_seed(small):
    a = make_phantom(small(n_frames=4))
    b = make_phantom(small(n_frames=4))
    for x, y in ((a.case.dsa, b.case.dsa), (a.case.fill, b.case.fill), (a.truth_volume, b.truth_volume),
                 (a.truth_mesh[0], b.truth_mesh[0]), (a.tree.p0, b.tree.p0)):
        assert np.array_equal(x, y)
    other_noise = make_phantom(small(n_frames=4, noise_seed=99))
    assert np.array_equal(other_noise.clean_dsa, a.clean_dsa) and not np.array_equal(other_noise.case.dsa, a.case.dsa)
    other_tree = make_phantom(small(n_frames=4, seed=5))
    assert other_tree.tree.p0.shape != a.tree.p0.shape or not np.allclose(other_tree.tree.p0, a.tree.p0)


def test_write_phantom_folder(tmp_path, clean_small):
    import json

    from drgs_core.io import read_case, read_mesh, read_sequence_nrrd, read_volume
    from drgs_core.phantom import write_phantom

    paths = write_phantom(clean_small, tmp_path / "case", sequence_frames=3)
    case = read_case(tmp_path / "case")
    assert case.dsa.shape == clean_small.case.dsa.shape
    assert np.allclose(case.dsa, clean_small.case.dsa, atol=1e-5)
    assert np.allclose(case.geometry.primary_angles, clean_small.geometry.primary_angles)
    assert case.grid == clean_small.grid
    truth = tmp_path / "case" / "truth"
    for name in ("volume.nii.gz", "mask.nii.gz", "mesh.stl", "mesh.vtk", "clean_dsa.nii.gz", "phantom.json",
                 "tree.json"):
        assert (truth / name).is_file(), name
    vol, _ = read_volume(truth / "volume.nii.gz")
    assert np.allclose(vol, clean_small.truth_volume, atol=1e-7)
    mask, _ = read_volume(truth / "mask.nii.gz")
    assert np.array_equal(mask > 0, clean_small.truth_mask)
    verts, faces = read_mesh(truth / "mesh.vtk")
    assert len(faces) == len(clean_small.truth_mesh[1])
    assert np.allclose(np.sort(verts, axis=0), np.sort(clean_small.truth_mesh[0], axis=0), atol=1e-3)
    seq, _, seq_times = read_sequence_nrrd(truth / "volume_4d.seq.nrrd")
    assert seq.shape == (3,) + clean_small.grid.resolution
    assert np.allclose(seq_times, clean_small.times[[0, 6, 11]])
    assert np.allclose(seq[1], clean_small.volume_at(clean_small.times[6]), atol=1e-7)
    info = json.loads((truth / "phantom.json").read_text())
    assert PhantomConfig.from_dict(info["config"]) == clean_small.config
    assert paths["volume"] == truth / "volume.nii.gz"
