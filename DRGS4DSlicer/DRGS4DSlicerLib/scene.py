"""Bring the worker's files into an MRML scene (works with the real MRML classes of ``slicer-core``; no Qt, no app).

Coordinate systems: every file the engine writes is in DICOM patient LPS millimetres (METHOD §3); the MRML scene is
RAS.  For volumes the image-to-world matrix read from the file (IJK -> LPS) is turned into IJK -> RAS by
``RAS = diag(-1, -1, 1) · LPS``; mesh points are mapped the same way.  Voxel arrays are never resampled.

One ``SceneUpdater`` handles one run: a preview volume and model that are updated in place at every snapshot, then the
final volume, surface model, segmentation (threshold adjustable), 4D sequence with a sequence browser and the rendered
DSA, all under one subject-hierarchy folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import vtk

import slicer

from . import protocol, vessels

log = logging.getLogger("DRGS4D.scene")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ATTRIBUTE_RUN = "DRGS4D.run"
ATTRIBUTE_ROLE = "DRGS4D.role"
SEGMENT_ID = "vessels"
BINARY_LABELMAP = "Binary labelmap"  # representation names of vtkSegmentationConverter
CLOSED_SURFACE = "Closed surface"
VESSEL_COLOR = (0.85, 0.2, 0.2)


# ---- matrices ------------------------------------------------------------------------------------------------------

def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return numpy_matrix(m)


def lps_to_ras_matrix(ijk_to_lps: np.ndarray) -> np.ndarray:
    return LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=float)


# ---- file readers --------------------------------------------------------------------------------------------------

def read_volume_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI/NRRD/MHA volume: (voxels [k, j, i] as MRML/VTK arrays them, IJK->RAS 4x4).

    SimpleITK (bundled with Slicer) reads the file into LPS physical space; NIfTI through nibabel is the fallback
    when SimpleITK is missing (nibabel's affine is already RAS).
    """
    path = os.fspath(path)
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK ships with Slicer
        sitk = None
    if sitk is not None:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)  # [k, j, i] (+ components)
        dim = image.GetDimension()
        direction = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)
        spacing = np.array(image.GetSpacing(), dtype=float)
        origin = np.array(image.GetOrigin(), dtype=float)
        if dim == 2:
            direction = np.pad(direction, ((0, 1), (0, 1)))
            direction[2, 2] = 1.0
            spacing = np.append(spacing, 1.0)
            origin = np.append(origin, 0.0)
            array = array[None]
        elif dim != 3:
            raise ValueError(f"{path}: expected a 3D volume, found {dim} dimensions")
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction @ np.diag(spacing)
        ijk_to_lps[:3, 3] = origin
        return np.ascontiguousarray(array), lps_to_ras_matrix(ijk_to_lps)
    import nibabel  # pragma: no cover

    image = nibabel.load(path)  # pragma: no cover
    data = np.asanyarray(image.dataobj)  # pragma: no cover
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), np.asarray(image.affine, float)  # pragma: no cover


