"""The panel's "DICOM" input mode without Qt: find rotational XA runs, preselect the mask/fill pair, describe what
the import will derive, and build the reconstruction request.

The heavy reading happens in the worker (``python -m drgs_core.worker --list-dicom PATH ...`` prints one
``dicom_runs`` event, see drgs_core.io.dicom.listing), started in the background by :class:`DicomRunLister` through
the panel's one command path (``process.WorkerCommand``); the panel polls it from a timer, so the GUI never blocks.
Inputs are a folder the user picked and/or the XA series of Slicer's DICOM database, whose SQLite file is read in a
background thread (:func:`xa_files_in_database`; only the file name is taken from the ``ctkDICOMDatabase`` object in
the main thread).  Many files are handed over as a ``.txt`` list that is removed when the listing ends.  Imports
neither Slicer nor the engine; runs under Python 3.9.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from . import process
from .protocol import tr

LISTING_EVENT = "dicom_runs"
MAX_ARGUMENT_PATHS = 20  # more paths than this travel in a .txt list file
LIST_FILE_PREFIX = "drgs4d-dicom-"  # the listing's own path list, <prefix>*.txt (removed when the listing ends)
REQUEST_LIST_FILE = "dicom_runs.txt"  # the fill and mask files of a request (kept with the run's inputs)
# The columns of ctkDICOMDatabase's SQLite schema read here (CTK Libs/DICOM/Core/Resources/dicom-schema.sql, schema
# 0.8.1; Series.Modality exists since 2012).  Filenames inside the database folder are stored relative to it.
XA_FILES_QUERY = ("SELECT Images.Filename FROM Series"
                  " JOIN Images ON Images.SeriesInstanceUID = Series.SeriesInstanceUID"
                  " WHERE upper(trim(Series.Modality)) = 'XA' {only} ORDER BY Series.rowid, Images.rowid")


def database_location(db):
    """(database file, database folder) of an open, file-based ``ctkDICOMDatabase`` (two property reads, for the
    main thread), or None when there is none."""
    if db is None or not getattr(db, "isOpen", False) or getattr(db, "isInMemory", False):
        return None
    filename = str(getattr(db, "databaseFilename", "") or "")
    if not filename or filename == ":memory:":
        return None
    return filename, str(getattr(db, "databaseDirectory", "") or os.path.dirname(filename))


def xa_files_in_database(filename: str, directory: str, series_uids=None) -> list:
    """Files of the XA series in a ctkDICOMDatabase SQLite file (opened read-only; for a background thread: it
    touches no Qt object), optionally only the given series; relative names resolve against ``directory``."""
    uids = list(series_uids or [])
    only = "AND Series.SeriesInstanceUID IN ({})".format(",".join("?" * len(uids))) if uids else ""
    uri = Path(filename).resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as connection:
        rows = connection.execute(XA_FILES_QUERY.format(only=only), uids).fetchall()
    return [os.path.normpath(os.path.join(directory, name)) for (name,) in rows if name]


def write_path_list(paths, path) -> str:
    """Write ``paths`` one per line into the file ``path`` (atomically; the worker reads it as a list)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(str(p) for p in paths) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


