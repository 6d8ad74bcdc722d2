"""Readers and writers: the public 4DRGS case folder, rotational XA DICOM (import), volumes, label maps, meshes,
sequences, stacks.

Units and axes: mm, radians; projection stacks [N, H, W] (frame, row v, column u); volumes [nx, ny, nz] = [x, y, z];
world coordinates in files are DICOM LPS mm (NIfTI stores RAS = (-x, -y, z)).  All writers are atomic.
"""

from .atomic import atomic_path
from .case import Case
from .case_folder import DEFAULT_I0, dsa_from_runs, read_case, read_runs, transforms_dict, write_case
from .dicom import import_dicom, list_runs, write_import
from .meshes import read_mesh, write_mesh
from .validation import check_views
from .volumes import (VolumeInfo, nifti_affine, read_sequence_nrrd, read_stack, read_volume, write_labelmap,
                      write_sequence_nrrd, write_stack, write_volume)

__all__ = [
    "Case", "read_case", "read_runs", "write_case", "write_volume", "write_labelmap", "write_mesh", "read_mesh",
    "write_sequence_nrrd", "write_stack", "atomic_path", "check_views", "read_volume",
    # extras
    "VolumeInfo", "read_sequence_nrrd", "read_stack", "nifti_affine", "transforms_dict", "dsa_from_runs",
    "DEFAULT_I0", "import_dicom", "list_runs", "write_import",
]
