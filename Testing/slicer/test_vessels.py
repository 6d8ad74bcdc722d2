"""The Results section's background work (DRGS4DSlicerLib/vessels.py) on small analytic volumes, checked with the
real MRML classes of slicer-core as independent readers: Slicer's segmentation and model readers load the exported
.seg.nrrd and STL where they belong, the surface is closed with outward normals (also on a mirroring grid), a
labelmap on another extent lands on the volume's grid, and a failed export leaves no file changed."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from DRGS4DSlicerLib import vessels  # noqa: E402
from DRGS4DSlicerLib.scene import SEGMENT_ID, SceneUpdater, ijk_to_ras_of  # noqa: E402


def _ball(shape=(20, 24, 28), centre=(9.0, 11.0, 13.0), radius=6.0):
    """A ball of 0.04 1/mm falling to 0 at ``radius`` voxels ([k, j, i]) and its analytic mask at 0.01."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    d = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    vol = (0.04 * np.clip(1 - (d / radius) ** 2, 0, None)).astype(np.float32)
    return vol, d <= radius * np.sqrt(0.75)


OBLIQUE = np.array([[0, -0.7, 0, 12.0], [0.6, 0, 0, -30.0], [0, 0, -0.8, 4.0], [0, 0, 0, 1]])  # det < 0: mirrors


def _outward(surface) -> float:
    """Mean of (point - centroid) . normal over the points: > 0 when the normals point out of a convex body."""
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(surface.GetPoints().GetData())
    normals = vtk_to_numpy(surface.GetPointData().GetNormals())
    return float(np.mean(np.sum((points - points.mean(axis=0)) * normals, axis=1)))


def _boundary_edges(surface) -> int:
    edges = vtk.vtkFeatureEdges()
    edges.SetInputData(surface)
    edges.BoundaryEdgesOn()
    edges.NonManifoldEdgesOff()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.Update()
    return edges.GetOutput().GetNumberOfCells()


@pytest.mark.parametrize("matrix", [np.diag([0.5, 0.6, 0.7, 1.0]), OBLIQUE], ids=["axes", "oblique-mirrored"])
def test_segment_surface_is_closed_outward_and_where_the_voxels_are(matrix):
    vol, truth = _ball()
    vol[:, :, -1] = vol[:, :, -2] = 0.03  # a slab on the border: the surface must close there too
    segment = vessels.segment_volume(vol, matrix, 0.01)
    expected = truth | (vol >= 0.01)
    mask = vtk.util.numpy_support.vtk_to_numpy(segment.image.GetPointData().GetScalars()).reshape(vol.shape)
    np.testing.assert_array_equal(mask > 0, expected)
    assert segment.voxels == int(expected.sum()) and segment.speck_voxels == 0
    surface = segment.surface
    assert surface.GetNumberOfPolys() > 100 and _boundary_edges(surface) == 0
    # the ball's part of the surface lies around the ball's centre in RAS, at about its radius
    centre_ras = (matrix @ np.array([13.0, 11.0, 9.0, 1.0]))[:3]
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(surface.GetPoints().GetData())
    ijk = np.linalg.solve(matrix[:3, :3], (points - matrix[:3, 3]).T).T  # back to voxel indices (i, j, k)
    ball = ijk[:, 0] < 24  # away from the slab
    radius = np.linalg.norm(ijk[ball] - [13.0, 11.0, 9.0], axis=1)
    assert abs(np.median(radius) - 6.0 * np.sqrt(0.75)) < 0.6
    one_ball = vessels.segment_volume(_ball()[0], matrix, 0.01).surface
    assert _outward(one_ball) > 0
    np.testing.assert_allclose(np.mean(vtk_to_numpy(one_ball.GetPoints().GetData()), axis=0), centre_ras, atol=0.3)


def test_isolated_specks_go_by_the_engines_rule():
    """Small components farther than 3 mm from the vessel go, nearer ones stay (drgs_core.specks' defaults)."""
    vol, truth = _ball((40, 40, 40), (20.0, 20.0, 20.0), 8.0)  # the last ball voxel on the i axis: i = 26
    near, far, corner = (20, 20, 31), (20, 20, 34), (2, 2, 2)  # 5 and 8 voxels of 0.5 mm from i = 26
    for speck in (near, far, corner):
        vol[speck] = 0.03
    segment = vessels.segment_volume(vol, np.diag([0.5, 0.5, 0.5, 1.0]), 0.01)
    mask = vtk.util.numpy_support.vtk_to_numpy(segment.image.GetPointData().GetScalars()).reshape(vol.shape) > 0
    expected = truth.copy()
    expected[near] = True
    np.testing.assert_array_equal(mask, expected)
    assert segment.speck_voxels == 2 and segment.voxels == int(expected.sum())


def _assert_same_voxels(mask, matrix, truth, truth_matrix):
    """The same voxels in RAS (Slicer's volume reader may store the axes of a file reversed)."""
    kji = np.argwhere(truth)
    ras = truth_matrix @ np.c_[kji[:, ::-1], np.ones(len(kji))].T
    ijk = np.rint(np.linalg.solve(matrix, ras)[:3].T).astype(int)
    assert mask.sum() == truth.sum() and mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]].all()


