"""SceneUpdater against the real MRML classes of slicer-core: geometry (LPS files -> RAS scene), in-place preview
updates, final nodes, segmentation threshold and export, 4D sequence, subject hierarchy."""

import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

import lps_files  # noqa: E402
from DRGS4DSlicerLib import scene as scene_mod  # noqa: E402
from DRGS4DSlicerLib.scene import SceneUpdater, ijk_to_ras_of, ras_of_voxel, read_volume_file  # noqa: E402

from drgs_core.geometry import VolumeGrid  # noqa: E402
from drgs_core.io import write_labelmap, write_mesh, write_sequence_nrrd, write_stack, write_volume  # noqa: E402

GRID = VolumeGrid((12, 10, 8), (1.0, 1.5, 2.0))
VOXEL = (3, 5, 7)


def _lps_to_ras(p):
    p = np.asarray(p, float)
    return np.array([-p[0], -p[1], p[2]])


def _marked_volume(shape=GRID.resolution, voxel=VOXEL, value=5.0):
    vol = np.zeros(shape, np.float32)
    vol[voxel] = value
    return vol


def _slicer_reader_matrix(scene, path):
    """IJK->RAS and voxels as Slicer's own volume reader sees the file (independent reference)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return ijk_to_ras_of(node), slicer.util.arrayFromVolume(node).copy()


def _folder_children(scene, folder):
    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder, ids)
    return {sh.GetItemDataNode(ids.GetId(i)).GetID() for i in range(ids.GetNumberOfIds())
            if sh.GetItemDataNode(ids.GetId(i)) is not None}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_engine_volume_voxel_lands_at_its_ras_position(scene, tmp_path, suffix):
    path = write_volume(tmp_path / f"v{suffix}", _marked_volume(), GRID)
    updater = SceneUpdater(scene, "run")
    assert updater.update_preview(str(path), None, 10) == ["preview_volume"]
    node = updater.node("preview_volume")
    arr = slicer.util.arrayFromVolume(node)
    assert arr.shape == GRID.resolution[::-1]  # MRML arrays are [k, j, i]
    k, j, i = np.unravel_index(np.argmax(arr), arr.shape)
    assert (i, j, k) == VOXEL
    expected = _lps_to_ras(GRID.index_to_world(np.array(VOXEL, float)))
    np.testing.assert_allclose(ras_of_voxel(node, VOXEL), expected, atol=1e-4)
    # the same answer as Slicer's own reader
    ref_matrix, ref_array = _slicer_reader_matrix(scene, path)
    np.testing.assert_allclose(ijk_to_ras_of(node), ref_matrix, atol=1e-5)
    np.testing.assert_array_equal(arr, ref_array)


def test_oblique_lps_file_geometry(scene, tmp_path):
    """A file with a non-identity direction and off-centre origin (signed permutation)."""
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)  # columns: image axes in LPS
    origin = np.array([10.0, -20.0, 30.0])
    spacing = (0.5, 0.7, 0.9)
    vol = _marked_volume((6, 7, 8), (1, 2, 3))
    path = lps_files.write_volume_lps(tmp_path / "o.nii.gz", vol, spacing, origin=origin, direction=direction)
    updater = SceneUpdater(scene, "run")
    updater.update_preview(path)
    node = updater.node("preview_volume")
    lps = origin + direction @ (np.array([1, 2, 3]) * np.array(spacing))
    np.testing.assert_allclose(ras_of_voxel(node, (1, 2, 3)), _lps_to_ras(lps), atol=1e-4)
    ref_matrix, _ = _slicer_reader_matrix(scene, path)
    np.testing.assert_allclose(ijk_to_ras_of(node), ref_matrix, atol=1e-5)


def test_preview_is_updated_in_place(scene, tmp_path):
    updater = SceneUpdater(scene, "run 1", run_dir=str(tmp_path))
    first = write_volume(tmp_path / "a.nii.gz", _marked_volume(value=1.0), GRID)
    second = write_volume(tmp_path / "b.nii.gz", _marked_volume(value=3.0), GRID)
    updater.update_preview(str(first), None, 5)
    node = updater.node("preview_volume")
    image = node.GetImageData()
    before = slicer.util.arrayFromVolume(node).copy()
    mtime = node.GetMTime()
    updater.update_preview(str(second), None, 10)
    assert updater.node("preview_volume") is node and node.GetImageData() is image
    after = slicer.util.arrayFromVolume(node)
    assert before.max() == 1.0 and after.max() == 3.0
    assert node.GetMTime() > mtime
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert updater.preview_updates == 2 and updater.last_snapshot_iteration == 10
    assert node.GetAttribute(scene_mod.ATTRIBUTE_ROLE) == "preview_volume"
    assert node.GetAttribute(scene_mod.ATTRIBUTE_RUN) == str(tmp_path)
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == updater.folder_item
    assert sh.GetItemName(updater.folder_item) == "run 1"


@pytest.mark.parametrize("suffix", [".vtk", ".stl"])
def test_engine_mesh_points_become_ras(scene, tmp_path, suffix):
    verts, faces = lps_files.cube_mesh((4.0, -3.0, 2.0), 1.5)
    path = write_mesh(tmp_path / f"m{suffix}", verts, faces)
    polydata = scene_mod.read_polydata_ras(path)
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(polydata.GetPoints().GetData())
    expected = np.array([_lps_to_ras(v) for v in verts])
    # STL stores triangles with repeated corners: compare as point sets
    assert {tuple(np.round(p, 4)) for p in points} == {tuple(np.round(p, 4)) for p in expected}
    # Slicer's own model reader agrees (it honours the SPACE=LPS convention)
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", "reference")
    storage = slicer.vtkMRMLModelStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    ref = vtk_to_numpy(node.GetPolyData().GetPoints().GetData())
    assert {tuple(np.round(p, 4)) for p in ref} == {tuple(np.round(p, 4)) for p in points}


def test_ras_tagged_mesh_is_not_flipped(tmp_path):
    path = tmp_path / "ras.vtk"
    lps_files.write_mesh_vtk_lps(path, [[1, 2, 3], [4, 5, 6], [7, 8, 10]], [[0, 1, 2]])
    path.write_text(path.read_text().replace("SPACE=LPS", "SPACE=RAS"))
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(scene_mod.read_polydata_ras(path).GetPoints().GetData())
    np.testing.assert_allclose(points[0], [1, 2, 3])


def test_preview_model_updates_in_place(scene, tmp_path):
    updater = SceneUpdater(scene, "run")
    a = lps_files.write_mesh_vtk_lps(tmp_path / "a.vtk", *lps_files.cube_mesh((0, 0, 0), 1.0))
    b = lps_files.write_mesh_vtk_lps(tmp_path / "b.vtk", *lps_files.cube_mesh((0, 0, 0), 2.0))
    updater.update_preview(None, a, 1)
    node = updater.node("preview_model")
    b0 = node.GetPolyData().GetBounds()
    updater.update_preview(None, b, 2)
    assert updater.node("preview_model") is node
    assert node.GetPolyData().GetBounds()[1] == pytest.approx(2 * b0[1])
    assert scene.GetNumberOfNodesByClass("vtkMRMLModelNode") == 1


@pytest.fixture
def engine_outputs(tmp_path):
    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*[np.arange(n) for n in GRID.resolution], indexing="ij")
    vol = (0.02 * np.exp(-((x - 5) ** 2 + (y - 4) ** 2 + (z - 3) ** 2) / 6.0)).astype(np.float32)
    vols4 = np.stack([vol * s for s in (0.5, 1.0, 1.5)])
    verts, faces = lps_files.cube_mesh((1.0, 2.0, -3.0), 2.0)
    out = {
        "volume": str(write_volume(tmp_path / "volume.nii.gz", vol, GRID)),
        "segmentation": str(write_labelmap(tmp_path / "segmentation.nii.gz", vol >= 0.008, GRID)),
        "mesh_vtk": str(write_mesh(tmp_path / "mesh.vtk", verts, faces)),
        "mesh_stl": str(write_mesh(tmp_path / "mesh.stl", verts, faces)),
        "volume_4d": str(write_sequence_nrrd(tmp_path / "volume_4d.seq.nrrd", vols4, GRID, [0.0, 0.3, 0.6])),
        "renders": str(write_stack(tmp_path / "renders.nii.gz", rng.random((5, 9, 11)).astype(np.float32),
                                   (0.8, 0.8))),
        "cine": None,
    }
    return out, vol, vols4, verts


def test_final_outputs_become_nodes_in_one_folder(scene, tmp_path, engine_outputs):
    outputs, vol, vols4, verts = engine_outputs
    updater = SceneUpdater(scene, "final run")
    updater.update_preview(outputs["volume"], outputs["mesh_vtk"], 1)  # a preview that the final nodes replace
    changed = updater.handle_event({"event": "done", "outputs": outputs, "metrics": {"iso_level": 0.008}})
    assert set(changed) >= {"volume", "model", "segmentation", "sequence", "sequence_browser", "renders"}
    assert updater.node("preview_volume") is None and updater.node("preview_model") is None

    volume = updater.node("volume")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(volume), np.transpose(vol, (2, 1, 0)))
    np.testing.assert_allclose(ras_of_voxel(volume, (5, 4, 3)),
                               _lps_to_ras(GRID.index_to_world(np.array([5, 4, 3], float))), atol=1e-4)

    from vtk.util.numpy_support import vtk_to_numpy

    model_points = vtk_to_numpy(updater.node("model").GetPolyData().GetPoints().GetData())
    assert {tuple(np.round(p, 4)) for p in model_points} == {tuple(np.round(_lps_to_ras(v), 4)) for v in verts}

    seg = updater.node("segmentation")
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    label = slicer.util.arrayFromVolume(updater.export_labelmap())
    assert label.shape == vol.shape[::-1]
    np.testing.assert_array_equal(label > 0, np.transpose(vol >= 0.008, (2, 1, 0)))

    seq = updater.node("sequence")
    assert seq.GetNumberOfDataNodes() == 3
    assert [float(seq.GetNthIndexValue(i)) for i in range(3)] == [0.0, 0.3, 0.6]
    browser = updater.node("sequence_browser")
    proxy = browser.GetProxyNode(seq)
    browser.SetSelectedItemNumber(2)
    updater.sequences_logic.UpdateProxyNodesFromSequences(browser)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(proxy), np.transpose(vols4[2], (2, 1, 0)), rtol=1e-6)
    np.testing.assert_allclose(ijk_to_ras_of(proxy), ijk_to_ras_of(volume), atol=1e-5)

    # the rendered DSA: a sequence of 2D frames in detector pixels (not placed in patient space)
    renders = updater.node("renders")
    assert renders.IsA("vtkMRMLSequenceNode") and renders.GetNumberOfDataNodes() == 5
    stack, _ = read_volume_file(outputs["renders"])
    frame = renders.GetNthDataNode(3)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(frame), stack[3:4])
    np.testing.assert_allclose(ijk_to_ras_of(frame), np.diag([0.8, 0.8, 1.0, 1.0]), atol=1e-6)
    assert updater.node("renders_proxy") is not None and updater.node("renders_browser") is not None

    expected = {updater.node(r).GetID() for r in ("volume", "model", "segmentation", "sequence",
                                                   "sequence_browser", "renders", "labelmap")}
    assert expected <= _folder_children(scene, updater.folder_item)


def test_threshold_changes_segment_and_exports(scene, tmp_path, engine_outputs):
    outputs, vol, _, _ = engine_outputs
    updater = SceneUpdater(scene, "thr")
    updater.load_outputs(outputs, metrics={"iso_level": 0.008}, load_sequence=False, load_renders=False)
    assert updater.threshold == pytest.approx(0.008)
    n_low = updater.set_threshold(0.004)
    n_high = updater.set_threshold(0.015)
    assert n_low == int((vol >= 0.004).sum()) and n_high == int((vol >= 0.015).sum()) and n_low > n_high > 0
    label = slicer.util.arrayFromVolume(updater.export_labelmap())
    np.testing.assert_array_equal(label > 0, np.transpose(vol >= 0.015, (2, 1, 0)))
    files = updater.export_segmentation_files(tmp_path / "export")
    names = sorted(os.path.basename(f) for f in files)
    assert any(n.endswith("_label.nrrd") for n in names) and any(n.endswith(".seg.nrrd") for n in names)
    assert any(n.lower().endswith(".stl") for n in names)
    import SimpleITK as sitk

    written = sitk.GetArrayFromImage(sitk.ReadImage(next(f for f in files if f.endswith("_label.nrrd"))))
    np.testing.assert_array_equal(written > 0, np.transpose(vol >= 0.015, (2, 1, 0)))


def test_segmentation_without_threshold_uses_engine_labelmap(scene, engine_outputs):
    outputs, vol, _, _ = engine_outputs
    updater = SceneUpdater(scene, "lab")
    updater.load_outputs(outputs, metrics={}, load_sequence=False, load_renders=False)
    label = slicer.util.arrayFromVolume(updater.export_labelmap())
    np.testing.assert_array_equal(label > 0, np.transpose(vol >= 0.008, (2, 1, 0)))


def test_two_runs_get_two_folders(scene, engine_outputs):
    outputs = engine_outputs[0]
    a = SceneUpdater(scene, "run A")
    b = SceneUpdater(scene, "run B")
    a.load_outputs(outputs, load_sequence=False, load_renders=False)
    b.load_outputs(outputs, load_sequence=False, load_renders=False)
    assert a.folder_item != b.folder_item
    assert a.node("volume").GetID() != b.node("volume").GetID()
    assert not (_folder_children(scene, a.folder_item) & _folder_children(scene, b.folder_item))
