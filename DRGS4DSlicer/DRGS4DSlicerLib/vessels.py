"""The Results section's slow work, for a background thread: the vessel segmentation at a threshold (isolated specks
removed by the engine's rule), its closed surface, a segment's labelmap on the result volume's grid, and the export
files.  Only numpy, VTK data objects and files - no MRML node, no scene, no Qt - so nothing here needs Slicer's main
thread; ``scene.SceneUpdater`` puts the results into the scene there (a pointer swap each).

VTK filters release the GIL while they run (VTK_PYTHON_FULL_THREADSAFE, on in VTK 9 and in Slicer's build), and so
do numpy's array operations, SciPy's labelling and SimpleITK's file I/O, so the main thread keeps running meanwhile.

Axes and units: voxel arrays are [k, j, i] as MRML/VTK arrays them; ``ijk_to_ras`` is the 4x4 voxel-index -> RAS
matrix (mm); surfaces are RAS mm in the scene and LPS mm in files, as Slicer writes them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from .protocol import tr

log = logging.getLogger("DRGS4D.vessels")

#: windowed-sinc smoothing of the voxel-staircase surface (a few iterations keep thin vessels' shape)
SMOOTHING_ITERATIONS = 15
SMOOTHING_PASS_BAND = 0.05


@dataclass
class VesselSegment:
    """A segmentation made in the background: ``image`` (vtkOrientedImageData, 0/1 unsigned char, the volume's grid)
    and its closed ``surface`` (vtkPolyData, RAS mm), ready to be put into a segment as they are."""

    image: object
    surface: object
    threshold: float
    voxels: int  # vessel voxels
    speck_voxels: int  # voxels of the isolated specks removed


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    out.DeepCopy([float(v) for v in np.asarray(matrix, float).reshape(-1)])
    return out


def voxel_spacing_kji(ijk_to_ras: np.ndarray) -> tuple:
    """Voxel size (mm) along the array's axes k, j, i."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)[::-1])


def oriented_image(mask_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """A vtkOrientedImageData (a segment's labelmap) holding ``mask_kji`` as 0/1 unsigned char."""
    import slicer  # vtkSegmentationCore's data class (a VTK object, not an MRML node)

    image = _with_mask(slicer.vtkOrientedImageData(), mask_kji)
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return image


def _with_mask(image, mask_kji: np.ndarray):
    """`image` (a vtkImageData) sized to ``mask_kji`` [k, j, i] and holding a copy of it as 0/1 unsigned char."""
    mask = np.ascontiguousarray(mask_kji, dtype=np.uint8)
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.reshape(-1), deep=True,
                                                                array_type=vtk.VTK_UNSIGNED_CHAR))
    return image


def remove_specks(array_kji: np.ndarray, threshold: float, spacing_kji) -> tuple[np.ndarray, int]:
    """(segmentation ``array >= threshold`` without the isolated specks, voxels removed) by the engine's rule with its
    defaults (drgs_core.specks: small components farther than a few mm from a larger one; the engine's own labelmap
    at its iso-level is the same); without the engine's modules here every component is kept (a note in the log)."""
    try:
        from drgs_core.specks import drop_specks
    except ImportError as exc:  # an engine without SciPy in this interpreter: the plain threshold
        log.info("isolated specks are kept (%s)", exc)
        mask = np.asarray(array_kji) >= threshold
        return mask, 0
    _, mask, info = drop_specks(array_kji, threshold, spacing=spacing_kji)
    return mask, int(info["dropped_voxels"])


