"""The panel's "DICOM" input mode end to end: real DICOM files written with pydicom (a Siemens-style mask/fill pair),
found in a stand-in of Slicer's DICOM database (a real SQLite file, queried in a background thread), listed by a
real worker process in the background (every timer tick short), the pair preselected and its derived geometry and
warnings shown; then the Reconstruct button starts the real worker on the DICOM request and the result lands in the
scene."""

import json
import pathlib
import sys
import threading
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_standins import FakeDicomDatabase, load_module, tick_until  # noqa: E402


@pytest.fixture
def written(tmp_path, tiny_case):
    """The tiny phantom (16 frames of 32 x 32 pixels) as a Siemens-style mask and fill series."""
    from drgs_core.io.case_folder import read_case
    from drgs_core.io.dicom_write import case_to_dicom

    case = read_case(tiny_case)
    return dict(case_to_dicom(case, tmp_path / "dicom", style="siemens"), sad=case.geometry.sad)


@pytest.fixture
def widget(monkeypatch, scene, tmp_path, worker_env, written):
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    module = load_module(monkeypatch, scene, tmp_path, "5.6")
    db = FakeDicomDatabase(tmp_path / "db", {"1.1": ("XA", [str(written["mask"])]), "1.2": ("CT", ["ct1"]),
                                             "1.3": ("XA", [str(written["fill"])])})
    monkeypatch.setattr(slicer, "dicomDatabase", db, raising=False)
    w = module.DRGS4DSlicerWidget()
    w.setup()
    w.enter()
    w._task[1].cancel()  # the probe started by enter()
    w._task = None
    yield w
    w.cleanup()
    sys.modules.pop("DRGS4DSlicer", None)


def test_dicom_mode_lists_preselects_describes_and_reconstructs(widget, written, tmp_path, monkeypatch):
    dicom_runs = sys.modules["DRGS4DSlicer"].dicom_runs
    query, threads = dicom_runs.xa_files_in_database, []
    monkeypatch.setattr(dicom_runs, "xa_files_in_database",
                        lambda *a: threads.append(threading.current_thread()) or query(*a))
    p = widget._parameterNode
    p.inputMode = "DICOM"
    assert widget.ui.dicomWidget.visible and not widget.ui.geometryWidget.visible
    assert not widget.ui.applyButton.enabled  # nothing listed yet

    t0 = time.perf_counter()
    widget.onListDicom()  # the database's two XA series (the CT series is not handed over)
    assert time.perf_counter() - t0 < 0.5 and "background" in widget.ui.dicomSummaryLabel.text
    assert not widget.ui.listDicomButton.enabled and not widget.ui.checkInputsButton.enabled
    lister = widget._task[1].lister
    ticks = tick_until(widget, lambda: widget._task is None)
    assert max(ticks) < 0.1
    assert threads and threading.main_thread() not in threads  # the database file was read in the background
    assert lister.sources == [str(written["mask"]), str(written["fill"])]  # the CT series was not handed over

    listing = widget._dicomListing
    by_path = {r["path"]: r["id"] for r in listing.runs}
    mask_id, fill_id = by_path[str(written["mask"])], by_path[str(written["fill"])]
    mask_combo, fill_combo = widget.ui.dicomMaskComboBox, widget.ui.dicomFillComboBox
    assert [d for _, d in mask_combo._items] == [mask_id, fill_id] == [d for _, d in fill_combo._items]
    assert mask_combo.itemData(mask_combo.currentIndex) == mask_id  # the automatic pair
    assert fill_combo.itemData(fill_combo.currentIndex) == fill_id
    assert "16 frames" in mask_combo.currentText
    summary = widget.ui.dicomSummaryLabel.text
    assert "16 frames of 32 x 32 pixels" in summary
    assert "source-isocentre {:.1f} mm".format(written["sad"]) in summary
    assert "warning:" in summary and "Siemens style" in summary
    assert p.nFrames == 16 and widget.ui.viewsSlider.maximum == 16
    assert widget.ui.applyButton.enabled and widget.ui.listDicomButton.enabled

    mask_combo.currentIndex = 1  # fill chosen as the mask too: no pair, no Reconstruct
    assert "two different runs" in widget.ui.dicomSummaryLabel.text and not widget.ui.applyButton.enabled
    mask_combo.currentIndex = 0
    assert widget.ui.applyButton.enabled

    p.outputFolder = tmp_path / "out"
    p.preset, p.views, p.iterations, p.device, p.previewInterval = "tiny", 8, 100, "cpu", 0
    p.loadSequence, p.loadRenderedDSA, p.showVolumeRendering = False, False, False
    widget.onApplyButton()
    job = widget._job
    assert job is not None, widget.ui.statusLabel.text
    request = json.loads((job.run_dir / "drgs4d_request.json").read_text())
    assert (request["fill_uid"], request["mask_uid"]) == (fill_id, mask_id)
    assert pathlib.Path(request["dicom"]) == job.run_dir / "inputs" / "dicom_runs.txt"  # kept with the run
    assert pathlib.Path(request["dicom"]).read_text().split() == [str(written["fill"]), str(written["mask"])]
    assert not widget.ui.listDicomButton.enabled and not widget.ui.inputsCollapsibleButton.enabled
    tick_until(widget, lambda: widget._job is None)
    assert job.state.status == "done", (job.state.error, job.log_lines[-20:])
    volume = p.resultVolume
    grid = listing.pair(mask_id, fill_id)["geometry"]["volume_resolution"]
    assert volume is not None and volume.GetImageData().GetDimensions() == tuple(grid)
    assert float(np.max(slicer.util.arrayFromVolume(volume))) > 0
    assert widget.ui.listDicomButton.enabled


def test_a_folder_without_runs_and_an_empty_database_say_what_to_do(widget, monkeypatch, tmp_path):
    p = widget._parameterNode
    p.inputMode = "DICOM"
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDicomDatabase(tmp_path / "empty", {}), raising=False)
    widget.onListDicom()
    tick_until(widget, lambda: widget._task is None, timeout=60)
    assert "holds no XA series" in widget.ui.dicomSummaryLabel.text
    monkeypatch.setattr(slicer, "dicomDatabase", None, raising=False)
    widget.onListDicom()
    assert widget._task is None and "No DICOM database is open" in widget.ui.dicomSummaryLabel.text
    p.dicomUseDatabase = False
    widget.onListDicom()
    assert widget._task is None and "Choose a folder" in widget.ui.dicomSummaryLabel.text
    p.dicomFolder = tmp_path / "missing"
    widget.onListDicom()
    tick_until(widget, lambda: widget._task is None, timeout=120)
    assert "could not be listed" in widget.ui.dicomSummaryLabel.text
    assert "does not exist" in widget.ui.dicomSummaryLabel.text
    assert widget.ui.dicomMaskComboBox.count == 0 and not widget.ui.applyButton.enabled