def _updater_with_segment(scene, vol, matrix, threshold=0.01):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vessel run")
    slicer.util.updateVolumeFromArray(node, vol)
    node.SetIJKToRASMatrix(vessels._vtk_matrix(matrix))
    updater = SceneUpdater.attach(node)
    updater.set_threshold(threshold)
    return updater


def test_labelmap_of_another_extent_lands_on_the_volume_grid(scene):
    vol, truth = _ball()
    updater = _updater_with_segment(scene, vol, OBLIQUE)
    snapshot = updater.labelmap_snapshot()
    # the segment as Slicer may keep it: cropped to where it is non-zero, with another label value
    cropped = slicer.vtkOrientedImageData()
    extract = vtk.vtkExtractVOI()
    extract.SetInputData(snapshot.image)
    extract.SetVOI(3, 23, 2, 20, 1, 17)
    extract.Update()
    cropped.ShallowCopy(extract.GetOutput())
    cropped.CopyDirections(snapshot.image)
    scaled = vtk.vtkImageShiftScale()
    scaled.SetInputData(cropped)
    scaled.SetScale(3)
    scaled.SetOutputScalarTypeToUnsignedChar()
    scaled.Update()
    cropped.GetPointData().SetScalars(scaled.GetOutput().GetPointData().GetScalars())
    snapshot.image, snapshot.label_value = cropped, 3
    np.testing.assert_array_equal(vessels.mask_on_grid(snapshot) > 0, truth)
    labelmap = updater.apply_labelmap(vessels.labelmap_from_snapshot(snapshot))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap) > 0, truth)
    np.testing.assert_allclose(ijk_to_ras_of(labelmap), OBLIQUE, atol=1e-6)
    assert labelmap.GetDisplayNode().GetColorNode().GetNumberOfColors() == 2


def test_exported_files_read_back_in_slicer_where_they_belong(scene, tmp_path):
    vol, truth = _ball()
    updater = _updater_with_segment(scene, vol, OBLIQUE)
    segment = scene.GetNodeByID(updater.node("segmentation").GetID()).GetSegmentation().GetSegment(SEGMENT_ID)
    segment.SetColor(0.1, 0.8, 0.3)
    files = updater.export_segmentation_files(tmp_path / "export")
    labelmap_file, seg_file, stl_file = files
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        p.rsplit("/", 1)[-1] for p in files)  # nothing else (no partial file)
    # Slicer's segmentation reader: one segment, its name and colour, the mask on the volume's grid
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(seg_file)
    assert storage.ReadData(seg)
    read = seg.GetSegmentation()
    assert read.GetNumberOfSegments() == 1 and read.GetNthSegmentID(0) == SEGMENT_ID
    assert read.GetNthSegment(0).GetName() == "Vessels"
    np.testing.assert_allclose(read.GetNthSegment(0).GetColor(), (0.1, 0.8, 0.3), atol=1e-6)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(SEGMENT_ID)
    assert updater.segmentations_logic.ExportSegmentsToLabelmapNode(seg, ids, label, updater.node("volume"))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(label) > 0, truth)
    # Slicer's volume reader: the labelmap NRRD on the volume's grid
    plain = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "plain")
    volume_storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(volume_storage)
    volume_storage.SetFileName(labelmap_file)
    assert volume_storage.ReadData(plain)
    _assert_same_voxels(slicer.util.arrayFromVolume(plain) > 0, ijk_to_ras_of(plain), truth, OBLIQUE)
    # Slicer's model reader (LPS file -> RAS): the surface around the same voxels as the segment's own surface
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    model_storage = slicer.vtkMRMLModelStorageNode()
    scene.AddNode(model_storage)
    model_storage.SetFileName(stl_file)
    assert model_storage.ReadData(model)
    shown = segment.GetRepresentation("Closed surface")
    np.testing.assert_allclose(model.GetPolyData().GetBounds(), shown.GetBounds(), atol=1e-3)
    assert model.GetPolyData().GetNumberOfCells() == shown.GetNumberOfPolys()


def test_a_failed_export_changes_no_file(scene, tmp_path, monkeypatch):
    vol, _ = _ball()
    updater = _updater_with_segment(scene, vol, np.diag([0.5, 0.5, 0.5, 1.0]))
    folder = tmp_path / "export"
    files = updater.export_segmentation_files(folder)
    before = {f: open(f, "rb").read() for f in files}
    updater.set_threshold(0.03)  # a smaller segment, then the surface writer fails (disk full, say)

    def full(surface, path):
        path.write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(vessels, "_write_stl", full)
    with pytest.raises(OSError, match="No space"):
        updater.export_segmentation_files(folder)
    assert {f: open(f, "rb").read() for f in files} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.rsplit("/", 1)[-1] for f in files)
    updater.set_threshold(1.0)  # nothing above it
    with pytest.raises(RuntimeError, match="empty"):
        vessels.write_export_files(updater.labelmap_snapshot(), folder, "x", SEGMENT_ID)
