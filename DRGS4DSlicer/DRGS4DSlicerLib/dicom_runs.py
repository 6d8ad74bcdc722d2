"""The panel's "DICOM" input mode without Qt: find rotational XA runs, preselect the mask/fill pair, describe what
the import will derive, and build the reconstruction request.

The heavy reading happens in the worker (``python -m drgs_core.worker --list-dicom PATH ...`` prints one
``dicom_runs`` event, see drgs_core.io.dicom.listing), started in the background by :class:`DicomRunLister`; the
panel polls it from a timer, so the GUI never blocks.  Inputs are a folder the user picked and/or files of the
Slicer DICOM database (:func:`xa_files_from_database`); many files are handed over as a ``.txt`` list
(:func:`write_path_list`).  Imports neither Slicer nor the engine; runs under Python 3.9.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

from . import process

LISTING_EVENT = "dicom_runs"
MODALITY_TAG = "0008,0060"
MAX_ARGUMENT_PATHS = 20  # more paths than this travel in a .txt list file


def xa_files_from_database(db, series_uids=None) -> list:
    """Files of the XA series in a ctkDICOMDatabase-like object (patients(), studiesForPatient(),
    seriesForStudy(), filesForSeries(), fileValue(file, "gggg,eeee")), optionally only the given series."""
    wanted = set(series_uids) if series_uids else None
    files = []
    for patient in db.patients():
        for study in db.studiesForPatient(patient):
            for series in db.seriesForStudy(study):
                if wanted is not None and series not in wanted:
                    continue
                series_files = list(db.filesForSeries(series))
                if series_files and str(db.fileValue(series_files[0], MODALITY_TAG)).strip().upper() == "XA":
                    files.extend(series_files)
    return files


def write_path_list(paths, folder=None) -> str:
    """Write `paths` one per line into a new ``.txt`` file (the worker reads it as a list); returns its path."""
    fd, name = tempfile.mkstemp(prefix="drgs4d-dicom-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(str(p) for p in paths) + "\n")
    return name


def worker_arguments(paths, folder=None) -> list:
    """``--list-dicom`` arguments for `paths` (folders or files); long lists go through a .txt file."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no DICOM folder or files given")
    if len(paths) > MAX_ARGUMENT_PATHS:
        paths = [write_path_list(paths, folder)]
    return ["--list-dicom", *paths]


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
            plane = f", plane {r['plane']}" if r.get("plane") else ""
            out.append((r["id"], f"{r.get('series_description') or r['kind']} - {r['n_frames']} frames, "
                                  f"{a[0]:.0f} to {a[1]:.0f} deg{plane}, {r.get('acquisition_time') or '?'}"))
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
        """Text for the panel: the geometry the import derives for this pair and every warning, or why the two
        runs do not pair."""
        p = self.pair(mask_id, fill_id)
        if p is None:
            if mask_id == fill_id:
                return ["Mask and fill must be two different runs."]
            return ["These two runs do not form a mask/fill pair (different frames, detector, distances or "
                    "angles); the reconstruction would refuse them."]
        g = p["geometry"]
        lines = [
            f"{g['n_frames']} frames of {g['detector_shape'][0]} x {g['detector_shape'][1]} pixels "
            f"({g['detector_spacing_mm'][0]:.3g} x {g['detector_spacing_mm'][1]:.3g} mm)",
            f"source-isocentre {g['sad_mm']:.1f} mm, source-detector {g['sid_mm']:.1f} mm",
            f"positioner primary {g['dicom_primary_deg'][0]:.1f} to {g['dicom_primary_deg'][1]:.1f} deg "
            f"(step {g['step_deg']:.2f}); secondary {g['dicom_secondary_deg'][0]:.1f} to "
            f"{g['dicom_secondary_deg'][1]:.1f} deg",
            f"angles: {g['angle_rule']}",
            f"default grid {g['volume_resolution'][0]}^3 voxels of {g['volume_spacing_mm'][0]:.2f} mm",
        ]
        if p.get("reversed"):
            lines.append("the mask rotation runs in the opposite direction: frames are paired by angle")
        lines += [f"warning: {w}" for w in g.get("warnings", [])]
        return lines

    def problems(self) -> list:
        """(run id, reason) of every run that cannot be used, for a 'why is my run missing' list."""
        return [(r["id"], r.get("problem") or "") for r in self.runs if not r.get("usable")]

    def request(self, mask_id: str, fill_id: str, out: str, **fields) -> dict:
        """ReconstructConfig fields for this pair (the worker reads the DICOM itself)."""
        if self.pair(mask_id, fill_id) is None:
            raise ValueError("the chosen runs are not a mask/fill pair")
        fill = self.run(fill_id)
        mask = self.run(mask_id)
        source = self.sources[0] if len(self.sources) == 1 else write_path_list([fill["path"], mask["path"]])
        return dict(fields, out=out, dicom=source, fill_uid=fill_id, mask_uid=mask_id)


class DicomRunLister:
    """Lists DICOM runs in a background worker process.  Call poll() from a timer: it returns None while the
    worker runs, then a RunListing; errors raise RuntimeError with the worker's message.  A listing that takes
    longer than `timeout` seconds is killed and reported, so a hung worker cannot keep the panel busy."""

    def __init__(self, paths, python=None, env=None, folder=None, timeout: float = 600.0):
        self.sources = [str(p) for p in paths]
        command = process.build_worker_command(python, worker_arguments(self.sources, folder))
        self.worker = process.WorkerProcess(command, env=env, watch_stdin=False)
        self.timeout = float(timeout)
        self.deadline = None
        self.result = None
        self.error = None

    def start(self) -> "DicomRunLister":
        self.worker.start()
        self.deadline = time.monotonic() + self.timeout
        return self

    def poll(self):
        for event in self.worker.poll_events():
            kind = event.get("event")
            if kind == LISTING_EVENT:
                self.result = RunListing.from_event(event, self.sources)
            elif kind == "error" and self.error is None:
                self.error = event.get("message") or "the DICOM listing failed"
        if not self.worker.finished():
            if self.deadline is None or time.monotonic() <= self.deadline:
                return None
            self.worker.kill()
            raise RuntimeError("listing the DICOM runs took more than {seconds:.0f} s and was stopped: check that the "
                               "folder is reachable, or choose a smaller one".format(seconds=self.timeout))
        if self.result is not None:
            return self.result
        raise RuntimeError(self.error or "the DICOM listing ended without a result")

    def cancel(self) -> None:
        if self.worker.is_running():
            self.worker.kill()
