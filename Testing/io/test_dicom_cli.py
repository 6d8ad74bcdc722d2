"""`drgs4d import-dicom` (listing, import, choice by UID), `drgs4d reconstruct --dicom` options and
`drgs4d phantom --dicom`, run through the real CLI entry point."""

import json

import numpy as np

from drgs_core.cli import build_parser, main
from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
from drgs_core.io import Case, read_case
from drgs_core.io.dicom_write import case_to_dicom


def small_case():
    n, h, w = 20, 8, 10
    dsa = np.zeros((n, h, w), np.float32)
    dsa[:, 2:5, 3:7] = 0.8
    geometry = ConeBeamGeometry(700.0, 1100.0, (h, w), (0.8, 0.7), np.radians(np.linspace(-95, 95, n)))
    return Case(dsa=dsa, geometry=geometry, grid=VolumeGrid((8, 8, 8), (4.0, 4.0, 4.0)))


def test_list_then_import_by_uid(tmp_path, capsys):
    written = case_to_dicom(small_case(), tmp_path / "dicom", style="enhanced", mask_reversed=True)
    assert main(["import-dicom", str(tmp_path / "dicom"), "--list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    ids = {r["path"]: r["id"] for r in listing["runs"]}
    assert listing["pairs"] == [{"mask": ids[str(written["mask"])], "fill": ids[str(written["fill"])],
                                 "reversed": True, "plane": "", "n_frames": 20}]

    assert main(["import-dicom", str(tmp_path / "dicom"), "--list"]) == 0
    table = capsys.readouterr().out
    assert "mask of pair 1" in table and "fill of pair 1" in table and "-185.0..5.0" in table

    out = tmp_path / "case"
    assert main(["import-dicom", str(tmp_path / "dicom"), "--out", str(out), "--fill", ids[str(written["fill"])],
                 "--mask", ids[str(written["mask"])], "--volume", "16", "--voxel-size", "2.5"]) == 0
    case = read_case(out)
    assert case.grid == VolumeGrid((16, 16, 16), (2.5, 2.5, 2.5))
    np.testing.assert_allclose(case.geometry.primary_angles, small_case().geometry.primary_angles, atol=1e-6)
    assert json.loads((out / "provenance.json").read_text())["mask_reversed"] is True
    # an existing folder is never overwritten
    assert main(["import-dicom", str(tmp_path / "dicom"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_reconstruct_options_reach_the_config(tmp_path):
    from drgs_core.cli import _reconstruct_config

    a = build_parser().parse_args(["reconstruct", "--dicom", str(tmp_path), "--fill-uid", "1.2#2", "--mask-uid",
                                   "1.2#1", "--out", str(tmp_path / "o")])
    cfg = _reconstruct_config(a)
    assert (cfg.dicom, cfg.fill_uid, cfg.mask_uid, cfg.case) == (str(tmp_path), "1.2#2", "1.2#1", None)


def test_phantom_dicom_option(tmp_path, capsys):
    from drgs_core.io.dicom import import_dicom

    assert main(["phantom", str(tmp_path / "ph"), "--frames", "12", "--detector", "16", "--volume", "12",
                 "--no-noise", "--dicom", str(tmp_path / "dicom"), "--dicom-style", "siemens"]) == 0
    ref = read_case(tmp_path / "ph")
    got = import_dicom(tmp_path / "dicom", grid=ref.grid).case
    np.testing.assert_allclose(got.geometry.primary_angles, ref.geometry.primary_angles, atol=1e-6)
    assert np.abs(got.dsa - ref.dsa).max() < 0.02


def test_reconstruct_from_dicom_end_to_end(tmp_path, tiny_case, capsys):
    """`drgs4d reconstruct --dicom` runs the whole pipeline on the tiny phantom written as XA."""
    case_to_dicom(read_case(tiny_case), tmp_path / "dicom", style="ge")
    out = tmp_path / "run"
    code = main(["reconstruct", "--dicom", str(tmp_path / "dicom"), "--out", str(out), "--preset", "tiny",
                 "--device", "cpu", "--iterations", "5", "--views", "6", "--n-gaussians", "200", "--times-4d", "2",
                 "--checkpoint-every", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_gaussians"] > 0 and (out / "volume.nii.gz").is_file()
