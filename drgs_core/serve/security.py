"""The server's defences: the bearer token, safe archive extraction and paths confined to a root folder.

No FastAPI here: every function raises :class:`Refused` (an HTTP status and a message for the client), which the
app turns into a JSON error.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath


class Refused(Exception):
    """A request the server refuses: `status` is the HTTP status, the message says what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- token ---------------------------------------------------------------------------------------------------------

def load_or_create_token(path) -> str:
    """The bearer token in `path`; on first start a new random token is written there, readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise RuntimeError(f"the token file {path} holds no usable token (at least 16 characters); delete it "
                               "and restart to generate a new one") from None
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: only the owner may read the token
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def check_bearer(header: str | None, token: str) -> None:
    """Refuse (401) unless `header` is ``Bearer <token>``; the comparison takes the same time for any wrong token."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Refused(401, "missing bearer token: send the header 'Authorization: Bearer <token>' (the token is in "
                           "the server's token file)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Refused(401, "wrong bearer token: copy the token from the server's token file")


# ---- paths ---------------------------------------------------------------------------------------------------------

def confined(root, relative: str, what: str = "path") -> Path:
    """`root`/`relative`, refused (403) unless it stays inside `root` after resolving links; `relative` must be a
    relative path with no '..' parts."""
    if not isinstance(relative, str) or not relative.strip():
        raise Refused(400, f"the {what} is empty: give a path relative to the server's folder")
    rel = PurePosixPath(relative.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or (rel.parts and ":" in rel.parts[0]):
        raise Refused(403, f"the {what} {relative!r} is not allowed: give a relative path inside the server's folder, "
                           "without '..'")
    root = Path(root).resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise Refused(403, f"the {what} {relative!r} leads outside the server's folder (through a link)")
    return full


# ---- archives ------------------------------------------------------------------------------------------------------

def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise Refused(400, f"the archive member {name!r} would land outside the job folder (absolute path or '..'); "
                           "pack the case folder with relative paths")
    return path


def safe_extract(archive, dest, max_bytes: int) -> int:
    """Extract a .zip or .tar(.gz/.bz2/.xz) `archive` into `dest`; returns the number of files.

    The whole archive is checked before anything is written: members with absolute paths or '..', links and
    special files are refused (400), as is more than `max_bytes` of unpacked data (413, against archive bombs).
    A damaged or self-contradicting archive (truncated, bad CRC, a file where a folder must go) is a 400 too.
    """
    try:
        return _extract(Path(archive), Path(dest), max_bytes)
    except Refused:
        raise
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise Refused(400, f"the archive is damaged or inconsistent ({exc}): pack the case folder again") from None


def _extract(archive: Path, dest: Path, max_bytes: int) -> int:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            files = []
            for info in infos:
                path = _member_path(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise Refused(400, f"the archive member {info.filename!r} is a link; links are not accepted")
                if not info.is_dir():
                    files.append((path, info))
            _check_total(sum(i.file_size for _, i in files), max_bytes)
            for path, info in files:
                with zf.open(info) as src:
                    _copy_limited(src, dest / path, info.file_size)
            return len(files)
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError:
        raise Refused(415, "the upload is not a .zip or .tar(.gz) archive: pack the case folder as a zip") from None
    with tf:
        files = []
        for member in tf.getmembers():
            path = _member_path(member.name)
            if member.issym() or member.islnk():
                raise Refused(400, f"the archive member {member.name!r} is a link; links are not accepted")
            if member.isfile():
                files.append((path, member))
            elif not member.isdir():
                raise Refused(400, f"the archive member {member.name!r} is not a plain file or folder")
        _check_total(sum(m.size for _, m in files), max_bytes)
        for path, member in files:
            with tf.extractfile(member) as src:
                _copy_limited(src, dest / path, member.size)
        return len(files)


def _check_total(total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise Refused(413, f"the archive unpacks to {total / 2**20:.1f} MiB, more than the server's limit of "
                           f"{max_bytes / 2**20:.1f} MiB")


def _copy_limited(src, target: Path, declared: int) -> None:
    """Copy at most `declared` bytes (a member may lie about its size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    left = declared
    with open(target, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            left -= len(chunk)
            if left < 0:
                raise Refused(400, f"the archive member {target.name!r} is larger than its header says")
            out.write(chunk)