def closed_surface(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> vtk.vtkPolyData:
    """The closed surface (RAS mm, outward normals) around the voxels of a 0/1 mask: discrete flying edges on the
    mask padded with a layer of zeros (so that it closes at the volume's border), light windowed-sinc smoothing."""
    padded = np.pad(np.ascontiguousarray(mask_kji, dtype=np.uint8), 1)
    k, j, i = padded.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.SetOrigin(-1.0, -1.0, -1.0)  # index space of the unpadded grid
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(padded.reshape(-1), deep=True,
                                                                array_type=vtk.VTK_UNSIGNED_CHAR))
    contour = vtk.vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 1)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(contour.GetOutputPort())
    smooth.SetNumberOfIterations(SMOOTHING_ITERATIONS)
    smooth.SetPassBand(SMOOTHING_PASS_BAND)
    smooth.NormalizeCoordinatesOn()
    smooth.BoundarySmoothingOff()
    smooth.FeatureEdgeSmoothingOff()
    smooth.NonManifoldSmoothingOn()
    transform = vtk.vtkTransform()
    transform.SetMatrix(_vtk_matrix(ijk_to_ras))
    to_ras = vtk.vtkTransformPolyDataFilter()
    to_ras.SetInputConnection(smooth.GetOutputPort())
    to_ras.SetTransform(transform)
    last = to_ras
    if np.linalg.det(np.asarray(ijk_to_ras, float)[:3, :3]) < 0:  # a mirroring grid turns the faces inside out
        reverse = vtk.vtkReverseSense()
        reverse.SetInputConnection(to_ras.GetOutputPort())
        reverse.ReverseCellsOn()
        last = reverse
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(last.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.Update()
    surface = vtk.vtkPolyData()
    surface.ShallowCopy(normals.GetOutput())
    return surface


def segment_volume(array_kji: np.ndarray, ijk_to_ras: np.ndarray, threshold: float) -> VesselSegment:
    """The vessel segmentation of a result volume at ``threshold`` (1/mm): voxels at or above it, less the isolated
    specks, with its closed surface.  Any thread."""
    mask, dropped = remove_specks(array_kji, float(threshold), voxel_spacing_kji(ijk_to_ras))
    mask = mask.astype(np.uint8)
    voxels = int(np.count_nonzero(mask))
    surface = closed_surface(mask, ijk_to_ras) if voxels else vtk.vtkPolyData()
    return VesselSegment(oriented_image(mask, ijk_to_ras), surface, float(threshold), voxels, dropped)


@dataclass
class LabelmapSnapshot:
    """A segment's labelmap as the main thread took it (a copy, so that an edit meanwhile does no harm), its name and
    colour, and the grid of the result volume to put it on: ``shape`` [k, j, i] and ``ijk_to_ras``."""

    image: object  # vtkOrientedImageData
    label_value: int
    shape: tuple
    ijk_to_ras: np.ndarray
    name: str = "Vessels"
    color: tuple = (0.85, 0.2, 0.2)


def mask_on_grid(snapshot: LabelmapSnapshot) -> np.ndarray:
    """The segment's voxels on the volume's grid as a 0/1 unsigned char array [k, j, i] (nearest-neighbour resampling
    where the segmentation's geometry differs, padding or cropping where only its extent does).  Any thread."""
    import slicer

    k, j, i = snapshot.shape
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    reference.SetImageToWorldMatrix(_vtk_matrix(snapshot.ijk_to_ras))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            snapshot.image, reference, resampled, False, True):
        raise RuntimeError(tr("the vessel segment could not be put on the volume's grid"))
    extent = resampled.GetExtent()
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    scalars = resampled.GetPointData().GetScalars()
    values = numpy_support.vtk_to_numpy(scalars).reshape(dims) if scalars is not None else np.zeros(dims)
    mask = np.zeros((k, j, i), np.uint8)
    lo = np.array([extent[4], extent[2], extent[0]])
    src = tuple(slice(max(0, -lo[a]), min(dims[a], snapshot.shape[a] - lo[a])) for a in range(3))
    dst = tuple(slice(max(0, lo[a]), max(0, lo[a]) + (src[a].stop - src[a].start)) for a in range(3))
    if all(s.stop > s.start for s in src):
        mask[dst] = values[src] == snapshot.label_value
    return mask


def label_image(mask_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """(vtkImageData holding the 0/1 mask, IJK->RAS) for a labelmap volume node: the node only swaps it in."""
    return _with_mask(vtk.vtkImageData(), mask_kji), np.asarray(ijk_to_ras, float)


def labelmap_from_snapshot(snapshot: LabelmapSnapshot):
    """``label_image`` of a segment snapshot (Export to labelmap, background part)."""
    return label_image(mask_on_grid(snapshot), snapshot.ijk_to_ras)


# ---- export files --------------------------------------------------------------------------------------------------

def _sitk_image(mask_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """A SimpleITK image of the mask in LPS, as Slicer writes volumes (RAS = diag(-1, -1, 1) LPS)."""
    import SimpleITK as sitk

    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask_kji, dtype=np.uint8))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).reshape(-1)])
    return image


