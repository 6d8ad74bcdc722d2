"""Mesh round trips and mesh/label-map consistency in world (LPS mm) coordinates."""

import numpy as np
import pytest
from skimage.measure import marching_cubes

from drgs_core.errors import DRGSInputError
from drgs_core.geometry import VolumeGrid
from drgs_core.io import read_mesh, read_volume, write_labelmap, write_mesh


def _tetra():
    v = np.array([[0.0, 0.0, 0.0], [10.25, 0.0, 0.0], [0.0, -7.5, 0.0], [0.1, 0.2, 3.3]]) + [-40.0, 12.5, 7.0]
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return v, f


def _soup(v, f):
    """Triangles as a sorted list of corner tuples (independent of vertex numbering)."""
    return sorted(tuple(map(tuple, np.round(v[tri], 4))) for tri in f)


@pytest.mark.parametrize("suffix", [".stl", ".vtk", ".obj"])
def test_round_trip(tmp_path, suffix):
    v, f = _tetra()
    path = write_mesh(tmp_path / f"m{suffix}", v, f)
    v2, f2 = read_mesh(path)
    assert v2.shape == (4, 3) and f2.shape == (4, 3)
    assert _soup(v2, f2) == _soup(v, f)
    if suffix != ".stl":  # text formats keep vertex order and full precision
        np.testing.assert_array_equal(v2, v)
        np.testing.assert_array_equal(f2, f)
    head = path.read_bytes()[:200]
    assert b"SPACE=LPS" in head
    if suffix == ".vtk":
        assert path.read_text().splitlines()[1].count("SPACE=LPS") == 1  # the title line Slicer reads
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_stl_is_binary_with_normals(tmp_path):
    v, f = _tetra()
    raw = write_mesh(tmp_path / "m.stl", v, f).read_bytes()
    assert len(raw) == 84 + 50 * 4 and raw[:80].startswith(b"DRGS4D mesh SPACE=LPS")
    n0 = np.frombuffer(raw, "<f4", 3, 84)
    tri = v[f[0]]
    expected = np.cross(tri[1] - tri[0], tri[2] - tri[0])
    np.testing.assert_allclose(n0, expected / np.linalg.norm(expected), atol=1e-6)


def test_obj_polygons_and_relative_indices(tmp_path):
    (tmp_path / "q.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1/1/1 2/2/2 3/3/3 4/4/4\nf -4 -2 -1\n")
    v, f = read_mesh(tmp_path / "q.obj")
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [0, 2, 3]])


def test_bad_meshes(tmp_path):
    v, f = _tetra()
    with pytest.raises(DRGSInputError, match="0-based"):
        write_mesh(tmp_path / "m.obj", v, f + 1)
    with pytest.raises(DRGSInputError, match=r"\[V, 3\]"):
        write_mesh(tmp_path / "m.obj", v[:, :2], f)
    with pytest.raises(DRGSInputError, match=".stl, .vtk, .obj"):
        write_mesh(tmp_path / "m.ply", v, f)
    with pytest.raises(DRGSInputError, match="not found"):
        read_mesh(tmp_path / "none.stl")
    assert list(tmp_path.iterdir()) == []


def test_mesh_lies_on_labelmap_boundary(tmp_path):
    """Sphere label map + marching-cubes mesh in world coordinates: after writing and reading both back, every
    mesh vertex has both inside and outside voxels within one voxel of it."""
    grid = VolumeGrid((24, 20, 16), (0.5, 0.6, 0.75))
    centre, radius = np.array([0.4, -0.3, 0.5]), 3.2
    pts = grid.voxel_centres().numpy().astype(np.float64)
    mask = np.linalg.norm(pts - centre, axis=-1) <= radius
    verts, faces, _, _ = marching_cubes(mask.astype(np.float32), level=0.5, spacing=grid.spacing)
    world = verts + grid.first_voxel_centre  # marching-cubes index space [x, y, z] scaled -> LPS mm
    write_labelmap(tmp_path / "seg.nii.gz", mask, grid)
    write_mesh(tmp_path / "surf.vtk", world, faces)

    seg, info = read_volume(tmp_path / "seg.nii.gz")
    v, f = read_mesh(tmp_path / "surf.vtk")
    assert f.shape == faces.shape
    r = np.linalg.norm(v - centre, axis=1)
    assert np.all(np.abs(r - radius) < max(grid.spacing))
    idx = info.world_to_index(v)
    lo = np.clip(np.floor(idx).astype(int), 0, np.array(seg.shape) - 1)
    hi = np.clip(np.ceil(idx).astype(int), 0, np.array(seg.shape) - 1)
    corners = [seg[np.where(b[0], hi[:, 0], lo[:, 0]), np.where(b[1], hi[:, 1], lo[:, 1]),
                   np.where(b[2], hi[:, 2], lo[:, 2])] for b in np.ndindex(2, 2, 2)]
    corners = np.stack(corners, axis=1)
    assert np.all(corners.max(axis=1) == 1) and np.all(corners.min(axis=1) == 0)
    # a deliberately shifted mesh (one voxel diagonal outwards) fails the same test somewhere
    shifted = info.world_to_index(v + 2.0 * (v - centre) / r[:, None])
    far = seg[tuple(np.clip(np.round(shifted).astype(int), 0, np.array(seg.shape) - 1).T)]
    assert np.all(far == 0)