@dataclass
class RunListing:
    """The worker's ``dicom_runs`` event: runs (Run.summary() dicts), pairs (mask/fill ids + derived geometry)."""

    runs: list
    pairs: list
    preselected: int | None = None
    sources: list = field(default_factory=list)

    @classmethod
    def from_event(cls, event: dict, sources=()) -> "RunListing":
        if event.get("event") != LISTING_EVENT:
            raise ValueError(f"not a {LISTING_EVENT} event: {event.get('event')!r}")
        return cls(list(event.get("runs") or []), list(event.get("pairs") or []), event.get("preselected"),
                   [str(s) for s in sources])

    def run(self, run_id: str) -> dict:
        for r in self.runs:
            if r["id"] == run_id:
                return r
        raise KeyError(run_id)

    def usable_runs(self) -> list:
        return [r for r in self.runs if r.get("usable")]

    def choices(self) -> list:
        """(run id, label) for the mask / fill selectors: series, frames, angle range, time; usable runs only."""
        out = []
        for r in self.usable_runs():
            a = r.get("primary_deg") or [0.0, 0.0]
            values = dict(series=r.get("series_description") or r["kind"], frames=r["n_frames"],
                          start=f"{a[0]:.0f}", end=f"{a[1]:.0f}", time=r.get("acquisition_time") or "?",
                          plane=r.get("plane"))
            if r.get("plane"):
                label = tr("{series} - {frames} frames, {start} to {end} deg, plane {plane}, {time}", **values)
            else:
                label = tr("{series} - {frames} frames, {start} to {end} deg, {time}", **values)
            out.append((r["id"], label))
        return out

    def preselection(self):
        """(mask id, fill id) of the automatic pair, or None (no pair, or only a biplane plane-B pair)."""
        if self.preselected is None or not self.pairs:
            return None
        p = self.pairs[self.preselected]
        return p["mask"], p["fill"]

    def pair(self, mask_id: str, fill_id: str):
        for p in self.pairs:
            if p["mask"] == mask_id and p["fill"] == fill_id:
                return p
        return None

    def summary_lines(self, mask_id: str, fill_id: str) -> list:
        """Text for the panel (translated): the geometry the import derives for this pair and every warning, or why
        the two runs do not pair."""
        p = self.pair(mask_id, fill_id)
        if p is None:
            if mask_id == fill_id:
                return [tr("Mask and fill must be two different runs.")]
            return [tr("These two runs do not form a mask/fill pair (different frames, detector, distances or "
                       "angles); the reconstruction would refuse them.")]
        g = p["geometry"]
        lines = [
            tr("{frames} frames of {rows} x {columns} pixels ({row_mm} x {column_mm} mm)",
               frames=g["n_frames"], rows=g["detector_shape"][0], columns=g["detector_shape"][1],
               row_mm=f"{g['detector_spacing_mm'][0]:.3g}", column_mm=f"{g['detector_spacing_mm'][1]:.3g}"),
            tr("source-isocentre {sad} mm, source-detector {sid} mm",
               sad=f"{g['sad_mm']:.1f}", sid=f"{g['sid_mm']:.1f}"),
            tr("positioner primary {primary_start} to {primary_end} deg (step {step}); secondary {secondary_start} "
               "to {secondary_end} deg",
               primary_start=f"{g['dicom_primary_deg'][0]:.1f}", primary_end=f"{g['dicom_primary_deg'][1]:.1f}",
               step=f"{g['step_deg']:.2f}", secondary_start=f"{g['dicom_secondary_deg'][0]:.1f}",
               secondary_end=f"{g['dicom_secondary_deg'][1]:.1f}"),
            tr("angles: {rule}", rule=g["angle_rule"]),
            tr("default grid {size}^3 voxels of {spacing} mm",
               size=g["volume_resolution"][0], spacing=f"{g['volume_spacing_mm'][0]:.2f}"),
        ]
        if p.get("reversed"):
            lines.append(tr("the mask rotation runs in the opposite direction: frames are paired by angle"))
        lines += [tr("warning: {warning}", warning=w) for w in g.get("warnings", [])]
        return lines

    def problems(self) -> list:
        """(run id, reason) of every run that cannot be used, for a 'why is my run missing' list."""
        return [(r["id"], r.get("problem") or "") for r in self.runs if not r.get("usable")]

    def request(self, mask_id: str, fill_id: str, out: str, folder=None, **fields) -> dict:
        """ReconstructConfig fields for this pair (the worker reads the DICOM itself).  With several sources the
        two runs' files are listed in ``folder/dicom_runs.txt`` (the run's inputs folder: resume needs it too)."""
        if self.pair(mask_id, fill_id) is None:
            raise ValueError("the chosen runs are not a mask/fill pair")
        fill = self.run(fill_id)
        mask = self.run(mask_id)
        if len(self.sources) == 1:
            source = self.sources[0]
        elif folder is None:
            raise ValueError("a folder for the list of DICOM files is needed")
        else:
            source = write_path_list([fill["path"], mask["path"]], Path(folder) / REQUEST_LIST_FILE)
        return dict(fields, out=out, dicom=source, fill_uid=fill_id, mask_uid=mask_id)


