"""Batch inputs, per-job state records and the results table (no Ray here, so all of it is cheap to test).

Inputs (:func:`read_jobs`):

* a folder of case folders: every sub-folder holding a ``transforms.json`` is one job named after the folder;
* a CSV manifest (``.csv``): one row per job; columns are ``name`` (optional) and any ``ReconstructConfig`` key
  (``case`` or ``fill``/``mask``/``geometry``, ``views``, ``schedule``, ...); an empty cell keeps the default;
* a JSON manifest (``.json``): a list of such objects, or ``{"defaults": {...}, "jobs": [...]}``.

* a DICOM root (a folder holding no case folders but DICOM files, any depth): one job per mask/fill pair of
  rotational XA runs that `drgs_core.io.dicom` finds, named after the study and the fill run.

Relative paths in a manifest are relative to the manifest's folder.  More input kinds plug in with
:func:`register_input_kind`.

Every job writes into ``OUT/<name>/`` (a normal ``reconstruct`` output folder); its state record lives in
``OUT/batch_state/<name>.json`` and is replaced atomically.  A record with status ``done`` and the same option
key, plus ``metrics.json`` in the job folder, is the done marker: such a job is skipped on a rerun.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import path_fields
from ..errors import DRGSInputError
from ..io.atomic import write_text_atomic

log = logging.getLogger(__name__)

STATE_DIR = "batch_state"
PATH_KEYS = path_fields()
STATUSES = ("pending", "running", "done", "error", "cancelled")


@dataclass
class Job:
    """One reconstruction of a batch: `config` holds ReconstructConfig keys except ``out``."""

    name: str
    config: dict
    out: str
    source: str
    problem: str | None = None          # an input error found while reading the manifest: the job will not run
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Fingerprint of the options: a done marker only counts for the same options."""
        text = json.dumps(self.config, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def case_label(self) -> str:
        return str(self.config.get("case") or self.config.get("dicom") or self.config.get("fill") or "")


# ---- reading the input ---------------------------------------------------------------------------------------------

_InputKind = tuple[str, Callable[[Path], bool], Callable[[Path], list[dict]]]
_INPUT_KINDS: list[_InputKind] = []


def register_input_kind(name: str, detect: Callable[[Path], bool], read: Callable[[Path], list[dict]]) -> None:
    """Add an input kind (checked before the built-in ones).  `read(path)` returns rows: dicts of ReconstructConfig
    keys (paths absolute or relative to `path`'s folder) plus an optional ``name``; e.g. a DICOM root reader
    returning one row per series pair."""
    _INPUT_KINDS.insert(0, (name, detect, read))


def _is_case_folder(path: Path) -> bool:
    return (path / "transforms.json").is_file()


def _read_case_folders(root: Path) -> list[dict]:
    rows = [{"name": p.name, "case": str(p)} for p in sorted(root.iterdir()) if p.is_dir() and _is_case_folder(p)]
    if not rows:
        raise DRGSInputError("the batch folder holds no case folders", str(root),
                             "sub-folders each with fill_run, mask_run and transforms.json",
                             "point `drgs4d batch` at the folder that contains the case folders, or at a manifest")
    return rows


def parse_cell(text: str):
    """A CSV cell -> a JSON-like value: '' -> None (keep the default), true/false, int, float, else the text."""
    text = text.strip()
    if text == "":
        return None
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DRGSInputError("the manifest is empty", str(path), "a header row, then one row per job")
        rows = []
        for row in reader:
            values = {k.strip(): parse_cell(v or "") for k, v in row.items() if k is not None}
            rows.append({k: v for k, v in values.items() if v is not None})
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DRGSInputError("the manifest is not valid JSON", f"{path}: {exc}", "a JSON list of job objects") from None
    defaults = {}
    if isinstance(data, dict):
        defaults, data = data.get("defaults", {}), data.get("jobs")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data) or not isinstance(defaults, dict):
        raise DRGSInputError("the JSON manifest has the wrong shape", str(path),
                             'a list of objects, or {"defaults": {...}, "jobs": [{...}, ...]}')
    return [{**defaults, **row} for row in data]


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble (PS3.10 7.1)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_dicom_root(path: Path, max_files: int = 2000) -> bool:
    if not path.is_dir() or any(_is_case_folder(p) for p in path.iterdir() if p.is_dir()):
        return False
    files = (f for f in path.rglob("*") if f.is_file())
    return any(_is_dicom_file(f) for _, f in zip(range(max_files), files))


def _read_dicom_root(root: Path) -> list[dict]:
    """One row per mask/fill pair; `dicom` points at the pair's own files (their common folder, or the one
    instance holding both rotations), so a job does not rescan the whole root."""
    from ..io.dicom import find_pairs, list_runs

    runs = list_runs(root)
    pairs = find_pairs(runs)
    if not pairs:
        raise DRGSInputError("the DICOM folder holds no usable mask/fill pair of rotational XA runs", str(root),
                             "two rotations (mask and fill) of the same study and geometry",
                             "list the runs with `drgs4d import-dicom DIR --list`, or write a manifest with "
                             "dicom, fill_uid and mask_uid columns")
    rows = []
    for pair in pairs:
        where = os.path.commonpath([pair.fill.path, pair.mask.path])
        label = pair.fill.series_description or pair.fill.id.split(".")[-1]
        rows.append({"name": f"{pair.fill.study_uid.split('.')[-1]}_{label}", "dicom": where,
                     "fill_uid": pair.fill.id, "mask_uid": pair.mask.id})
    return rows


