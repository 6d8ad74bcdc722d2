"""Volume, label map, 4D sequence and projection-stack files.

World frame (METHOD §3): DICOM patient LPS, millimetres, isocentre at 0.  A volume array is indexed
``[i, j, k] = (x, y, z)``; its voxel (i, j, k) centre is ``grid.first_voxel_centre + (i, j, k) * spacing``, so
written files carry origin = ``grid.first_voxel_centre`` (LPS), spacing = ``grid.spacing`` and an identity
direction matrix in LPS.

* NIfTI (``.nii``, ``.nii.gz``, via nibabel): NIfTI's world is RAS, so the stored qform/sform affine is
  ``diag(-1, -1, 1) @ [diag(spacing) | first_voxel_centre]``: index -> RAS = (-x, -y, z).  ITK/SimpleITK and
  3D Slicer convert back and report origin = first_voxel_centre and direction = identity in LPS.
* NRRD (``.nrrd`` attached, ``.nhdr`` detached, via pynrrd): ``space: left-posterior-superior``,
  ``space directions`` = diag(spacing), ``space origin`` = first voxel centre, ``kinds: domain domain domain``.

All writes are atomic (see :mod:`drgs_core.io.atomic`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DRGSInputError
from ..geometry import VolumeGrid
from .atomic import (WriteVerificationError, atomic_folder, atomic_path, move_files_in_order, verify_gzip_length,
                     verify_size)
from .gzip_parallel import write_gzip

log = logging.getLogger(__name__)

#: index -> RAS = LPS_TO_RAS @ (index -> LPS)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_NIFTI = (".nii", ".nii.gz")
_NRRD = (".nrrd",)
_NHDR = (".nhdr",)


def _lower_name(path) -> str:
    return Path(path).name.lower()


def volume_format(path) -> str:
    """'nifti', 'nrrd' or 'nhdr' from the file name; DRGSInputError for anything else."""
    name = _lower_name(path)
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(_NRRD):
        return "nrrd"
    if name.endswith(_NHDR):
        return "nhdr"
    raise DRGSInputError(f"unsupported volume file type for {Path(path).name}", f"extension of '{Path(path).name}'",
                         ".nii, .nii.gz, .nrrd or .nhdr", "choose one of these extensions")


def _to_numpy(array) -> np.ndarray:
    try:
        import torch
        if isinstance(array, torch.Tensor):
            return array.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(array)


def _check_grid_array(array, grid: VolumeGrid, what: str, leading: int = 0) -> np.ndarray:
    arr = _to_numpy(array)
    expected = tuple(grid.resolution)
    if arr.ndim != 3 + leading or tuple(arr.shape[leading:]) != expected:
        lead = "[T, " if leading else "["
        raise DRGSInputError(f"the {what} array does not match the volume grid", f"shape {tuple(arr.shape)}",
                             f"{lead}nx, ny, nz] with [nx, ny, nz] = {list(expected)}",
                             "pass an array laid out as [x, y, z] on this grid (transpose a SimpleITK [z, y, x] "
                             "array with .transpose(2, 1, 0))")
    return arr


def _float_array(arr: np.ndarray, dtype) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def nifti_affine(grid: VolumeGrid) -> np.ndarray:
    """The 4x4 NIfTI affine (index -> RAS mm) for `grid`: RAS = diag(-1, -1, 1) . LPS."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.diag(grid.spacing)
    affine[:3, 3] = LPS_TO_RAS @ grid.first_voxel_centre
    return affine


def _nrrd_header(grid: VolumeGrid) -> dict:
    return {
        "space": "left-posterior-superior",
        "space directions": np.diag(np.asarray(grid.spacing, float)),
        "space origin": np.asarray(grid.first_voxel_centre, float),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }


