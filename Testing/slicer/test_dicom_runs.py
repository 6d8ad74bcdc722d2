"""The panel's DICOM mode logic (DRGS4DSlicerLib.dicom_runs): a real worker subprocess lists real DICOM files
written with pydicom, the pair is preselected, its derived geometry described, and the request it builds loads
through the engine's pipeline."""

import ast
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from DRGS4DSlicerLib import dicom_runs

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


def worker_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_worker_lists_runs_and_the_pair_is_preselected(dicom_folder, tmp_path):
    lister = dicom_runs.DicomRunLister([dicom_folder["folder"]], python=sys.executable, env=worker_env()).start()
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
    lister = dicom_runs.DicomRunLister([tmp_path / "missing"], python=sys.executable, env=worker_env()).start()
    with pytest.raises(RuntimeError, match="does not exist"):
        wait(lister)


def test_a_hung_listing_is_stopped_after_its_timeout(tmp_path):
    """An interpreter that never answers (here: a script that sleeps) is killed at the deadline, with a message."""
    sleeper = tmp_path / "python"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")
    sleeper.chmod(0o755)
    lister = dicom_runs.DicomRunLister([tmp_path], python=str(sleeper), env=worker_env(), timeout=0.5).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="took more than"):
        wait(lister)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while lister.worker.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lister.worker.is_running()  # the sleeping process is gone, not left behind


class FakeDatabase:
    """The few ctkDICOMDatabase calls the logic uses, over real files."""

    def __init__(self, series):
        self.series = series  # {series uid: (modality, [files])}

    def patients(self):
        return ["p1"]

    def studiesForPatient(self, patient):
        return ["s1"]

    def seriesForStudy(self, study):
        return list(self.series)

    def filesForSeries(self, series):
        return self.series[series][1]

    def fileValue(self, path, tag):
        assert tag == "0008,0060"
        return next(mod for mod, files in self.series.values() if path in files)


def test_database_files_and_long_path_lists(dicom_folder, tmp_path):
    mask, fill = str(dicom_folder["mask"]), str(dicom_folder["fill"])
    db = FakeDatabase({"1.1": ("XA", [mask]), "1.2": ("CT", ["ct1", "ct2"]), "1.3": ("XA", [fill])})
    files = dicom_runs.xa_files_from_database(db)
    assert files == [mask, fill]
    assert dicom_runs.xa_files_from_database(db, ["1.3"]) == [fill]

    args = dicom_runs.worker_arguments(files * 15, folder=str(tmp_path))  # 30 paths: handed over in a list file
    assert args[0] == "--list-dicom" and len(args) == 2 and args[1].endswith(".txt")
    listing = in_process_listing([args[1]])
    assert len(listing.runs) == 2 and listing.preselection() is not None
    request = listing.request(*listing.preselection(), out=str(tmp_path / "out"))
    assert request["dicom"] == args[1]


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
