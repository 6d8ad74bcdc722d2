"""The panel's DICOM mode logic (DRGS4DSlicerLib.dicom_runs): a real worker subprocess lists real DICOM files
written with pydicom, the pair is preselected, its derived geometry described, and the request it builds loads
through the engine's pipeline.  Slicer's DICOM database is a real SQLite file with the columns CTK uses
(slicer_standins.FakeDicomDatabase); the path list a long listing writes never outlives it."""

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from DRGS4DSlicerLib import dicom_runs
from slicer_standins import FakeDicomDatabase

REPO = Path(__file__).resolve().parents[2]


def small_case():
    from drgs_core.geometry import ConeBeamGeometry, VolumeGrid
    from drgs_core.io import Case

    n, h, w = 20, 8, 10
    dsa = np.zeros((n, h, w), np.float32)
    dsa[:, 3:5, 2:8] = 1.2
    geometry = ConeBeamGeometry(750.0, 1200.0, (h, w), (0.6, 0.5), np.radians(np.linspace(-100, 100, n)),
                                np.radians(np.full(n, -3.0)))
    return Case(dsa=dsa, geometry=geometry, grid=VolumeGrid((8, 8, 8), (4.0, 4.0, 4.0)))


@pytest.fixture
def dicom_folder(tmp_path):
    from drgs_core.io.dicom_write import case_to_dicom

    written = case_to_dicom(small_case(), tmp_path / "dicom", style="siemens")
    return written


def in_process_listing(paths):
    from drgs_core.io.dicom import listing

    return dicom_runs.RunListing.from_event({"event": "dicom_runs", **listing(paths)}, paths)


def wait(lister, timeout=60):
    deadline = time.time() + timeout
    while True:
        result = lister.poll()
        if result is not None:
            return result
        if time.time() > deadline:
            lister.cancel()
            raise AssertionError("the listing worker did not finish")
        time.sleep(0.05)


def list_files_left(folder):
    return sorted(Path(folder).glob(dicom_runs.LIST_FILE_PREFIX + "*"))