_INPUT_KINDS.extend([
    ("DICOM root", _is_dicom_root, _read_dicom_root),
    ("case folders", lambda p: p.is_dir(), _read_case_folders),
    ("CSV manifest", lambda p: p.is_file() and p.suffix.lower() == ".csv", _read_csv),
    ("JSON manifest", lambda p: p.is_file() and p.suffix.lower() == ".json", _read_json),
])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "job"


def _check(config: dict, out: str) -> str | None:
    """The input problem of one row, or None (the engine's own validation, without running anything)."""
    from ..pipeline import ReconstructConfig

    if "out" in config:
        return "the manifest sets 'out'; the batch chooses each job's folder (OUT/<name>): remove the column"
    try:
        ReconstructConfig.from_dict({**config, "out": out})
    except DRGSInputError as exc:
        return str(exc)
    except TypeError as exc:  # a value of the wrong kind that the dataclass could not take
        return f"bad option value: {exc}"
    return None


def read_jobs(source, out_root, defaults: dict | None = None) -> list[Job]:
    """The jobs of a batch input (see the module docstring).  `defaults` (ReconstructConfig keys) apply where a row
    does not say otherwise.  Problems of the input as a whole raise DRGSInputError; problems of one row are kept
    in that job's ``problem`` so that the other jobs still run."""
    source, out_root = Path(source), Path(out_root).absolute()  # Ray workers may run in another folder
    if not source.exists():
        raise DRGSInputError("the batch input does not exist", str(source),
                             "a folder of case folders or a .csv/.json manifest")
    for kind, detect, read in _INPUT_KINDS:
        if detect(source):
            rows = read(source)
            break
    else:
        raise DRGSInputError("unknown batch input", str(source), "a folder of case folders, a DICOM folder or a .csv/.json manifest",
                             "give the manifest a .csv or .json extension")
    base = source if source.is_dir() else source.parent
    jobs, taken = [], set()
    for i, row in enumerate(rows, start=1):
        config = {**(defaults or {}), **{k: v for k, v in row.items() if k != "name"}}
        for key in PATH_KEYS:
            if isinstance(config.get(key), str):
                config[key] = os.path.normpath(base.absolute() / config[key])
        name = _safe_name(str(row.get("name") or Path(config.get("case") or config.get("dicom") or config.get("fill")
                                                               or f"job{i}").name))
        if name in taken:  # a sweep over one case: the options tell the jobs apart
            name = f"{name}-{Job(name, config, '', '').key[:8]}"
        taken.add(name)
        out = str(out_root / name)
        jobs.append(Job(name, config, out, f"{source.name} ({kind}) #{i}", problem=_check(config, out)))
    log.info("%d jobs from %s", len(jobs), source)
    return jobs


# ---- state records and the results table ---------------------------------------------------------------------------

def state_path(out_root, name: str) -> Path:
    return Path(out_root) / STATE_DIR / f"{name}.json"


def read_record(out_root, name: str) -> dict | None:
    try:
        return json.loads(state_path(out_root, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(out_root, record: dict) -> None:
    write_text_atomic(state_path(out_root, record["name"]), json.dumps(record, indent=1, default=str))


def is_done(job: Job, out_root) -> bool:
    """The done marker: a record saying done for these very options, and the run's metrics on disk."""
    rec = read_record(out_root, job.name)
    return (rec is not None and rec.get("status") == "done" and rec.get("key") == job.key
            and (Path(job.out) / "metrics.json").is_file())


def new_record(job: Job, status: str, **fields) -> dict:
    return {"name": job.name, "key": job.key, "case": job.case_label, "options": job.config, "out": job.out,
            "source": job.source, "status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}


# metrics copied into the results table (from metrics.json and its "truth" section for phantom cases)
METRIC_KEYS = ("heldout_psnr", "heldout_ssim", "train_psnr", "train_ssim", "it_per_s", "iterations")
TRUTH_KEYS = ("cd_mm", "hd95_mm", "best_dice")
TABLE_COLUMNS = ("name", "case", "status", "time_s", "n_gaussians", *METRIC_KEYS, *TRUTH_KEYS, "attempts",
                 "resumed", "error", "out", "options")


def metrics_summary(metrics: dict) -> dict:
    row = {k: metrics.get(k) for k in ("n_gaussians", *METRIC_KEYS)}
    truth = metrics.get("truth") or {}
    row.update({k: truth.get(k) for k in TRUTH_KEYS})
    return row


def table_row(record: dict) -> dict:
    row = {k: record.get(k) for k in TABLE_COLUMNS}
    row.update({k: v for k, v in (record.get("metrics") or {}).items() if k in TABLE_COLUMNS})
    return row


def write_results(out_root, records: list[dict]) -> tuple[Path, Path]:
    """results.json (full records) and results.csv (one row per job), each replaced atomically."""
    out_root = Path(out_root)
    rows = [table_row(r) for r in records]
    jpath = write_text_atomic(out_root / "results.json", json.dumps(rows, indent=1, default=str))
    lines = []

    class _Sink:
        def write(self, text):
            lines.append(text)

    writer = csv.DictWriter(_Sink(), fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else ("" if v is None else v)
                         for k, v in row.items()})
    cpath = write_text_atomic(out_root / "results.csv", "".join(lines))
    return cpath, jpath