def segmentation_fields(shape_kji, name: str, color, segment_id: str) -> dict:
    """The key:=value fields that make a labelmap NRRD a Slicer segmentation (.seg.nrrd) with one segment of label
    value 1 in layer 0."""
    k, j, i = shape_kji
    return {"Segment0_ID": segment_id, "Segment0_Name": name, "Segment0_NameAutoGenerated": "0",
            "Segment0_Color": " ".join(f"{float(c):g}" for c in color), "Segment0_ColorAutoGenerated": "0",
            "Segment0_LabelValue": "1", "Segment0_Layer": "0", "Segment0_Extent": f"0 {i - 1} 0 {j - 1} 0 {k - 1}",
            "Segment0_Tags": "", "Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_SourceRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0", "Segmentation_ConversionParameters": ""}


def _write_nrrd(mask_kji, ijk_to_ras, path: Path, fields: dict | None = None) -> None:
    """A compressed NRRD of the mask at ``path``, read back before it counts: same size, same number of voxels."""
    import SimpleITK as sitk

    image = _sitk_image(mask_kji, ijk_to_ras)
    for key, value in (fields or {}).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), True)
    back = sitk.ReadImage(str(path))
    if (tuple(back.GetSize()) != tuple(reversed(np.shape(mask_kji)))
            or int(np.count_nonzero(sitk.GetArrayViewFromImage(back))) != int(np.count_nonzero(mask_kji))
            or any(back.GetMetaData(key) != value for key, value in (fields or {}).items() if value)):
        raise OSError(tr("{path} did not read back as written.", path=path))


def _write_stl(surface: vtk.vtkPolyData, path: Path) -> None:
    """A binary STL of a RAS surface, in LPS (a half turn about S: faces keep their orientation), read back."""
    flip = vtk.vtkTransform()
    flip.Scale(-1.0, -1.0, 1.0)
    to_lps = vtk.vtkTransformPolyDataFilter()
    to_lps.SetInputData(surface)
    to_lps.SetTransform(flip)
    writer = vtk.vtkSTLWriter()
    writer.SetInputConnection(to_lps.GetOutputPort())
    writer.SetFileTypeToBinary()
    writer.SetHeader("DRGS4D vessel surface SPACE=LPS")
    writer.SetFileName(str(path))
    if not writer.Write():
        raise OSError(tr("{path} could not be written.", path=path))
    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(path))
    reader.ScalarTagsOff()
    reader.Update()
    if reader.GetOutput().GetNumberOfCells() != surface.GetNumberOfPolys():
        raise OSError(tr("{path} did not read back as written.", path=path))


def export_names(folder, stem: str) -> dict:
    """The files an export writes: labelmap NRRD, segmentation (.seg.nrrd), surface (STL, LPS)."""
    folder = Path(folder)
    return {"labelmap": folder / f"{stem}_vessels_label.nrrd", "segmentation": folder / f"{stem}_vessels.seg.nrrd",
            "surface": folder / f"{stem}_vessels.stl"}


def write_export_files(snapshot: LabelmapSnapshot, folder, stem: str, segment_id: str) -> list[str]:
    """Write the segment as labelmap NRRD, .seg.nrrd and surface STL into ``folder`` (Export files, background
    part).  Every file is written under a temporary name and read back; only when all three are right do they take
    their names, so a failure leaves neither a partial file nor a mix of old and new ones."""
    mask = mask_on_grid(snapshot)
    if not np.any(mask):
        raise RuntimeError(tr("the vessel segment is empty: apply a lower threshold first"))
    targets = export_names(folder, stem)
    next(iter(targets.values())).parent.mkdir(parents=True, exist_ok=True)
    partial = {role: path.with_name(".partial-" + path.name) for role, path in targets.items()}
    try:
        _write_nrrd(mask, snapshot.ijk_to_ras, partial["labelmap"])
        _write_nrrd(mask, snapshot.ijk_to_ras, partial["segmentation"],
                    segmentation_fields(mask.shape, snapshot.name, snapshot.color, segment_id))
        _write_stl(closed_surface(mask, snapshot.ijk_to_ras), partial["surface"])
        for role, path in targets.items():
            os.replace(partial[role], path)
    finally:
        for path in partial.values():
            if path.exists():
                path.unlink()
    return [str(path) for path in targets.values()]