def _image_verifier(nbytes: int):
    """A check for atomic_path: the written NIfTI/NRRD holds a header plus `nbytes` of voxel data.

    Reads back only the header and the file's length (or the gzip stream's length field), so it is cheap; it
    catches files cut off by a full disk that SimpleITK reports no error for.
    """
    def verify(tmp: Path) -> None:
        name = tmp.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            import gzip
            import struct

            try:
                with (gzip.open if name.endswith(".gz") else open)(tmp, "rb") as fh:
                    head = fh.read(348)
                endian = "<" if struct.unpack("<i", head[:4])[0] == 348 else ">"
                offset = int(struct.unpack(endian + "f", head[108:112])[0])  # NIfTI-1 vox_offset
            except Exception as exc:  # noqa: BLE001 - a header that does not read back is a failed write
                raise WriteVerificationError(f"{tmp.name}: the header does not read back ({exc})") from None
            (verify_gzip_length if name.endswith(".gz") else verify_size)(tmp, offset + nbytes)
        elif name.endswith(".nrrd"):
            with open(tmp, "rb") as fh:
                head = fh.read(1 << 16)
            end = head.find(b"\n\n")
            if end < 0:
                raise WriteVerificationError(f"{tmp.name}: the NRRD header is cut off (is the disk full?)")
            encoding = next((line.split(b":", 1)[1].strip() for line in head[:end].split(b"\n")
                             if line.lower().startswith(b"encoding:")), b"raw")
            if encoding in (b"gzip", b"gz"):
                verify_gzip_length(tmp, nbytes, start=end + 2)
            else:
                verify_size(tmp, end + 2 + nbytes)
    return verify


def _write_nifti(tmp: Path, arr: np.ndarray, grid: VolumeGrid, label: bool) -> None:
    import nibabel as nib

    affine = nifti_affine(grid)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)  # scanner-based anatomical coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    if label:
        img.header.set_intent("label")
    if tmp.name.lower().endswith(".gz"):  # the bytes nib.save would write, gzip-compressed on all cores
        with open(tmp, "wb") as fh:
            write_gzip(fh, img.to_bytes())
    else:
        nib.save(img, str(tmp))


def _write_nrrd_any(path: Path, arr: np.ndarray, header: dict, fmt: str) -> None:
    import nrrd

    if fmt == "nrrd":
        with atomic_path(path, verify=_image_verifier(arr.nbytes)) as tmp:
            nrrd.write(str(tmp), arr, header, index_order="F", compression_level=1)
        return
    # detached header: write both files in a temporary folder, then move the data file and then the header
    with atomic_folder(path.parent) as tmpdir:
        nrrd.write(str(tmpdir / path.name), arr, header, index_order="F")
        names = sorted(p.name for p in tmpdir.iterdir())
        data_names = [n for n in names if n != path.name]
        move_files_in_order(tmpdir, path.parent, data_names + [path.name])


def write_volume(path, array, grid: VolumeGrid, *, dtype=np.float32) -> Path:
    """Write a volume ``array [nx, ny, nz]`` on `grid` to ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr``.

    Coordinates: LPS mm, origin = ``grid.first_voxel_centre``, spacing = ``grid.spacing``, identity direction
    (NIfTI affine: index -> RAS = (-x, -y, z), see module docstring).  Values are stored as `dtype` (float32 by
    default; ``dtype=None`` keeps the array's dtype; boolean arrays become uint8).  Torch tensors are accepted.
    Atomic.  Returns the path.
    """
    path = Path(path)
    fmt = volume_format(path)
    arr = _float_array(_check_grid_array(array, grid, "volume"), dtype)
    if fmt == "nifti":
        with atomic_path(path, verify=_image_verifier(arr.nbytes)) as tmp:
            _write_nifti(tmp, arr, grid, label=False)
    else:
        _write_nrrd_any(path, arr, _nrrd_header(grid), fmt)
    log.debug("wrote volume %s %s %s", path, arr.shape, arr.dtype)
    return path