def _declared_space(path: str) -> str:
    """'RAS' or 'LPS' from a 'SPACE=...' tag in the first bytes of a mesh file (LPS when absent, as in Slicer)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512).decode("latin-1", errors="replace").upper()
    except OSError:
        return "LPS"
    if "SPACE=RAS" in head or "SPACE: RAS" in head:
        return "RAS"
    return "LPS"


def read_polydata_ras(path: str | os.PathLike) -> vtk.vtkPolyData:
    """Read a mesh (.vtk legacy, .vtp, .stl, .obj, .ply) and return it in RAS (LPS files are converted)."""
    path = os.fspath(path)
    ext = path.lower().rsplit(".", 1)[-1]
    readers = {"vtk": vtk.vtkPolyDataReader, "vtp": vtk.vtkXMLPolyDataReader, "stl": vtk.vtkSTLReader,
               "obj": vtk.vtkOBJReader, "ply": vtk.vtkPLYReader}
    if ext not in readers:
        raise ValueError(f"{path}: unsupported mesh format '.{ext}'")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    reader = readers[ext]()
    reader.SetFileName(path)
    reader.Update()
    polydata = reader.GetOutput()
    if polydata is None or polydata.GetNumberOfPoints() == 0:
        log.warning("%s contains no points", path)
        polydata = polydata or vtk.vtkPolyData()
    if _declared_space(path) == "RAS":
        out = vtk.vtkPolyData()
        out.DeepCopy(polydata)
        return out
    flip = vtk.vtkTransform()
    flip.Scale(-1.0, -1.0, 1.0)  # LPS -> RAS; a rotation by 180 deg about S, so face orientation is kept
    transform = vtk.vtkTransformPolyDataFilter()
    transform.SetTransform(flip)
    transform.SetInputData(polydata)
    transform.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(transform.GetOutput())
    return out


def set_volume_from_array(node, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Replace voxels and geometry of a volume node in place (the node's vtkImageData object is reused)."""
    array_kji = np.asarray(array_kji)
    if array_kji.dtype == np.float64:
        array_kji = array_kji.astype(np.float32)
    elif array_kji.dtype == np.int64:
        array_kji = array_kji.astype(np.int32)
    elif array_kji.dtype == bool:
        array_kji = array_kji.astype(np.uint8)
    wasModifying = node.StartModify()
    try:
        node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    finally:
        node.EndModify(wasModifying)


def ras_of_voxel(node, ijk) -> np.ndarray:
    """RAS position (mm) of voxel index (i, j, k) of a volume node."""
    return (ijk_to_ras_of(node) @ np.append(np.asarray(ijk, float), 1.0))[:3]


class LoadStep:
    """One piece of loading results: ``read()`` (files, numpy; safe in a background thread) then ``apply(data)`` in
    the main thread, which may return further steps (e.g. one per sequence frame)."""

    def __init__(self, role: str, apply, read=None):
        self.role, self.apply, self.read = role, apply, read
        self.roles = [role]

    def run(self) -> list:
        """Read and apply here; returns the follow-up steps."""
        return self.finish(self.read() if self.read is not None else None)

    def finish(self, data) -> list:
        """Apply what ``read()`` returned (e.g. in another thread); returns the follow-up steps."""
        more = self.apply(data)
        return list(more) if isinstance(more, list) else []


def read_sequence_file(path: str | os.PathLike):
    """Read a 4D ``.seq.nrrd`` as the engine writes it (list axis first): (frames [T, k, j, i], IJK->RAS,
    index values [T] as text, index name).  pynrrd (an engine requirement) when available, else SimpleITK."""
    path = os.fspath(path)
    try:
        import nrrd
    except ImportError:  # pragma: no cover - SimpleITK reads the list axis as vector components
        import SimpleITK as sitk

        image = sitk.ReadImage(path)
        data = np.moveaxis(sitk.GetArrayFromImage(image), -1, 0)  # [T, k, j, i]
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        ijk_to_lps[:3, 3] = image.GetOrigin()
        return data, lps_to_ras_matrix(ijk_to_lps), [str(i) for i in range(data.shape[0])], "time"
    data, header = nrrd.read(path, index_order="C")  # [z, y, x, T] reversed from the file's (T, x, y, z)
    frames = np.ascontiguousarray(np.moveaxis(data, -1, 0))  # [T, k, j, i]
    directions = np.asarray(header["space directions"][1:], dtype=float)  # rows: one per spatial axis
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = directions.T
    ijk_to_lps[:3, 3] = np.asarray(header["space origin"], dtype=float)
    values = str(header.get("axis 0 index values", "")).split() or [str(i) for i in range(frames.shape[0])]
    labels = header.get("labels") or ["time"]
    return frames, lps_to_ras_matrix(ijk_to_lps), values, (labels[0] or "time")


def read_preview(volume_path=None, mesh_path=None):
    """The files of a ``snapshot`` event: ((voxels, IJK->RAS) or None, RAS polydata or None).  No scene access, so
    it can run in a background thread."""
    volume = polydata = None
    if volume_path and os.path.isfile(volume_path):
        volume = read_volume_file(volume_path)
    elif volume_path:
        log.warning("snapshot volume %s does not exist", volume_path)
    if mesh_path and os.path.isfile(mesh_path):
        polydata = read_polydata_ras(mesh_path)
    elif mesh_path:
        log.warning("snapshot mesh %s does not exist", mesh_path)
    return volume, polydata


