"""drgs_core.preview: the small uncompressed preview the panel reads in milliseconds - values, geometry, file format,
and what the panel's readers make of it."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from DRGS4DSlicerLib.scene import read_polydata_ras, read_volume_file  # noqa: E402
from drgs_core.geometry import VolumeGrid  # noqa: E402
from drgs_core.preview import block_mean, shrink_factor, write_preview  # noqa: E402


def test_shrink_factor_keeps_every_axis_within_the_limit():
    assert shrink_factor((128, 64, 10)) == 1
    assert shrink_factor((129, 64, 10)) == 2
    assert shrink_factor((256, 256, 256)) == 2
    assert shrink_factor((512, 300, 100)) == 4
    assert shrink_factor((40, 36, 20), max_size=16) == 3


def test_preview_values_and_geometry(tmp_path):
    rng = np.random.default_rng(3)
    grid = VolumeGrid((40, 36, 20), (1.0, 1.5, 2.0))
    vol = rng.random(grid.resolution, dtype=np.float32)
    out = write_preview(tmp_path, 7, vol, grid, level=None, max_size=16)
    assert out["factor"] == 3 and out["mesh"] is None and out["volume"].endswith("preview_000007.nrrd")
    expected = vol[:39, :36, :18].reshape(13, 3, 12, 3, 6, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(block_mean(vol, 3), expected, rtol=1e-6)
    raw = open(out["volume"], "rb").read()
    header, data = raw.split(b"\n\n", 1)
    assert b"encoding: raw" in header and len(data) == 4 * expected.size  # uncompressed float32

    array, ijk_to_ras = read_volume_file(out["volume"])  # what the panel reads: [k, j, i], IJK -> RAS
    np.testing.assert_allclose(array, np.transpose(expected, (2, 1, 0)), rtol=1e-6)
    for ijk in [(0, 0, 0), (12, 11, 5), (4, 7, 2)]:
        # the coarse voxel's centre is the mean of the centres of the fine voxels it averages
        fine = [grid.index_to_world(np.array([3 * ijk[0] + a, 3 * ijk[1] + b, 3 * ijk[2] + c], float))
                for a in range(3) for b in range(3) for c in range(3)]
        lps = np.mean(fine, axis=0)
        np.testing.assert_allclose((ijk_to_ras @ np.append(ijk, 1.0))[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_preview_mesh_is_binary_lps_and_old_previews_go(tmp_path):
    grid = VolumeGrid((64, 64, 64), (0.5, 0.5, 0.5))
    x, y, z = np.meshgrid(*[np.arange(64) * 0.5 - 16.0 + 0.25] * 3, indexing="ij")
    centre = np.array([3.0, -4.0, 5.0])  # LPS mm
    vol = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 8.0).astype(np.float32)
    for it in (10, 20, 30):
        out = write_preview(tmp_path, it, vol, grid, level=0.5, max_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview_000020.nrrd", "preview_000020.vtk",
                                                          "preview_000030.nrrd", "preview_000030.vtk"]
    assert b"BINARY" in open(out["mesh"], "rb").read(200)
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(read_polydata_ras(out["mesh"]).GetPoints().GetData())
    assert len(points) > 50
    lps = points * np.array([-1.0, -1.0, 1.0])
    radius = np.linalg.norm(lps - centre, axis=1)  # exp(-r^2/8) = 0.5 at r = 2.35 mm
    assert abs(radius.mean() - np.sqrt(8 * np.log(2))) < 0.5 and radius.std() < 0.3