def write_labelmap(path, mask, grid: VolumeGrid) -> Path:
    """Write a label map ``mask [nx, ny, nz]`` (bool or integer labels 0..255) as uint8, like write_volume.

    NIfTI files get intent 'label'.  Atomic.  Returns the path.
    """
    path = Path(path)
    fmt = volume_format(path)
    arr = _check_grid_array(mask, grid, "label map")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) or np.all(arr == np.round(arr))):
            raise DRGSInputError("the label map has non-integer values", f"dtype {arr.dtype}",
                                 "bool or integer labels 0..255", "threshold the volume first, e.g. volume > level")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DRGSInputError("the label map has labels outside 0..255",
                                 f"labels from {arr.min()} to {arr.max()}", "labels 0..255",
                                 "relabel the segments to 0..255")
    arr = arr.astype(np.uint8)
    if fmt == "nifti":
        with atomic_path(path, verify=_image_verifier(arr.nbytes)) as tmp:
            _write_nifti(tmp, arr, grid, label=True)
    else:
        _write_nrrd_any(path, arr, _nrrd_header(grid), fmt)
    return path


def write_sequence_nrrd(path, volumes, grid: VolumeGrid, times, *, index_name: str = "time",
                        index_unit: str = "", dtype=np.float32) -> Path:
    """Write a time series ``volumes [T, nx, ny, nz]`` as one 4D NRRD that 3D Slicer loads as a sequence.

    Layout (Slicer ``.seq.nrrd``): axis 0 is the list axis — ``sizes: T nx ny nz``, ``kinds: list domain domain
    domain``, ``space directions: none (dx,0,0) (0,dy,0) (0,0,dz)``, ``labels: "<index_name>" "" "" ""``; custom
    fields ``axis 0 index type:=numeric``, ``axis 0 index values:=t0 t1 ...`` (the `times`, e.g. normalised
    frame times in [0, 1)), ``DataNodeClassName:=vtkMRMLScalarVolumeNode``.  Space/origin as write_volume.
    Use the extension ``.seq.nrrd`` (or ``.nrrd``).  Gzip-encoded (level 1, compressed on all cores).  Atomic.
    Returns the path.
    """
    path = Path(path)
    if volume_format(path) != "nrrd":
        raise DRGSInputError("a sequence must be written as an attached NRRD", Path(path).name,
                             "a name ending in .seq.nrrd (or .nrrd)", "rename the output to e.g. volume.seq.nrrd")
    arr = _float_array(_check_grid_array(volumes, grid, "sequence", leading=1), dtype)
    t = np.asarray(_to_numpy(times), dtype=np.float64).reshape(-1)
    if t.size != arr.shape[0] or not np.all(np.isfinite(t)):
        raise DRGSInputError("the sequence index values do not match the volumes",
                             f"{t.size} times for {arr.shape[0]} volumes", "one finite time per volume",
                             "pass times with one value per volume")
    sp = [repr(float(x)) for x in grid.spacing]
    quoted = lambda values: " ".join(f'"{v}"' for v in values)  # noqa: E731
    lines = ["NRRD0005", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", f"type: {_NRRD_TYPES[arr.dtype.str[1:]]}",
             "dimension: 4",
             "space: left-posterior-superior", "sizes: " + " ".join(str(int(x)) for x in arr.shape),
             f"space directions: none ({sp[0]},0,0) (0,{sp[1]},0) (0,0,{sp[2]})",
             "kinds: list domain domain domain", "endian: little", "encoding: gzip",
             "labels: " + quoted([index_name, "", "", ""])]
    if index_unit:
        lines.append("units: " + quoted([index_unit, "", "", ""]))
    lines += ["space origin: (" + ",".join(repr(float(x)) for x in grid.first_voxel_centre) + ")",
              "axis 0 index type:=numeric", "axis 0 index values:=" + " ".join(repr(float(x)) for x in t),
              "DataNodeClassName:=vtkMRMLScalarVolumeNode"]
    # the time axis varies fastest in the file: an array laid out that way (Fortran order, as the pipeline makes
    # it on the GPU) is written without a transposing copy
    data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False).T)
    # gzip level 1 on all cores: ~18x smaller than raw for mostly empty vessel volumes, and faster to disk
    with atomic_path(path, verify=_image_verifier(arr.nbytes)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(lines) + "\n\n").encode("ascii"))
            write_gzip(fh, data, level=1)
    return path


