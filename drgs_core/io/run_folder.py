"""A run's output folder as a transaction: a lock, a staging folder, and a commit that replaces the results.

Layout inside ``out``:

* ``.drgs4d.lock`` - held while a run works in the folder (pid and host inside); a second run is refused while
  its owner lives, and a lock whose process is gone (kill -9) is taken over.
* ``.staging-<token>/`` - the run writes every result file here first.
* ``.commit`` - a journal written just before the results are moved in; if a run dies between the moves the
  next run into the folder finishes them (roll forward), so results are never a mix of two runs.
* results (``volume.nii.gz`` ... ``metrics.json``, ``config.json``), ``checkpoint.pt`` (the resumable state of the
  latest training, fingerprinted), ``snapshots/`` (previews).

Each move is an atomic rename; files of the previous result that the new run does not produce are removed at
the commit, so the folder always holds exactly one run's results.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

from ..errors import DRGSInputError
from .atomic import TEMP_PREFIX, write_text_atomic

log = logging.getLogger(__name__)

LOCK = ".drgs4d.lock"
JOURNAL = ".commit"
STAGING_PREFIX = ".staging-"
#: what a run leaves in its folder besides the result files (and the request the Slicer panel writes there)
BOOKKEEPING = {LOCK, JOURNAL, "checkpoint.pt", "snapshots", "drgs4d_request.json"}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_out_folder(out, inputs: list, case_folder=None, option: str = "--out") -> Path:
    """Refuse an output folder that would overwrite or mix with the inputs; returns it resolved.

    inputs: the input files; case_folder: the case folder (its truth/ included) when reading one.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DRGSInputError(f"the output folder {option} is an existing file", str(out), "a folder (new or a "
                             "previous result folder)", f"choose another {option}, or delete the file")
    res = out.resolve()
    if case_folder is not None:
        case = Path(case_folder).expanduser().resolve()
        if _inside(res, case):
            raise DRGSInputError(f"{option} is inside the case folder", f"{option} {out} in {case}",
                                 "a folder outside the case folder (its truth/ is the ground truth)",
                                 f"choose e.g. {option} {case.parent / (case.name + '_result')}")
    for p in inputs:
        if p is not None and Path(p).expanduser().resolve().parent == res:
            raise DRGSInputError(f"{option} is the folder of an input file", f"{option} {out} holds {p}",
                                 "a separate folder for the results", f"choose another {option}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """Lock + staging + commit for one run into `out` (see the module docstring).

    Use as a context manager: entering takes the lock, finishes an interrupted commit, cleans stale temporary
    files and checks that the folder holds nothing foreign; leaving removes the staging folder and the lock.
    """

    def __init__(self, out: Path, identity: dict, *, overwrite: bool = False, resume: bool = False):
        """identity: {"case" | "fill" | "mask" | "geometry": resolved path} of the run's inputs."""
        self.out, self.identity, self.overwrite, self.resume = Path(out), identity, overwrite, resume
        self.staging: Path | None = None
        self._locked = False

    # ---- entering --------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DRGSInputError("the output folder cannot be created", f"{self.out}: {exc.strerror}",
                                 "a writable folder", "choose another --out or fix its permissions") from None
        self._lock()
        try:
            finish_commit(self.out)
            self._clean_stale()
            self._check_foreign()
            self.staging = self.out / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
            self.staging.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def _lock(self) -> None:
        path = self.out / LOCK
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._lock_owner(path)
                if owner is None:
                    log.warning("%s: removing the lock of a run that no longer exists", self.out)
                    path.unlink(missing_ok=True)
                    continue
                raise DRGSInputError("another run is writing into this output folder", f"{self.out} is locked by "
                                     f"{owner}", "one run per output folder at a time",
                                     f"wait for it to finish, or choose another --out (if no such run exists, "
                                     f"delete {path})") from None
            except OSError as exc:
                raise DRGSInputError("the output folder is not writable", f"{self.out}: {exc.strerror}",
                                     "a writable folder", "choose another --out or fix its permissions") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            self._locked = True
            return
        raise DRGSInputError("the output folder's lock could not be taken", str(path), "", "try again")

    @staticmethod
    def _lock_owner(path: Path) -> str | None:
        """'pid N on HOST' while that process lives; None for a stale lock (dead process, unreadable file)."""
        try:
            info = json.loads(path.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a lock cut off while being written: its writer died
        if host == socket.gethostname() and not _pid_alive(pid):
            return None
        return f"process {pid} on {host}"

    def _unlock(self) -> None:
        if self._locked:
            (self.out / LOCK).unlink(missing_ok=True)
            self._locked = False

    def _clean_stale(self) -> None:
        """Temporary files and staging folders of killed runs (we hold the lock, so nobody else is writing)."""
        for p in list(self.out.iterdir()) + list((self.out / "snapshots").glob(TEMP_PREFIX + "*")):
            if p.name.startswith((TEMP_PREFIX, STAGING_PREFIX)):
                log.info("removing %s left by an interrupted run", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _holds_inputs(self, name: str) -> bool:
        """True for an entry of `out` that holds this run's inputs (the Slicer panel exports them to out/inputs)."""
        entry = (self.out / name).resolve()
        return any(_inside(Path(p), entry) for p in self.identity.values())

    def _check_foreign(self) -> None:
        entries = sorted(p.name for p in self.out.iterdir() if p.name != LOCK and not self._holds_inputs(p.name))
        if set(entries) <= BOOKKEEPING or self.overwrite or self.resume:
            return  # empty, or only what a cancelled run of any case leaves (a fresh run replaces its checkpoint)
        previous = self.out / "config.json"
        try:
            config = json.loads(previous.read_text())
            ident = config.get("identity")
        except (OSError, ValueError, AttributeError):
            config, ident = None, None
        if ident == self.identity:
            return  # the same case again: its results are replaced when this run commits
        found = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        if ident is not None:
            why = "the results of a run on other inputs"
        elif isinstance(config, dict) and "drgs4d_version" in config:
            why = "the results of a run by an older version (which did not record its inputs)"
        else:
            why = "files that no run of this case wrote"
        raise DRGSInputError(f"the output folder holds {why}", f"{self.out}: {found}",
                             "an empty folder, or the folder of an earlier run on the same inputs",
                             "choose another --out, or pass --overwrite to replace its contents "
                             "(request key 'overwrite': true)")

    # ---- committing ------------------------------------------------------------------------------------------
    def commit(self, names: list[str]) -> None:
        """Move the staged `names` into the folder (journal first) and remove the previous run's other results."""
        for name in names:
            if not (self.staging / name).exists():
                raise FileNotFoundError(f"staged output {name} is missing")
        stale = [p.name for p in self.out.iterdir()
                 if p.name not in names and p.name not in BOOKKEEPING and not p.name.startswith(STAGING_PREFIX)
                 and not self._holds_inputs(p.name)]
        write_text_atomic(self.out / JOURNAL, json.dumps({"staging": self.staging.name, "names": names,
                                                          "remove": stale if self.overwrite else []}))
        finish_commit(self.out)


def finish_commit(out: Path) -> None:
    """Complete a commit recorded in the journal (also after a kill between the moves); idempotent."""
    journal = Path(out) / JOURNAL
    if not journal.exists():
        return
    try:
        info = json.loads(journal.read_text())
        staging, names, remove = Path(out) / info["staging"], list(info["names"]), list(info.get("remove", []))
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: an unreadable commit journal (the run died while writing it); ignored", out)
        journal.unlink(missing_ok=True)
        return
    for name in names:
        src = staging / name
        if src.exists():
            os.replace(src, Path(out) / name)
    for name in remove:
        p = Path(out) / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    journal.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