def fake_python(tmp_path, script):
    """An 'interpreter' that runs a shell script instead (hangs, crashes) for the failure paths."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def test_worker_lists_runs_and_the_pair_is_preselected(dicom_folder, tmp_path):
    lister = dicom_runs.DicomRunLister([dicom_folder["folder"]]).start()
    listing = wait(lister)
    by_path = {r["path"]: r["id"] for r in listing.runs}
    mask_id, fill_id = by_path[str(dicom_folder["mask"])], by_path[str(dicom_folder["fill"])]
    assert listing.preselection() == (mask_id, fill_id)
    assert [c[0] for c in listing.choices()] == [mask_id, fill_id]
    lines = "\n".join(listing.summary_lines(mask_id, fill_id))
    assert "20 frames of 8 x 10 pixels" in lines and "source-isocentre 750.0 mm" in lines
    assert "-190.0 to 10.0 deg" in lines and "secondary 3.0 to 3.0 deg" in lines
    assert "warning: fill:" in lines and "Siemens style" in lines
    assert "do not form" in listing.summary_lines(fill_id, mask_id)[0]

    # the request the panel would start: the engine's own config and loader accept it
    from drgs_core.pipeline import ReconstructConfig, load_case

    request = listing.request(mask_id, fill_id, str(tmp_path / "out"), preset="tiny", device="cpu",
                              detector_binning=1)
    case = load_case(ReconstructConfig.from_dict(request))
    ref = small_case()
    np.testing.assert_allclose(case.geometry.primary_angles, ref.geometry.primary_angles, atol=1e-9)
    np.testing.assert_allclose(case.geometry.secondary_angles, ref.geometry.secondary_angles, atol=1e-9)


def test_worker_error_is_reported(tmp_path):
    lister = dicom_runs.DicomRunLister([tmp_path / "missing"]).start()
    with pytest.raises(RuntimeError, match="does not exist"):
        wait(lister)


def _gone(worker, timeout=10.0):
    deadline = time.monotonic() + timeout
    while worker.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not worker.is_running()


def test_a_hung_listing_is_stopped_after_its_timeout_and_leaves_nothing(tmp_path):
    """An interpreter that never answers (here: a script that sleeps) is killed at the deadline, with a message; the
    path list of a long listing is removed."""
    sleeper = fake_python(tmp_path, "exec sleep 60")
    lister = dicom_runs.DicomRunLister([tmp_path / f"f{i}.dcm" for i in range(25)], python=sleeper, external=True,
                                       folder=tmp_path, timeout=0.5).start()
    assert len(list_files_left(tmp_path)) == 1  # 25 paths: handed over in a list file
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="took more than 0 s and was stopped"):
        wait(lister)
    assert time.monotonic() - t0 < 10
    assert _gone(lister.command.worker)  # the sleeping process is gone, not left behind
    assert list_files_left(tmp_path) == []


def test_a_cancelled_or_failed_listing_leaves_no_list_file(tmp_path):
    paths = [tmp_path / f"f{i}.dcm" for i in range(25)]
    lister = dicom_runs.DicomRunLister(paths, python=fake_python(tmp_path, "exec sleep 60"), external=True,
                                       folder=tmp_path).start()
    assert len(list_files_left(tmp_path)) == 1
    lister.cancel()
    assert _gone(lister.command.worker) and list_files_left(tmp_path) == []
    lister = dicom_runs.DicomRunLister(paths, python=fake_python(tmp_path, "echo broken >&2; exit 3"),
                                       external=True, folder=tmp_path).start()
    with pytest.raises(RuntimeError, match="exit code 3"):
        wait(lister)
    assert list_files_left(tmp_path) == []


def test_database_files_and_long_path_lists(dicom_folder, tmp_path):
    """XA files of the database's SQLite file (a relative name resolves against the database folder), listed by
    the worker through a path list that is removed afterwards; several sources make a request list in the run's
    inputs folder, never in the system temp folder."""
    mask, fill = str(dicom_folder["mask"]), str(dicom_folder["fill"])
    db = FakeDicomDatabase(dicom_folder["folder"], {"1.1": ("XA", [mask]), "1.2": ("CT", ["/x/ct1", "/x/ct2"]),
                                                    "1.3": ("XA ", [fill])})
    location = dicom_runs.database_location(db)
    files = dicom_runs.xa_files_in_database(*location)
    assert files == [mask, fill]
    assert dicom_runs.xa_files_in_database(*location, series_uids=["1.3"]) == [fill]
    assert dicom_runs.database_location(None) is None
    db.isOpen = False
    assert dicom_runs.database_location(db) is None

    lister = dicom_runs.DicomRunLister(files * 15, folder=tmp_path).start()  # 30 paths: handed over in a list file
    assert lister.command.args[0] == "--list-dicom" and lister.command.args[1].endswith(".txt")
    listing = wait(lister)
    assert len(listing.runs) == 2 and listing.preselection() is not None
    assert list_files_left(tmp_path) == []
    with pytest.raises(ValueError, match="folder"):
        listing.request(*listing.preselection(), out="")
    request = listing.request(*listing.preselection(), out="", folder=tmp_path / "run" / "inputs")
    assert request["dicom"] == str(tmp_path / "run" / "inputs" / dicom_runs.REQUEST_LIST_FILE)
    assert Path(request["dicom"]).read_text().split() == [fill, mask]


def test_plane_b_is_not_preselected(tmp_path):
    from drgs_core.io.dicom_write import case_to_dicom

    case_to_dicom(small_case(), tmp_path / "dicom", plane="B")
    listing = in_process_listing([str(tmp_path / "dicom")])
    assert len(listing.pairs) == 1 and listing.preselection() is None


def test_unusable_runs_say_why(tmp_path):
    from drgs_core.io.dicom_write import write_xa_run

    frames = np.full((6, 4, 4), 100.0)
    write_xa_run(tmp_path / "d" / "x", frames, np.zeros(6), np.zeros(6), sid=1200, sod=750, spacing=(1, 1),
                 attributes={"PixelIntensityRelationship": "DISP"})
    listing = in_process_listing([str(tmp_path / "d")])
    ((_, reason),) = listing.problems()
    assert "PixelIntensityRelationship is DISP" in reason
    assert listing.preselection() is None and listing.choices() == []


def test_module_imports_under_python_3_9_syntax():
    source = Path(dicom_runs.__file__).read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 9))
    assert "from __future__ import annotations" in source


def test_worker_describes_a_dicom_request(dicom_folder, tmp_path):
    from drgs_core import worker

    listing = in_process_listing([str(dicom_folder["folder"])])
    event, code = worker.describe(listing.request(*listing.preselection(), out=str(tmp_path / "o")))
    assert code == 0 and event["event"] == "described"
    assert event["case"]["n_frames"] == 20 and event["case"]["sad_mm"] == 750.0