#: numpy dtype (without byte order) -> NRRD type, for write_sequence_nrrd
_NRRD_TYPES = {"f4": "float", "f8": "double", "u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16",
               "u4": "uint32", "i4": "int32"}


def read_sequence_nrrd(path) -> tuple[np.ndarray, "VolumeInfo", np.ndarray]:
    """Read a sequence written by write_sequence_nrrd: (volumes [T, nx, ny, nz], VolumeInfo, times [T])."""
    import nrrd

    path = Path(path)
    if not path.is_file():
        raise DRGSInputError("sequence file not found", str(path), "an existing .seq.nrrd file", "check the path")
    data, header = nrrd.read(str(path), index_order="F")
    kinds = [k.lower() for k in header.get("kinds", [])]
    if data.ndim != 4 or not kinds or kinds[0] != "list":
        raise DRGSInputError(f"{path.name} is not a list-first 4D NRRD sequence",
                             f"dimension {data.ndim}, kinds {kinds}", "kinds: list domain domain domain",
                             "write it with write_sequence_nrrd")
    directions = np.asarray(header["space directions"], float)[1:]
    spacing = np.linalg.norm(directions, axis=1)
    info = VolumeInfo(tuple(data.shape[1:]), tuple(spacing), np.asarray(header["space origin"], float),
                      (directions / spacing[:, None]).T)
    values = header.get("axis 0 index values")
    times = (np.asarray([float(v) for v in values.split()]) if values
             else np.arange(data.shape[0], dtype=np.float64))
    return data, info, times


def write_stack(path, stack, spacing, *, dtype=np.float32) -> Path:
    """Write a projection stack ``[N, H, W]`` (frame, row v, column u) as NIfTI (``.nii``/``.nii.gz``) or NRRD.

    Written with SimpleITK from the [N, H, W] array, so ``GetArrayFromImage`` of the file gives [N, H, W] back
    (image size W x H x N).  Pixel spacing is (sx, sy, 1): `spacing` = (sx, sy) mm per detector pixel; the
    origin places the detector centre at 0 ((-(W-1)/2 sx, -(H-1)/2 sy, 0)); frames are spaced 1 apart.  Atomic.
    """
    import SimpleITK as sitk

    path = Path(path)
    fmt = volume_format(path)
    if fmt == "nhdr":
        raise DRGSInputError("projection stacks cannot be written as detached NRRD", path.name,
                             ".nii, .nii.gz or .nrrd", "choose one of these extensions")
    arr = _to_numpy(stack)
    if arr.ndim != 3:
        raise DRGSInputError("the projection stack must be 3D", f"shape {tuple(arr.shape)}", "[N, H, W]",
                             "stack the frames along the first axis")
    sx, sy = (float(s) for s in np.broadcast_to(np.asarray(spacing, float), (2,)))
    arr = np.ascontiguousarray(arr.astype(dtype, copy=False) if dtype is not None else arr)
    n, h, w = arr.shape
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((sx, sy, 1.0))
    img.SetOrigin((-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, 0.0))
    with atomic_path(path, verify=_image_verifier(arr.nbytes)) as tmp:
        if tmp.name.lower().endswith(".nii.gz"):
            # ITK's uncompressed NIfTI (same header), then gzip on all cores: ITK compresses on one thread
            raw = tmp.with_name(tmp.name[:-3])
            try:
                sitk.WriteImage(img, str(raw), False)
                data = raw.read_bytes()
            finally:
                raw.unlink(missing_ok=True)
            with open(tmp, "wb") as fh:
                write_gzip(fh, data)
        else:
            sitk.WriteImage(img, str(tmp), True, 1)
    return path


