"""Atomic file writing: readers never see a half-written output file.

Every writer of :mod:`drgs_core.io` writes into a temporary file that sits in the destination folder (so that
the final rename stays on one file system) and then renames it over the destination with ``os.replace``, which
is atomic on POSIX and Windows.  If anything fails before the rename, the previous file (if any) is untouched
and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Context manager yielding a temporary path in the same folder as `path`.

    Write the complete file to the yielded path; when the block exits normally the file is renamed over `path`
    (``os.replace``).  If the block raises, the temporary file is deleted, `path` keeps its old content (or stays
    absent), and the exception propagates.  The parent folder is created if needed.

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
        os.replace(tmp, path)
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
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="\n") as fh:
            fh.write(text)
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write a binary file atomically; returns the final path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path