def prepare_image(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """(vtkImageData holding a copy of the voxels, IJK->RAS, display range (low, high)) - the slow part of showing a
    large volume, done in a background thread so that the main thread only swaps the image in."""
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array_kji, dtype=np.float32 if array_kji.dtype == np.float64 else None)
    k, j, i = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.reshape(-1), deep=True))
    image.GetScalarRange()  # computed here once; VTK keeps it, so the panel's threshold range costs nothing later
    sample = array[::4, ::4, ::4]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.9])) if sample.size else (0.0, 1.0)
    return image, np.asarray(ijk_to_ras, float), (low, high if high > low else low + 1.0)


def show_image(node, prepared) -> None:
    """Put a ``prepare_image`` result into a volume node; a new display node gets the precomputed window/level
    (computing it here would scan every voxel in the main thread)."""
    image, ijk_to_ras, (low, high) = prepared
    scene = node.GetScene()
    if scene is not None and node.GetDisplayNode() is None:
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        scene.AddNode(display)
        node.SetAndObserveDisplayNodeID(display.GetID())
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    if image is not None:
        node.SetAndObserveImageData(image)


# ---- the updater ---------------------------------------------------------------------------------------------------

class SceneUpdater:
    """Streams one run's results into ``scene``.

    Hooks (all optional, called with the node): ``on_preview_volume`` when the preview volume is first created (the
    panel uses it to show it in the slice views and set up volume rendering), ``on_node_added`` for every node this
    class creates.
    """

    def __init__(self, scene, run_name: str = "DRGS4D", run_dir: str | None = None,
                 segmentations_logic=None, sequences_logic=None, on_preview_volume=None, on_node_added=None):
        self.scene = scene
        self.run_name = run_name
        self.run_dir = run_dir
        self._seg_logic = segmentations_logic
        self._seq_logic = sequences_logic
        self.on_preview_volume = on_preview_volume
        self.on_node_added = on_node_added
        self._folder_item = None
        self.nodes: dict[str, object] = {}
        self.preview_updates = 0
        self.last_snapshot_iteration: int | None = None
        self.outputs: dict = {}
        self.threshold: float | None = None
        self._display_ranges: dict[str, tuple] = {}  # sequence node ID -> (low, high) of its first frame
        self._ensure_colors()

    @classmethod
    def attach(cls, volume_node, segmentation_node=None, **kwargs) -> "SceneUpdater":
        """An updater for result nodes that already exist (e.g. after the scene was saved and loaded again), so that
        the threshold and exports work on them.  The subject-hierarchy folder is the volume's parent folder."""
        scene = volume_node.GetScene()
        kwargs.setdefault("run_name", volume_node.GetName())
        kwargs.setdefault("run_dir", volume_node.GetAttribute(ATTRIBUTE_RUN))
        updater = cls(scene, **kwargs)
        updater.nodes["volume"] = volume_node
        if segmentation_node is not None:
            updater.nodes["segmentation"] = segmentation_node
            if not segmentation_node.GetSegmentation().GetSegment(SEGMENT_ID):
                _ = updater.segmentations_logic
                segmentation_node.GetSegmentation().AddEmptySegment(SEGMENT_ID, "Vessels", list(VESSEL_COLOR))
        sh = updater.subject_hierarchy
        item = sh.GetItemByDataNode(volume_node)
        parent = sh.GetItemParent(item) if item else 0
        if parent and parent != sh.GetSceneItemID():
            updater._folder_item = parent
        return updater

    # -- infrastructure --
    def _ensure_colors(self) -> None:
        if self.scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
            # a bare scene (tests, PythonSlicer) lacks the default color tables that display nodes refer to
            logic = slicer.vtkMRMLColorLogic()
            logic.SetMRMLScene(self.scene)
            self._color_logic = logic

    @property
    def segmentations_logic(self):
        if self._seg_logic is None:
            logic = slicer.vtkSlicerSegmentationsModuleLogic()
            logic.SetMRMLScene(self.scene)
            self._seg_logic = logic
        return self._seg_logic

    @property
    def sequences_logic(self):
        if self._seq_logic is None:
            logic = slicer.vtkSlicerSequencesLogic()
            logic.SetMRMLScene(self.scene)  # registers the sequence browser node class in a bare scene
            self._seq_logic = logic
        return self._seq_logic

    @property
    def subject_hierarchy(self):
        return self.scene.GetSubjectHierarchyNode()

    @property
    def folder_item(self) -> int:
        """The run's subject-hierarchy folder (created on first use)."""
        sh = self.subject_hierarchy
        if self._folder_item is None or not sh.GetItemName(self._folder_item):
            self._folder_item = sh.CreateFolderItem(sh.GetSceneItemID(), self.run_name)
            if self.run_dir:
                sh.SetItemAttribute(self._folder_item, ATTRIBUTE_RUN, str(self.run_dir))
        return self._folder_item

    def _adopt(self, node, role: str) -> None:
        """Tag a node with the run and put it in the run's folder."""
        node.SetAttribute(ATTRIBUTE_ROLE, role)
        if self.run_dir:
            node.SetAttribute(ATTRIBUTE_RUN, str(self.run_dir))
        sh = self.subject_hierarchy
        item = sh.GetItemByDataNode(node)
        folder = self.folder_item
        if not item:
            sh.CreateItem(folder, node)
        elif sh.GetItemParent(item) != folder:
            sh.SetItemParent(item, folder)
        if self.on_node_added:
            self.on_node_added(node)

    def _new_node(self, class_name: str, name: str, role: str):
        node = self.scene.AddNewNodeByClass(class_name, self.scene.GenerateUniqueName(name))
        if node is None:
            raise RuntimeError(protocol.tr("the scene cannot create {node_class}", node_class=class_name))
        self._adopt(node, role)
        self.nodes[role] = node
        return node

    def node(self, role: str):
        """The node for a role (preview_volume, preview_model, volume, model, segmentation, labelmap, sequence,
        sequence_browser, sequence_proxy, renders), or None if it does not exist (any more)."""
        node = self.nodes.get(role)
        if node is not None and self.scene.GetNodeByID(node.GetID()) is None:
            del self.nodes[role]
            return None
        return node

    # -- event dispatch --
    def handle_event(self, event: dict, options: dict | None = None) -> list[str]:
        """Update the scene for a protocol event; returns the roles that changed."""
        name = event.get("event")
        if name == "snapshot":
            return self.update_preview(event.get("volume"), event.get("mesh"), event.get("iteration"))
        if name == "done":
            self.outputs = dict(event.get("outputs") or {})
            return self.load_outputs(self.outputs, metrics=event.get("metrics") or {}, **(options or {}))
        return []

    # -- preview --
    def update_preview(self, volume_path=None, mesh_path=None, iteration=None) -> list[str]:
        """Read a snapshot's files and apply them (scripts, tests; the job reads in a background thread)."""
        return self.apply_preview(read_preview(volume_path, mesh_path), iteration)

    def apply_preview(self, data, iteration=None) -> list[str]:
        """Update the preview volume and surface in place from ``read_preview``'s result.  The display nodes are
        made once, so the user's window/level, colours and visibility stay as they set them."""
        volume, polydata = data
        changed = []
        if volume is not None:
            array, ijk_to_ras = volume
            node = self.node("preview_volume")
            created = node is None
            if created:
                node = self._new_node("vtkMRMLScalarVolumeNode", f"{self.run_name} preview", "preview_volume")
            set_volume_from_array(node, array, ijk_to_ras)
            if created:
                node.CreateDefaultDisplayNodes()
                display = node.GetDisplayNode()
                if display is not None:
                    display.AutoWindowLevelOn()
                if self.on_preview_volume:
                    self.on_preview_volume(node)
            changed.append("preview_volume")
        if polydata is not None:
            node = self.node("preview_model")
            if node is None:
                node = self._new_node("vtkMRMLModelNode", f"{self.run_name} preview surface", "preview_model")
                node.CreateDefaultDisplayNodes()
                self._style_model(node, opacity=0.6)
            node.SetAndObservePolyData(polydata)
            changed.append("preview_model")
        if changed:
            self.preview_updates += 1
            self.last_snapshot_iteration = iteration
        return changed

    def _style_model(self, node, opacity: float = 1.0) -> None:
        display = node.GetDisplayNode()
        if display is None:
            return
        display.SetColor(*VESSEL_COLOR)
        display.SetOpacity(opacity)
        display.SetVisibility2D(True)  # show the intersection in slice views

    def remove_node(self, role: str) -> None:
        """Remove a node and its subject-hierarchy item (a bare scene has no logic that would drop the item)."""
        node = self.node(role)
        if node is None:
            return
        sh = self.subject_hierarchy
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, True, False)  # removes the data node too
        if self.scene.GetNodeByID(node.GetID()) is not None:
            self.scene.RemoveNode(node)
        self.nodes.pop(role, None)

    def remove_preview(self) -> None:
        for role in ("preview_volume", "preview_model"):
            self.remove_node(role)

    # -- final outputs --
    def output_steps(self, outputs: dict, metrics: dict | None = None, load_volume: bool = True,
                     load_model: bool = True, load_segmentation: bool = True, load_sequence: bool = True,
                     load_renders: bool = True, threshold: float | None = None,
                     keep_preview: bool = False) -> list[LoadStep]:
        """The final results of a ``done`` event as small pieces: the panel runs one per timer tick, each piece's
        ``read`` (files, numpy) in a background thread and its ``apply`` (scene changes) in the main thread."""
        metrics = dict(metrics or {})  # the done event's summary; iso_level: the level the engine meshed at
        steps = []
        volume_path = outputs.get("volume")
        if load_volume and volume_path and os.path.isfile(volume_path):
            steps.append(LoadStep("volume", self._apply_volume,
                                  lambda: prepare_image(*read_volume_file(volume_path))))
        mesh_path = outputs.get("mesh_vtk") or outputs.get("mesh_stl")
        if load_model and mesh_path and os.path.isfile(mesh_path):
            steps.append(LoadStep("model", self._apply_model, lambda: read_polydata_ras(mesh_path)))
        if load_segmentation and ((load_volume and volume_path) or outputs.get("segmentation")):
            iso = _first_number(metrics, ("iso_level", "threshold"))
            steps.append(LoadStep("segmentation", self._apply_mask,
                                  lambda: _mask_image(segmentation_mask(outputs.get("segmentation"), volume_path,
                                                                        threshold, iso))))
        seq_path = outputs.get("volume_4d")
        if load_sequence and seq_path and os.path.isfile(seq_path):
            steps.append(LoadStep("sequence", self._apply_sequence, lambda: read_sequence_file(seq_path)))
        renders = _volume_file_in(outputs.get("renders"))
        if load_renders and renders:
            steps.append(LoadStep("renders", self._apply_renders, lambda: read_volume_file(renders)))
        if not keep_preview:
            steps.append(LoadStep("preview_removed", lambda _data: self.remove_preview()))
        return steps

    def load_outputs(self, outputs: dict, **options) -> list[str]:
        """Create the final nodes from a ``done`` event's outputs at once (scripts, tests); returns the roles."""
        changed, pending = [], self.output_steps(outputs, **options)
        while pending:
            step = pending.pop(0)
            pending[:0] = step.run()
            for role in step.roles:
                if role not in changed:
                    changed.append(role)
        return [r for r in changed if r != "preview_removed"]

    def _apply_volume(self, prepared) -> None:
        node = self.node("volume") or self._new_node("vtkMRMLScalarVolumeNode", f"{self.run_name} vessels", "volume")
        show_image(node, prepared)

    def _apply_model(self, polydata) -> None:
        node = self.node("model") or self._new_node("vtkMRMLModelNode", f"{self.run_name} surface", "model")
        node.SetAndObservePolyData(polydata)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
            self._style_model(node)

    def _apply_mask(self, data) -> None:
        if data is None:
            return
        image, level = data
        self._put_labelmap(image)  # the model shows the surface; the segment's own 3D surface on demand
        self.threshold = level

    def _apply_sequence(self, data) -> list:
        """Create the 4D sequence and its browser; the frames follow as one step each."""
        frames, ijk_to_ras, values, index_name = data
        sequence = self.node("sequence")
        if sequence is None:
            sequence = self._new_node("vtkMRMLSequenceNode", f"{self.run_name} 4D", "sequence")
        else:
            sequence.RemoveAllDataNodes()
        sequence.SetIndexName(index_name or "time")
        sequence.SetIndexType(sequence.NumericIndex)
        steps = [LoadStep("sequence", lambda prepared, i=i: self._add_sequence_frame(sequence, prepared, values[i]),
                          read=lambda i=i: prepare_image(frames[i], ijk_to_ras))
                 for i in range(len(frames))]
        steps.append(LoadStep("sequence_browser", lambda _d: self._browse(
            sequence, "sequence_browser", f"{self.run_name} 4D browser", "sequence_proxy", f"{self.run_name} 4D frame")))
        return steps

    def _add_sequence_frame(self, sequence, prepared, value) -> None:
        self._display_ranges.setdefault(sequence.GetID(), prepared[2])  # the first frame's, for the proxy
        node = slicer.vtkMRMLScalarVolumeNode()
        show_image(node, prepared)
        # The sequence stores a copy of the node it is given: give it an empty one, then hand this frame's voxels over
        # (shallow: copying a 256^3 frame took ~50 ms of the main thread; nothing else holds this node)
        sequence.SetDataNodeAtValue(slicer.vtkMRMLScalarVolumeNode(), str(value))
        sequence.UpdateDataNodeAtValue(node, str(value), True)

    def _browse(self, sequence, role: str, name: str, proxy_role: str, proxy_name: str) -> list:
        """A browser for ``sequence`` with a proxy volume made here (its display node gets the first frame's
        window/level, so that Slicer does not scan the voxels for one in the main thread).  Two steps: the proxy,
        then the browser's first update (each copies one frame)."""
        logic = self.sequences_logic  # registers the browser node class in a bare scene
        browser = self.node(role)
        if browser is None:
            browser = self._new_node("vtkMRMLSequenceBrowserNode", name, role)
            browser.SetPlaybackLooped(True)
            browser.SetPlaybackRateFps(8.0)
        proxy = self.node(proxy_role)
        if proxy is None:
            proxy = self._new_node("vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(proxy_name), proxy_role)
            show_image(proxy, (None, np.eye(4), self._display_ranges.get(sequence.GetID(), (0.0, 1.0))))
            browser.AddProxyNode(proxy, sequence, False)

        def first_update(_data):
            browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
            logic.UpdateProxyNodesFromSequences(browser)

        return [LoadStep(role, first_update)]

    def _apply_renders(self, data) -> list:
        """The rendered DSA as a sequence of 2D images (one per frame, detector pixels and spacing, not placed in
        patient space), shown in a slice view like any 2D image; one frame per step."""
        stack, ijk_to_ras = data
        spacing = np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)
        image_to_ras = np.diag([spacing[0], spacing[1], 1.0, 1.0])  # pixel (i, j) at (i, j) * spacing, frame plane
        sequence = self.node("renders")
        if sequence is None:
            sequence = self._new_node("vtkMRMLSequenceNode", f"{self.run_name} rendered DSA", "renders")
        else:
            sequence.RemoveAllDataNodes()
        sequence.SetIndexName("frame")
        sequence.SetIndexType(sequence.NumericIndex)
        steps = [LoadStep("renders", lambda prepared, k=k: self._add_sequence_frame(sequence, prepared, k),
                          read=lambda k=k: prepare_image(stack[k:k + 1], image_to_ras))
                 for k in range(stack.shape[0])]
        steps.append(LoadStep("renders_browser", lambda _d: self._browse(sequence, "renders_browser",
                                                                          f"{self.run_name} rendered DSA browser",
                                                                          "renders_proxy",
                                                                          f"{self.run_name} rendered DSA frame")))
        return steps

    # -- segmentation --
    def _segmentation_node(self):
        node = self.node("segmentation")
        if node is None:
            _ = self.segmentations_logic  # a bare scene needs the logic for the representation converters
            node = self._new_node("vtkMRMLSegmentationNode", f"{self.run_name} segmentation", "segmentation")
            node.CreateDefaultDisplayNodes()
            segmentation = node.GetSegmentation()
            segmentation.AddEmptySegment(SEGMENT_ID, "Vessels", list(VESSEL_COLOR))
        volume = self.node("volume")
        if volume is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        return node

    def _put_labelmap(self, image, surface=None) -> None:
        """Make ``image`` (a vtkOrientedImageData of 0/1 made in a background thread) the vessel segment's labelmap and
        ``surface`` (its closed surface, RAS) its 3D shape, without any conversion here: two pointer swaps and the
        events the views need (a conversion of a noisy 256^3 mask took a minute in the main thread)."""
        node = self._segmentation_node()
        segmentation = node.GetSegmentation()
        segment = segmentation.GetSegment(SEGMENT_ID)
        if segment is None:
            segmentation.AddEmptySegment(SEGMENT_ID, "Vessels", list(VESSEL_COLOR))
            segment = segmentation.GetSegment(SEGMENT_ID)
        segment.SetLabelValue(1)  # the new labelmap is a layer of its own, vessels = 1
        segment.AddRepresentation(BINARY_LABELMAP, image)
        image.Modified()  # the source representation changed: what was derived from the old one goes, views update
        if surface is not None:
            segment.AddRepresentation(CLOSED_SURFACE, surface)
            segmentation.InvokeEvent(slicer.vtkSegmentation.RepresentationModified, SEGMENT_ID)
            segmentation.InvokeEvent(slicer.vtkSegmentation.ContainedRepresentationNamesModified)

    # -- threshold and exports: the inputs are taken and the results applied here, the work is vessels.* --
    def threshold_input(self) -> tuple:
        """(voxels [k, j, i], IJK->RAS) of the final volume for ``vessels.segment_volume`` in a background thread; the
        array views the node's voxels (no copy) and keeps them alive even if the node gets new ones meanwhile."""
        volume = self.node("volume")
        if volume is None or volume.GetImageData() is None:
            raise RuntimeError(protocol.tr("there is no reconstructed volume to threshold yet"))
        return slicer.util.arrayFromVolume(volume), ijk_to_ras_of(volume)

    def apply_segment(self, segment: vessels.VesselSegment) -> int:
        """Put a ``vessels.segment_volume`` result into the segmentation (fast); returns the vessel voxel count."""
        if self.node("volume") is None:
            raise RuntimeError(protocol.tr("the reconstructed volume was removed from the scene meanwhile"))
        self._put_labelmap(segment.image, segment.surface)
        self.threshold = segment.threshold
        return segment.voxels

    def set_threshold(self, threshold: float) -> int:
        """Re-segment the final volume at ``threshold`` (1/mm) here and now (scripts; the panel does the work in a
        background thread); returns the number of vessel voxels."""
        return self.apply_segment(vessels.segment_volume(*self.threshold_input(), threshold))

    def labelmap_snapshot(self) -> vessels.LabelmapSnapshot:
        """A copy of the vessel segment's labelmap (milliseconds) and the final volume's grid, for the exports'
        background part: edits of the segmentation meanwhile do no harm."""
        seg, volume = self.node("segmentation"), self.node("volume")
        if seg is None:
            raise RuntimeError(protocol.tr("there is no segmentation to export"))
        if volume is None or volume.GetImageData() is None:
            raise RuntimeError(protocol.tr("there is no reconstructed volume to export the segmentation on"))
        segment = seg.GetSegmentation().GetSegment(SEGMENT_ID)
        image = segment.GetRepresentation(BINARY_LABELMAP) if segment is not None else None
        if image is None:
            raise RuntimeError(protocol.tr("the segmentation has no vessel labelmap: apply a threshold first"))
        copy = slicer.vtkOrientedImageData()
        copy.DeepCopy(image)
        i, j, k = volume.GetImageData().GetDimensions()
        return vessels.LabelmapSnapshot(copy, int(segment.GetLabelValue()), (k, j, i), ijk_to_ras_of(volume),
                                        segment.GetName() or "Vessels", tuple(segment.GetColor()))

    def apply_labelmap(self, prepared, name: str | None = None):
        """Show a ``vessels.labelmap_from_snapshot`` result as the run's labelmap volume (created once, then updated in
        place: the image is swapped in, nothing is scanned here); returns the node."""
        image, ijk_to_ras = prepared
        labelmap = self.node("labelmap") or self._new_node("vtkMRMLLabelMapVolumeNode",
                                                           name or f"{self.run_name} vessels label", "labelmap")
        if labelmap.GetDisplayNode() is None:
            display = slicer.vtkMRMLLabelMapVolumeDisplayNode()
            self.scene.AddNode(display)
            display.SetAndObserveColorNodeID(self._label_colors().GetID())
            labelmap.SetAndObserveDisplayNodeID(display.GetID())
        labelmap.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
        labelmap.SetAndObserveImageData(image)
        return labelmap

    def _label_colors(self):
        """The labelmap's colour table: 0 background, 1 vessels in the segment's colour."""
        colors = self.node("label_colors")
        if colors is None:
            colors = self._new_node("vtkMRMLColorTableNode", f"{self.run_name} vessels colours", "label_colors")
            colors.SetTypeToUser()
            colors.SetNumberOfColors(2)
            colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
            colors.SetColor(1, "vessels", *VESSEL_COLOR, 1.0)
        return colors

    def export_labelmap(self, name: str | None = None):
        """Export the vessel segment to a labelmap volume node on the final volume's grid, here and now (scripts)."""
        return self.apply_labelmap(vessels.labelmap_from_snapshot(self.labelmap_snapshot()), name)

    @property
    def file_stem(self) -> str:
        """The run's name as the stem of export file names."""
        return file_stem(self.run_name)

    def export_segmentation_files(self, folder: str | os.PathLike) -> list[str]:
        """Write the vessel segment as labelmap NRRD, .seg.nrrd and surface STL (LPS) into ``folder``, here and now
        (scripts; the panel writes them in a background thread)."""
        return vessels.write_export_files(self.labelmap_snapshot(), folder, self.file_stem, SEGMENT_ID)


