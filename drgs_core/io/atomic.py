"""Atomic file writing: readers never see a half-written output file.

Every writer of :mod:`drgs_core.io` writes into a temporary file that sits in the destination folder (so that
the final rename stays on one file system) and then renames it over the destination with ``os.replace``, which
is atomic on POSIX and Windows.  Before the rename the file is flushed to disk (fsync) and verified: not empty,
and, where the writer gives a `verify` callback, its length/header read back (some C++ writers such as
SimpleITK's report no error when the disk fills up, and would otherwise rename a truncated file into place).  If
anything fails before the rename, the previous file (if any) is untouched and the temporary file is removed.
:class:`BackgroundWrites` runs such writers on threads, joined before their folder is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DRGSInputError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    """A fresh temporary name next to `path` that keeps its full extension (``.nii.gz`` etc.).

    Writers such as nibabel and SimpleITK choose the format from the extension, so the extension must survive:
    the random token goes in front of the name (``.tmp-3f9a0c1b2d4e-volume.nii.gz``).
    """
    while True:
        candidate = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}"
        if not candidate.exists():
            return candidate


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary file %s: %s", path, exc)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class WriteVerificationError(OSError):
    """A written file is not what was meant to be written (truncated: usually a full disk)."""


def verify_size(path: Path, expected: int, what: str = "") -> None:
    size = os.path.getsize(path)
    if size != expected:
        raise WriteVerificationError(f"{what or Path(path).name}: wrote {size} bytes, expected {expected} "
                                     "(is the disk full?)")


def verify_gzip_length(path: Path, expected: int, what: str = "", start: int = 0) -> None:
    """A gzip stream (from byte `start` to the end of the file) ends with its uncompressed length mod 2**32; a
    cut-off file ends with other bytes."""
    with open(path, "rb") as fh:
        fh.seek(start)
        magic = fh.read(2)
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 20:
            raise WriteVerificationError(f"{what or Path(path).name}: the compressed file is cut off "
                                         "(is the disk full?)")
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    if magic != b"\x1f\x8b" or isize != expected % 2**32:
        raise WriteVerificationError(f"{what or Path(path).name}: the compressed stream is incomplete "
                                     f"(length field {isize}, expected {expected % 2**32}; is the disk full?)")


def _verify_zip(path: Path) -> None:
    """torch.save files are zip archives: their directory sits at the end, so a cut-off file does not open."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip() if os.path.getsize(path) < (64 << 20) else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WriteVerificationError(f"{path.name}: the saved file is incomplete ({exc}; is the disk full?)"
                                     ) from None
    if bad is not None:
        raise WriteVerificationError(f"{path.name}: {bad} is damaged in the saved file (is the disk full?)")


def check_free_space(folder, need_bytes: int, what: str) -> None:
    """DRGSInputError when `folder`'s file system has less than `need_bytes` free (plus 5 % margin)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need_bytes * 1.05)
    if free < need:
        raise DRGSInputError(f"not enough free disk space for {what}", f"{free / 2**20:.1f} MiB free in {probe}",
                             f"about {need / 2**20:.1f} MiB", "free some space or choose an --out on another disk")


@contextlib.contextmanager
def atomic_path(path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Context manager yielding a temporary path in the same folder as `path`.

    Write the complete file to the yielded path; when the block exits normally the file is renamed over `path`
    (``os.replace``).  If the block raises, the temporary file is deleted, `path` keeps its old content (or stays
    absent), and the exception propagates.  The parent folder is created if needed.

    `verify(tmp)`, when given, checks the written file (raising WriteVerificationError) after it was flushed.

    Example::

        with atomic_path("out/volume.nii.gz") as tmp:
            nibabel.save(image, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer produced no file at the temporary path {tmp} (for {path})")
        if tmp.is_file():
            _fsync(tmp)
            if verify is not None:
                verify(tmp)
            elif path.suffix == ".pt":
                _verify_zip(tmp)
            elif os.path.getsize(tmp) == 0:
                raise WriteVerificationError(f"{path.name}: the writer produced an empty file (is the disk full?)")
        os.replace(tmp, path)
    except RuntimeError as exc:
        _remove_quietly(tmp)
        if any(w in str(exc).lower() for w in ("writ", "inline_container", "unexpected pos")):
            # C++ writers (torch.save, ITK) report a failed write() as RuntimeError
            raise WriteVerificationError(f"writing {path.name} failed: {str(exc).strip()[:200]}") from exc
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(folder) -> Iterator[Path]:
    """Context manager yielding a temporary *folder* next to (inside the parent of) outputs in `folder`.

    For outputs made of several files (a detached NRRD header plus its data file): write them into the yielded
    folder, then, still inside the block, move them into `folder` with :func:`move_files_in_order` (data first,
    header last).  Each rename is atomic; the temporary folder is always removed on exit, so a failure before
    the moves leaves `folder` untouched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(folder / "dir")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        _remove_quietly(tmp)


def move_files_in_order(src_folder: Path, dst_folder: Path, names: list[str]) -> None:
    """Move `names` from `src_folder` into `dst_folder` (``os.replace``, one atomic rename each), in order."""
    for name in names:
        os.replace(Path(src_folder) / name, Path(dst_folder) / name)


def write_text_atomic(path, text: str, encoding: str = "utf-8") -> Path:
    """Write a text file atomically; returns the final path."""
    path = Path(path)
    data = text.encode(encoding)
    with atomic_path(path, verify=lambda p: verify_size(p, len(data))) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write a binary file atomically; returns the final path."""
    path = Path(path)
    with atomic_path(path, verify=lambda p: verify_size(p, len(data))) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


class BackgroundWrites:
    """Writers running on background threads while the caller goes on (compression and file I/O release the GIL).

    ``submit(writer, *args)`` starts a write; ``wait()`` joins every write started so far and raises the first
    failure (in submission order) as it was raised, so a full disk is reported like a write on the caller's
    thread.  As a context manager, leaving the block always waits for the writes already running (none may
    still write into a folder that is then removed or committed) and cancels those not started when the block
    raised; leaving normally also raises a failed write.
    """

    def __init__(self, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, max(2, os.cpu_count() or 2)),
                                        thread_name_prefix="drgs-write")
        self._jobs = []

    def submit(self, writer: Callable, *args, **kwargs) -> None:
        self._jobs.append(self._pool.submit(writer, *args, **kwargs))

    def wait(self) -> None:
        jobs, self._jobs = self._jobs, []
        errors = [job.exception() for job in jobs]  # waits for each
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            self.wait()
