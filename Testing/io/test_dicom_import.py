"""DICOM import round trip: the tiny phantom case -> XA / Enhanced XA files in each vendor style -> import.

The imported case must have the phantom's geometry (to 1e-6), its DSA (to the 16-bit quantisation of the
files), and an FDK reconstruction with the same metrics against the phantom's truth."""

import json

import numpy as np
import pytest

from drgs_core.ct import fdk
from drgs_core.evaluate import evaluate_volume
from drgs_core.geometry import view_indices
from drgs_core.io import read_case
from drgs_core.io.dicom import find_pairs, import_dicom, list_runs, write_import
from drgs_core.io.dicom_write import case_to_dicom
from drgs_core.metrics import robust_iso_level


@pytest.fixture(scope="module")
def phantom(tiny_case):
    return read_case(tiny_case)


def assert_same_geometry(got, ref, reverse=False):
    idx = slice(None, None, -1) if reverse else slice(None)
    assert got.detector_shape == ref.detector_shape
    np.testing.assert_allclose(got.detector_spacing, ref.detector_spacing, rtol=0, atol=1e-6)
    assert abs(got.sad - ref.sad) < 1e-6 and abs(got.sid - ref.sid) < 1e-6
    np.testing.assert_allclose(got.primary_angles, ref.primary_angles[idx], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.secondary_angles, ref.secondary_angles[idx], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [
    dict(style="ge"),                              # offsets from the first frame
    dict(style="siemens"),                         # absolute angles in the increments, base 0
    dict(style="constant"),                        # one constant step
    dict(style="enhanced"),                        # Enhanced XA, per-frame functional groups
    dict(style="ge", mask_reversed=True),          # the mask rotation runs the other way
    dict(style="ge", one_instance="jump"),         # both rotations in one instance
    dict(style="siemens", one_instance="reverse"),  # ... the second turning back
    dict(style="ge", intensity="LOG"),             # log-encoded pixels with a Modality LUT
])
def test_variants_give_the_phantom_case(tmp_path, phantom, variant):
    case_to_dicom(phantom, tmp_path / "dicom", **variant)
    result = import_dicom(tmp_path / "dicom", grid=phantom.grid)
    reverse = variant.get("one_instance") == "reverse"
    assert_same_geometry(result.case.geometry, phantom.geometry, reverse=reverse)
    ref = phantom.dsa[::-1] if reverse else phantom.dsa
    # 16-bit pixel data: about one count in the darkest pixels (12-bit log steps for LOG)
    err = np.abs(result.case.dsa - ref)
    big, mean = (0.05, 2e-3) if variant.get("intensity") == "LOG" else (0.01, 2e-4)
    assert err.max() < big and err.mean() < mean, (err.max(), err.mean())
    assert result.pair.reversed == (bool(variant.get("mask_reversed")) or reverse)


def test_round_trip_case_folder_and_fdk_metrics(tmp_path, tiny_case, phantom):
    case_to_dicom(phantom, tmp_path / "dicom", style="ge")
    runs = list_runs(tmp_path / "dicom")
    assert len(runs) == 2 and all(r.usable for r in runs)
    (pair,) = find_pairs(runs)
    assert pair.mask.acquisition_time < pair.fill.acquisition_time

    out = write_import(import_dicom(tmp_path / "dicom", grid=phantom.grid), tmp_path / "case")
    again = read_case(out)
    assert_same_geometry(again.geometry, phantom.geometry)
    assert again.grid == phantom.grid
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["fill"]["sop_instance_uid"] == pair.fill.sop_uid
    assert provenance["mask"]["series_instance_uid"] == pair.mask.series_uid
    assert "offset from the first frame" in provenance["angle_rule"]["fill"]

    metrics = []
    for case in (phantom, again):
        idx = view_indices(case.n_frames, 8)
        vol = fdk(case.dsa[idx], case.geometry.subset(idx), case.grid).clamp_min(0).numpy()
        metrics.append(evaluate_volume(vol, case.grid, float(robust_iso_level(vol)), f"{tiny_case}/truth"))
    for key in ("cd_mm", "hd95_mm", "best_dice"):
        assert abs(metrics[0][key] - metrics[1][key]) < 1e-2 * max(1.0, abs(metrics[0][key])), key


def test_scan_skips_non_dicom_and_dicomdir(tmp_path, phantom):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    case_to_dicom(phantom, tmp_path / "dicom", style="ge")
    (tmp_path / "dicom" / "notes.txt.bak").write_text("not DICOM")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "DRGS"
    ds.save_as(str(tmp_path / "dicom" / "DICOMDIR"), enforce_file_format=True)
    assert len(list_runs(tmp_path / "dicom")) == 2
    # a .txt list of files is a source too (the Slicer DICOM database hands over file paths)
    files = [str(p) for p in (tmp_path / "dicom").rglob("IMG*")]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(files))
    assert {r.path for r in list_runs(listing)} == set(files)


def test_biplane_plane_b_needs_an_explicit_choice(tmp_path, phantom):
    from drgs_core.errors import DRGSInputError

    paths = case_to_dicom(phantom, tmp_path / "dicom", style="ge", plane="B")
    with pytest.raises(DRGSInputError, match="biplane plane B"):
        import_dicom(tmp_path / "dicom", grid=phantom.grid)
    runs = list_runs(tmp_path / "dicom")
    fill = next(r for r in runs if r.path == str(paths["fill"]))
    mask = next(r for r in runs if r.path == str(paths["mask"]))
    result = import_dicom(tmp_path / "dicom", fill=fill.id, mask=mask.series_uid, grid=phantom.grid)
    assert result.pair.fill.plane == "B"


def test_one_instance_is_read_and_decoded_once(tmp_path, phantom, monkeypatch):
    """Both rotations in one file: the pixel data is read once for fill and mask, not once per run."""
    import pydicom

    case_to_dicom(phantom, tmp_path / "dicom", style="ge", one_instance="jump")
    reads = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        if not kwargs.get("stop_before_pixels"):
            reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    result = import_dicom(tmp_path / "dicom", grid=phantom.grid)
    assert len(reads) == 1, reads
    assert np.abs(result.case.dsa - phantom.dsa).max() < 0.01