def read_stack(path, what: str = "projection stack") -> np.ndarray:
    """Read an image stack with SimpleITK as a float32 array [N, H, W] (2D images give N = 1)."""
    import SimpleITK as sitk

    path = Path(path)
    if _lower_name(path).endswith(_NIFTI):
        return _read_nifti_stack(path, what)
    _check_gzip_stream(path, what)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unknown error"
        raise DRGSInputError(f"the {what} {path.name} could not be read", first,
                             "a readable NIfTI (.nii/.nii.gz) or NRRD (.nrrd/.nhdr) image",
                             "check that the file is complete and not corrupted") from None
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() not in (2, 3):
        raise DRGSInputError(f"the {what} {path.name} is not a stack of grey-level images",
                             f"{img.GetDimension()}D image with {img.GetNumberOfComponentsPerPixel()} "
                             f"components per pixel, size {img.GetSize()}",
                             "a 3D single-component image of size W x H x N (frames along the 3rd axis)",
                             "export the run as one 3D grey-level image")
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        arr = arr[None]
    return arr.astype(np.float32, copy=False)


def _unreadable(path: Path, what: str, exc: BaseException) -> DRGSInputError:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return DRGSInputError(f"the {what} could not be read: it is truncated or corrupt", text,
                          "a complete NIfTI (.nii/.nii.gz) or NRRD (.nrrd/.nhdr) image",
                          "copy or export the file again (an interrupted download or copy cuts files short)")


def _check_gzip_stream(path: Path, what: str) -> None:
    """Decompress a .gz file to its end: a cut-off or damaged stream is an error (readers may zero-fill)."""
    if not _lower_name(path).endswith(".gz"):
        return
    import gzip

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, ValueError) as exc:
        raise _unreadable(path, what, exc) from None