def segmentation_mask(labelmap_path, volume_path, threshold, iso):
    """(mask [k, j, i], IJK->RAS, threshold used) - priority: the panel's threshold, else the engine's labelmap,
    else its iso level, else a guess.  Runs in a background thread, so it reads files only (never the scene)."""
    if threshold is None and labelmap_path and os.path.isfile(labelmap_path):
        mask, ijk_to_ras = read_volume_file(labelmap_path)
        return mask > 0, ijk_to_ras, iso
    if not (volume_path and os.path.isfile(volume_path)):
        return None
    array, ijk_to_ras = read_volume_file(volume_path)
    level = threshold if threshold is not None else (iso if iso is not None else suggest_threshold(array))
    return array >= level, ijk_to_ras, float(level)


def _mask_image(data):
    """``segmentation_mask``'s result as (segment labelmap image, threshold) - made in the loading thread too."""
    if data is None:
        return None
    mask, ijk_to_ras, level = data
    return vessels.oriented_image(mask, ijk_to_ras), level


def suggest_threshold(array: np.ndarray) -> float:
    """A default vessel threshold when the engine gave none: half the 99.9th percentile of positive values."""
    positive = np.asarray(array)[np.asarray(array) > 0]
    if positive.size == 0:
        return 0.0
    return float(0.5 * np.percentile(positive, 99.9))


def _first_number(d: dict, keys) -> float | None:
    for key in keys:
        value = d.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _volume_file_in(path) -> str | None:
    """``path`` if it is a volume file; the first volume file inside it if it is a folder."""
    if not path:
        return None
    p = Path(path)
    suffixes = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
    if p.is_file():
        return str(p) if str(p).lower().endswith(suffixes) else None
    if p.is_dir():
        for candidate in sorted(p.iterdir()):
            if candidate.is_file() and candidate.name.lower().endswith(suffixes):
                return str(candidate)
    return None


def file_stem(name: str) -> str:
    """A run name as a file name stem (letters, digits, - _ . kept)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "DRGS4D"
