"""Small writers of LPS files, independent of the engine's own, for the scene tests that need a file the engine does
not write (an oblique direction matrix, a mesh header to edit).  Volumes are [x, y, z] arrays on a grid centred on the
isocentre: first voxel centre = -phy/2 + spacing/2 (METHOD §2)."""

from __future__ import annotations

import os

import numpy as np


def first_voxel_centre(shape, spacing):
    shape = np.asarray(shape, float)
    spacing = np.asarray(spacing, float)
    return -0.5 * shape * spacing + 0.5 * spacing


def write_volume_lps(path, volume_xyz, spacing, origin=None, direction=None):
    """NIfTI/NRRD through SimpleITK; ``origin`` (LPS mm of voxel (0,0,0)) defaults to the centred grid."""
    import SimpleITK as sitk

    volume_xyz = np.asarray(volume_xyz)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume_xyz, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    o = first_voxel_centre(volume_xyz.shape, spacing) if origin is None else np.asarray(origin, float)
    image.SetOrigin([float(v) for v in o])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction, float).reshape(-1)])
    tmp = str(path) + ".part" + (".nii.gz" if str(path).endswith(".nii.gz") else os.path.splitext(str(path))[1])
    sitk.WriteImage(image, tmp)
    os.replace(tmp, path)
    return str(path)


def write_mesh_vtk_lps(path, vertices, faces):
    """Legacy ASCII VTK polydata with the 'SPACE=LPS' header comment."""
    vertices = np.asarray(vertices, float)
    faces = np.asarray(faces, int)
    lines = ["# vtk DataFile Version 3.0", "DRGS4D test mesh SPACE=LPS", "ASCII", "DATASET POLYDATA",
             f"POINTS {len(vertices)} float"]
    lines += [" ".join(f"{c:.6f}" for c in v) for v in vertices]
    lines.append(f"POLYGONS {len(faces)} {len(faces) * 4}")
    lines += ["3 " + " ".join(str(i) for i in f) for f in faces]
    tmp = str(path) + ".part"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return str(path)


def cube_mesh(centre, half):
    c = np.asarray(centre, float)
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * half + c
    faces = [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
             [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    return corners, np.array(faces)