class DicomRunLister:
    """Lists the DICOM runs of a folder and/or of Slicer's DICOM database in the background.

    The database's SQLite file is queried in a thread, then the worker's ``--list-dicom`` runs as a
    ``process.WorkerCommand`` (the panel's one launcher path: interpreter, environment, timeout, kill).  Call
    ``poll()`` from a timer: None while it runs, then a RunListing; a failure raises RuntimeError with a message for
    the user.  A listing that takes longer than ``timeout`` seconds is stopped and reported.  A path list file it
    writes is removed when the listing ends, fails, times out or is cancelled.
    """

    def __init__(self, paths=(), database=None, python: str | None = None, external: bool = False, folder=None,
                 timeout: float = 600.0, engine=None):
        self.sources = [str(p) for p in paths]
        self.database = database  # (file, folder) from database_location(), or None
        self.python, self.external, self.engine = python, external, engine
        self.folder = folder
        self.timeout = float(timeout)
        self.deadline = None
        self.command = None
        self.list_file = None
        self._query = None

    def start(self) -> "DicomRunLister":
        self.deadline = time.monotonic() + self.timeout
        if self.database is not None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drgs-dicom-db")
            self._query = executor.submit(xa_files_in_database, *self.database)
            executor.shutdown(wait=False)
        else:
            self._start_worker()
        return self

    def _start_worker(self) -> None:
        if not self.sources:
            raise RuntimeError(tr("The DICOM database holds no XA series: import the angiography runs with the DICOM "
                                  "module, or choose a folder of DICOM files."))
        paths = self.sources
        if len(paths) > MAX_ARGUMENT_PATHS:
            fd, self.list_file = tempfile.mkstemp(prefix=LIST_FILE_PREFIX, suffix=".txt", dir=self.folder)
            os.close(fd)
            paths = [write_path_list(paths, self.list_file)]
        seconds = max(1.0, self.deadline - time.monotonic())
        self.command = process.WorkerCommand(
            ["--list-dicom", *paths], python=self.python, external=self.external, timeout=seconds,
            engine=self.engine, timeout_message=tr(
                "Listing the DICOM runs took more than {seconds} s and was stopped: check that the folder is "
                "reachable, or choose a smaller one.", seconds=f"{self.timeout:.0f}"))

    def poll(self):
        try:
            return self._poll()
        except BaseException:
            self._remove_list_file()
            raise

    def _poll(self):
        if self._query is not None:
            if not self._query.done():
                if time.monotonic() > self.deadline:
                    self._query = None
                    raise RuntimeError(tr("Reading the DICOM database took more than {seconds} s.",
                                          seconds=f"{self.timeout:.0f}"))
                return None
            query, self._query = self._query, None
            try:
                files = query.result()
            except (sqlite3.Error, OSError) as exc:
                raise RuntimeError(tr("The DICOM database could not be read: {reason}", reason=exc)) from None
            self.sources = files + self.sources
            self._start_worker()
        event = self.command.poll()
        if event is None:
            return None
        self._remove_list_file()
        if event.get("event") == LISTING_EVENT:
            return RunListing.from_event(event, self.sources)
        raise RuntimeError(event.get("message") or tr("The DICOM listing ended without a result."))

    def cancel(self) -> None:
        if self._query is not None:
            self._query.cancel()  # a query already running ends on its own (it only reads a file)
            self._query = None
        if self.command is not None:
            self.command.cancel()
        self._remove_list_file()

    def _remove_list_file(self) -> None:
        if self.list_file is not None:
            try:
                os.remove(self.list_file)
            except FileNotFoundError:
                pass
            self.list_file = None
