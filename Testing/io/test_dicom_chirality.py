"""Chirality of the DICOM import: an asymmetric phantom in patient LPS, projected here straight from the DICOM
definitions (PS3.3 C.8.7.5.1.2: the positioner angles give the detector's direction, +primary = LAO = patient's
left, +secondary = cranial; frames shown as seen from behind the detector, head up), written as XA, imported and
reconstructed with FDK.  Each blob must come back on its own side (a mirror error flips one axis and keeps the
reconstruction sharp, so only positions can catch it).

The projector below shares nothing with the importer or the engine geometry: it builds source and detector
positions from the angles by the standard's words, not from drgs_core.geometry or the import mapping.
"""

import nibabel as nib
import numpy as np
import pytest

from drgs_core.ct import fdk
from drgs_core.geometry import VolumeGrid
from drgs_core.io import write_volume
from drgs_core.io.dicom import import_dicom
from drgs_core.io.dicom_write import write_xa_run

# (centre LPS mm, radius mm, attenuation 1/mm): a left branch, an anterior one and a superior one
BLOBS = {"left": ((36.0, 0.0, 0.0), 9.0, 0.05), "anterior": ((0.0, -34.0, 6.0), 8.0, 0.05),
         "superior": ((-6.0, 8.0, 36.0), 8.0, 0.05)}
SID, SOD, H, W, PIXEL = 1200.0, 750.0, 40, 40, 5.0   # detector 200 mm: 125 mm at the isocentre


def detector_frame(a_deg, b_deg):
    """Unit vectors in LPS: n (isocentre -> detector), up (image top), col (image column direction)."""
    a, b = np.radians(a_deg), np.radians(b_deg)
    # AP (0, 0): detector anterior (-y); LAO turns it towards the patient's left (+x); cranial tilts it to +z
    n = np.array([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), np.sin(b)])
    up = np.array([-np.sin(a) * np.sin(b), np.cos(a) * np.sin(b), np.cos(b)])  # the head side, tilted with n
    # seen from behind the detector looking at the patient: the viewer's right-hand side is up x n
    col = np.cross(up, n)
    return n, up, col


def project_blobs(a_deg, b_deg):
    """Line integrals [H, W] through the blobs for one frame, rows top-down, columns as stored in DICOM."""
    n, up, col = detector_frame(a_deg, b_deg)
    source = -SOD * n
    centre = (SID - SOD) * n
    r = (np.arange(H) - (H - 1) / 2) * PIXEL
    c = (np.arange(W) - (W - 1) / 2) * PIXEL
    pix = centre + c[None, :, None] * col - r[:, None, None] * up
    d = pix - source
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    out = np.zeros((H, W))
    for centre_b, radius, mu in BLOBS.values():
        rel = np.asarray(centre_b) - source
        t = d @ rel
        dist2 = rel @ rel - t * t
        out += mu * 2 * np.sqrt(np.clip(radius ** 2 - dist2, 0, None))
    return out


def write_phantom_runs(folder, a_deg, b_deg):
    fill = np.stack([1.0e4 * np.exp(-project_blobs(a, b)) for a, b in zip(a_deg, b_deg)])
    mask = np.full_like(fill, 1.0e4)
    common = dict(sid=SID, sod=SOD, spacing=(PIXEL, PIXEL), scale=6.0, study_uid="1.2.3.4",
                  frame_of_reference_uid="1.2.3.4.5")
    write_xa_run(folder / "mask", mask, a_deg, b_deg, time="100000", series_number=1, **common)
    write_xa_run(folder / "fill", fill, a_deg, b_deg, time="100100", series_number=2, **common)


def centroid(volume, grid, region):
    """Centroid (LPS mm) of the voxels above half the peak inside region(x, y, z), and that peak (1/mm)."""
    x, y, z = np.meshgrid(*grid.axes(), indexing="ij")
    w = np.clip(volume, 0, None) * region(x, y, z)
    if w.max() <= 0:
        return None, 0.0
    top = w > 0.5 * w.max()
    return np.array([x[top].mean(), y[top].mean(), z[top].mean()]), float(w.max())


@pytest.mark.parametrize("secondary_deg", [0.0, 12.0])
def test_left_branch_lands_on_patient_left(tmp_path, secondary_deg):
    a = np.linspace(-100.0, 100.0, 72)            # RAO 100 -> LAO 100
    b = np.full_like(a, secondary_deg)             # 0 or 12 deg cranial
    write_phantom_runs(tmp_path / "dicom", a, b)
    case = import_dicom(tmp_path / "dicom", grid=VolumeGrid((32, 32, 32), (4.0, 4.0, 4.0))).case
    vol = fdk(case.dsa, case.geometry, case.grid).numpy()

    checks = {"left": lambda x, y, z: x > 20, "anterior": lambda x, y, z: y < -18,
              "superior": lambda x, y, z: z > 20}
    mirrors = {"left": lambda x, y, z: x < -20, "anterior": lambda x, y, z: y > 18,
               "superior": lambda x, y, z: z < -20}
    for name, region in checks.items():
        where, peak = centroid(vol, case.grid, region)
        _, mirror_peak = centroid(vol, case.grid, mirrors[name])
        assert np.linalg.norm(where - BLOBS[name][0]) < 4.0, (name, where)
        assert mirror_peak < 0.3 * peak, (name, peak, mirror_peak)

    # the same volume as Slicer sees it: the NIfTI affine maps voxels to RAS, where the patient's left is -x
    path = write_volume(tmp_path / "volume.nii.gz", vol, case.grid)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    ijk = np.argwhere(data > 0.5 * data.max())
    ras = nib.affines.apply_affine(img.affine, ijk)
    left_in_ras = ras[ras[:, 0] < -20]
    assert len(left_in_ras) > 0 and len(ras[ras[:, 0] > 20]) == 0
    assert abs(left_in_ras[:, 0].mean() + BLOBS["left"][0][0]) < 4.0


def test_projector_matches_the_imported_engine_geometry(tmp_path):
    """A blob centre projected by the engine geometry of the imported case lands where this file's DICOM
    projector draws the blob (to a fraction of a pixel), for oblique cranial views."""
    a = np.linspace(-90.0, 90.0, 61)
    b = np.linspace(5.0, 15.0, 61)
    write_phantom_runs(tmp_path / "dicom", a, b)
    case = import_dicom(tmp_path / "dicom", grid=VolumeGrid((8, 8, 8), (4.0, 4.0, 4.0))).case
    centre = np.asarray(BLOBS["left"][0])
    uv, _ = case.geometry.project(centre[None], frames=[0, 30, 60])
    for i, k in enumerate([0, 30, 60]):
        img = case.dsa[k]
        only_left = np.zeros_like(img)
        # the engine image of the left blob alone: the DICOM projection with the other blobs removed, mirrored
        keep = {"left": BLOBS["left"]}
        saved = dict(BLOBS)
        BLOBS.clear()
        BLOBS.update(keep)
        try:
            only_left = project_blobs(a[k], b[k])[:, ::-1]
        finally:
            BLOBS.clear()
            BLOBS.update(saved)
        v, u = np.indices(only_left.shape)
        cu, cv = (only_left * u).sum() / only_left.sum(), (only_left * v).sum() / only_left.sum()
        assert abs(cu - uv[i, 0, 0]) < 0.5 and abs(cv - uv[i, 0, 1]) < 0.5, (k, cu, cv, uv[i, 0])
        assert img.max() > 0