def _read_nifti_stack(path: Path, what: str) -> np.ndarray:
    """NIfTI through nibabel, which raises on a truncated file and keeps NaN/inf (ITK's reader turns them to 0).

    The voxel buffer is the same one SimpleITK reads, so array.T is [N, H, W] as GetArrayFromImage gives it.
    """
    import nibabel as nib

    if not path.is_file():
        raise DRGSInputError(f"the {what} {path.name} does not exist", str(path), "an existing file",
                             "check the path")
    try:
        if _lower_name(path).endswith(".gz"):
            # inflate it all at once: gzip checks the stream's end and CRC (nibabel stops at the last voxel)
            import gzip

            raw = gzip.decompress(path.read_bytes())
            img = (nib.Nifti1Image if len(raw) >= 4 and raw[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")
                   else nib.Nifti2Image).from_bytes(raw)
        else:
            img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for damaged files
        raise _unreadable(path, what, exc) from None
    shape = arr.shape
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.dtype.kind not in "biuf":
        raise DRGSInputError(f"the {what} {path.name} is not a stack of grey-level images",
                             f"array of shape {shape} and type {arr.dtype}",
                             "a 3D single-component image of size W x H x N (frames along the 3rd axis)",
                             "export the run as one 3D grey-level image")
    arr = arr.T
    if arr.ndim == 2:
        arr = arr[None]
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True)
class VolumeInfo:
    """Where a volume read from a file sits in the world (LPS mm).

    resolution (nx, ny, nz); spacing (dx, dy, dz) mm; origin = centre of voxel (0, 0, 0) in LPS mm;
    direction [3, 3]: column d is the LPS direction of index axis d.  world = origin + direction @ (spacing * idx).
    """

    resolution: tuple
    spacing: tuple
    origin: np.ndarray
    direction: np.ndarray

    def index_to_world(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.float64)
        return index @ (np.asarray(self.direction) * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def world_to_index(self, points) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        m = np.asarray(self.direction) * np.asarray(self.spacing)
        return (points - np.asarray(self.origin)) @ np.linalg.inv(m).T

    def is_centred_grid(self, atol: float = 1e-3) -> bool:
        """True when this is a VolumeGrid (identity direction, box centred on the isocentre), within atol mm."""
        try:
            grid = VolumeGrid(self.resolution, self.spacing)
        except DRGSInputError:
            return False
        return bool(np.allclose(self.direction, np.eye(3), atol=1e-6)
                    and np.allclose(self.origin, grid.first_voxel_centre, atol=atol))

    @property
    def grid(self) -> VolumeGrid | None:
        """The matching VolumeGrid, or None when the volume is not centred / not axis-aligned (use origin)."""
        return VolumeGrid(self.resolution, self.spacing) if self.is_centred_grid() else None


def _reorient(arr: np.ndarray, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray):
    """Permute/flip a volume whose direction is a signed permutation so that its direction becomes identity."""
    perm = np.argmax(np.abs(direction), axis=1)  # world axis d <- index axis perm[d]
    if sorted(perm.tolist()) != [0, 1, 2] or not np.allclose(np.abs(direction[np.arange(3), perm]), 1, atol=1e-6):
        return arr, origin, spacing, direction, False
    arr = np.transpose(arr, perm)
    new_spacing = spacing[perm]
    new_origin = origin.copy()
    for d in range(3):
        if direction[d, perm[d]] < 0:
            arr = np.flip(arr, axis=d)
            new_origin[d] = origin[d] - (arr.shape[d] - 1) * new_spacing[d]
    return np.ascontiguousarray(arr), new_origin, new_spacing, np.eye(3), True


def _snap_float32(values) -> np.ndarray:
    """Values that are exactly float32 numbers (NIfTI stores geometry as float32) -> their shortest decimal.

    E.g. 0.6000000238418579 (float32(0.6)) -> 0.6, so that a grid written as 0.6 mm reads back as 0.6 mm.
    Values that are not float32-exact (NRRD stores text doubles) are returned unchanged.
    """
    out = np.asarray(values, dtype=np.float64).copy()
    for idx, x in np.ndenumerate(out):
        x32 = np.float32(x)
        if np.isfinite(x32) and float(x32) == x:
            out[idx] = float(str(x32))
    return out


def read_volume(path, *, reorient: bool = True) -> tuple[np.ndarray, VolumeInfo]:
    """Read a 3D NIfTI/NRRD (any format SimpleITK reads) as ``(array [nx, ny, nz], VolumeInfo)`` in LPS mm.

    The array keeps the file's dtype.  With ``reorient=True`` an axis-aligned volume whose direction is a signed
    permutation (e.g. a NIfTI stored in another orientation) is transposed/flipped so that its direction is the
    identity and ``array[i, j, k]`` runs along +x, +y, +z (LPS); oblique volumes are returned as stored.
    ``info.grid`` is the matching VolumeGrid for files written by write_volume.  Origin/spacing values that are
    exactly float32 numbers (NIfTI header storage) are snapped to their shortest decimal (float32(0.6) -> 0.6).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise DRGSInputError("volume file not found", str(path), "an existing .nii/.nii.gz/.nrrd/.nhdr file",
                             "check the path")
    # ITK may zero-fill a cut-off .gz, so the stream is checked to its end - on a thread, while ITK reads
    # (ITK releases the GIL): the file is inflated twice, but the wall time is about one inflate
    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(_check_gzip_stream, path, f"volume {path.name}")
        try:
            img, failure = sitk.ReadImage(str(path)), None
        except RuntimeError as exc:
            img, failure = None, exc
        check.result()  # a damaged stream is reported as such, before ITK's message
    if failure is not None:
        first = str(failure).strip().splitlines()[-1][:200] if str(failure).strip() else "unknown error"
        raise DRGSInputError(f"the volume {path.name} could not be read", first, "a readable NIfTI or NRRD volume",
                             "check that the file is complete")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DRGSInputError(f"{path.name} is not a 3D scalar volume",
                             f"{img.GetDimension()}D, {img.GetNumberOfComponentsPerPixel()} components",
                             "a 3D single-component volume", "for 4D sequences use read_sequence_nrrd")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    origin = _snap_float32(img.GetOrigin())
    spacing = _snap_float32(img.GetSpacing())
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    if reorient and not np.allclose(direction, np.eye(3), atol=1e-6):
        arr, origin, spacing, direction, done = _reorient(arr, origin, spacing, direction)
        if not done:
            log.info("%s has an oblique direction matrix; returned as stored", path)
    arr = np.ascontiguousarray(arr)
    return arr, VolumeInfo(tuple(int(s) for s in arr.shape), tuple(float(s) for s in spacing), origin, direction)
