"""Run a reconstruction on a remote ``drgs4d serve`` job server instead of a local worker process (no Qt, stdlib only).

Slicer's Python may lack ``requests``, so this speaks HTTP with ``http.client``.  Two layers:

* :class:`RemoteClient`: one method per endpoint of the server (upload, submit, events, cancel, list, files,
  result, delete), with the bearer token on every request and server errors raised as :class:`RemoteError`.
* :class:`RemoteJob`: what the panel drives, shaped like ``process.WorkerProcess`` (``start``, ``poll_events``,
  ``request_cancel``, ``finished``, ``wait``).  It packs the inputs of a worker request (a case folder, or the
  fill/mask/geometry files) into a zip, uploads it, submits the options, and streams the job's events over
  Server-Sent Events (reconnecting with ``Last-Event-ID`` when the connection drops).  The events are the worker
  protocol's, validated by :mod:`protocol`, with server paths turned into paths in the local output folder:
  preview files of ``snapshot`` events are downloaded first, and at the end (done or cancelled) the server's whole
  output folder is downloaded into the request's ``out`` folder, so the panel loads results exactly as after a
  local run.  Like ``WorkerProcess``, it ends with ``{"event": "exit", "returncode"}`` (the worker's exit codes).

The server URL and token belong in Slicer's application settings (QSettings), never in the scene.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path, PurePosixPath

from . import protocol

log = logging.getLogger("DRGS4D.remote")

PATH_KEYS = ("case", "fill", "mask", "geometry")
LOCAL_ONLY_KEYS = ("out", "resume", "device")  # the server chooses its own folder and GPU
EXIT_CODES = {"done": protocol.EXIT_DONE, "cancelled": protocol.EXIT_CANCELLED}


class RemoteError(Exception):
    """The server refused a request (``status`` is the HTTP status) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status, self.message = status, message


class RemoteClient:
    """The HTTP API of ``drgs4d serve`` (see drgs_core/serve/app.py).  `url`: ``http(s)://host:port``."""

    def __init__(self, url: str, token: str, timeout: float = 60.0, ssl_context: ssl.SSLContext | None = None):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL {url!r}: expected http://host:port or https://host:port")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.token = token.strip()
        self.timeout = timeout
        self.ssl_context = ssl_context

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        t = self.timeout if timeout is None else timeout
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=t, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=t)

    def _open(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float | None = None):
        """Send a request; returns (connection, response) for a 2xx answer, else raises RemoteError."""
        conn = self._connection(timeout)
        head = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        head.update(headers or {})
        try:
            conn.request(method, self.prefix + path, body=body, headers=head)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RemoteError(0, protocol.tr("cannot reach the DRGS4D server at {url}: {reason}",
                                              url=f"{self.scheme}://{self.host}:{self.port}", reason=exc)) from None
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            try:
                message = json.loads(raw.decode("utf-8")).get("error") or raw.decode("utf-8", "replace")
            except (ValueError, AttributeError):
                message = raw.decode("utf-8", "replace")[:300] or resp.reason
            raise RemoteError(resp.status, message)
        return conn, resp

    def _json(self, method: str, path: str, payload=None):
        body, headers = None, {}
        if payload is not None:
            body, headers = json.dumps(payload).encode("utf-8"), {"Content-Type": "application/json"}
        conn, resp = self._open(method, path, body, headers)
        try:
            return json.loads(resp.read().decode("utf-8"))
        finally:
            conn.close()

    def _download(self, path: str, target: Path) -> Path:
        """GET `path` into `target`, written under a temporary name and renamed when complete."""
        target.parent.mkdir(parents=True, exist_ok=True)
        conn, resp = self._open("GET", path, headers={"Accept": "*/*"})
        tmp = target.with_name(f".part-{os.getpid()}-{target.name}")
        try:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)
            os.replace(tmp, target)
        finally:
            conn.close()
            if tmp.exists():
                tmp.unlink()
        return target

    # ---- endpoints ---------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/health")

    def upload(self, archive) -> str:
        """Send a .zip of the inputs; returns the upload id for :meth:`submit`."""
        archive = Path(archive)
        with open(archive, "rb") as fh:
            conn, resp = self._open("POST", "/uploads", body=fh, timeout=max(self.timeout, 600.0),
                                    headers={"Content-Type": "application/zip",
                                             "Content-Length": str(archive.stat().st_size)})
            try:
                return json.loads(resp.read().decode("utf-8"))["upload"]
            finally:
                conn.close()

    def submit(self, options: dict, upload: str | None = None, path: str | None = None) -> dict:
        body = {"options": options}
        if upload is not None:
            body["upload"] = upload
        if path is not None:
            body["path"] = path
        return self._json("POST", "/jobs", body)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def jobs(self) -> list:
        return self._json("GET", "/jobs")["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def delete(self, job_id: str) -> dict:
        return self._json("DELETE", f"/jobs/{job_id}")

    def files(self, job_id: str) -> list:
        return self._json("GET", f"/jobs/{job_id}/files")["files"]

    def download_file(self, job_id: str, relative: str, target) -> Path:
        return self._download(f"/jobs/{job_id}/files/{urllib.parse.quote(relative)}", Path(target))

    def download_result(self, job_id: str, folder, checkpoint: bool = True) -> list:
        """Unpack the job's output folder into `folder` (created if needed); returns the relative file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".zip", prefix=".download-", dir=str(folder))
        os.close(fd)
        try:
            self._download(f"/jobs/{job_id}/result?checkpoint={'true' if checkpoint else 'false'}", Path(tmp))
            return _unpack_into(Path(tmp), folder)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def events(self, job_id: str, after: int | None = None, max_reconnects: int = 20, reconnect_delay: float = 1.0):
        """Yield ``(index, event)`` for the job's events (after index `after`) until its terminal event.

        A dropped connection is reopened with ``Last-Event-ID``, so no event is lost or repeated; the job itself
        keeps running on the server either way.
        """
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                conn, resp = self._open("GET", f"/jobs/{job_id}/events", headers=headers)
            except RemoteError as exc:
                if exc.status or failures >= max_reconnects:
                    raise
                failures += 1
                time.sleep(reconnect_delay)
                continue
            try:
                for index, data in _sse_messages(resp):
                    failures = 0
                    last = index if index is not None else last
                    event = json.loads(data)
                    yield index, event
                    if event.get("event") in protocol.TERMINAL_EVENTS:
                        return
                return  # the server closed a finished stream
            except (OSError, http.client.HTTPException) as exc:
                failures += 1
                if failures > max_reconnects:
                    raise RemoteError(0, protocol.tr("lost the connection to the server: {reason}",
                                                     reason=exc)) from None
                log.info("event stream dropped (%s): reconnecting", exc)
                time.sleep(reconnect_delay)
            finally:
                conn.close()


def _sse_messages(resp):
    """(id, data) of each Server-Sent Events message of an open response; comments and retry lines skipped."""
    index, data = None, []
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield index, "\n".join(data)
            index, data = None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id" and value.strip().isdigit():
                index = int(value)


def _unpack_into(archive: Path, folder: Path) -> list:
    """Unpack a result zip into `folder`; each file lands under a temporary name and is renamed into place."""
    names = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = PurePosixPath(info.filename)
            if info.is_dir():
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise RemoteError(0, protocol.tr("the server sent a result file with an unsafe name: {name}",
                                                 name=repr(info.filename)))
            target = folder.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".part-{target.name}")
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
            names.append(rel.as_posix())
    return names


def pack_request(request: dict, archive) -> dict:
    """Zip the local inputs of a worker request into `archive`; returns the options for the server.

    A case folder is packed with its contents at the archive root; fill, mask and geometry files go to
    ``inputs/<key>/<file name>`` and the options name them there.  ``out``, ``resume`` and ``device`` stay local.
    """
    options = {k: v for k, v in request.items() if k not in LOCAL_ONLY_KEYS and k not in PATH_KEYS}
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if request.get("case"):
            root = Path(request["case"])
            if not (root / "transforms.json").is_file():
                raise RemoteError(0, protocol.tr("the case folder {folder} has no transforms.json", folder=root))
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(root).as_posix())
        else:
            for key in ("fill", "mask", "geometry"):
                path = Path(request[key])
                name = f"inputs/{key}/{path.name}"
                zf.write(path, name)
                options[key] = name
    return options


class RemoteJob:
    """One reconstruction on a server, driven like ``process.WorkerProcess`` (poll ``poll_events`` from a timer).

    `request` is the same worker request a local run gets (``job.make_request``); its ``out`` is the local folder
    that receives the results.  Give `job_id` to follow (re-attach to) a job that was submitted earlier.
    """

    def __init__(self, client: RemoteClient, request: dict, job_id: str | None = None, download_checkpoint: bool = True):
        self.client = client
        self.request = dict(request)
        self.out = Path(request["out"])
        self.job_id = job_id
        self.download_checkpoint = download_checkpoint
        self.events: queue.Queue = queue.Queue()
        self.terminal_event: dict | None = None
        self.returncode: int | None = None
        self.last_index: int | None = None
        self._server_run_dir: str | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._exit_reported = False

    # -- life cycle --
    def start(self) -> "RemoteJob":
        if self._thread is not None:
            raise RuntimeError(protocol.tr("remote job already started"))
        self._thread = threading.Thread(target=self._run, name="drgs-remote", daemon=True)
        self._thread.start()
        return self

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finished(self) -> bool:
        return self._exit_reported

    def request_cancel(self, grace_s: float = 0.0) -> None:
        """Ask the server to stop the job (it writes a checkpoint first); the events report ``cancelled``."""
        self._cancel.set()
        if self.job_id is not None:
            try:
                self.client.cancel(self.job_id)
            except RemoteError as exc:
                self.events.put({"event": "log", "line": f"cancel: {exc}"})

    def poll_events(self, max_events: int | None = None) -> list:
        out = []
        while max_events is None or len(out) < max_events:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            out.append(event)
            if event.get("event") == "exit":
                self._exit_reported = True
        return out

    def wait(self, timeout: float | None = None) -> int | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.returncode

    # -- the background thread --
    def _run(self) -> None:
        try:
            if self.job_id is None:
                self._submit()
            for index, raw in self.client.events(self.job_id, after=self.last_index):
                self.last_index = index
                self._handle(raw)
        except (RemoteError, OSError, ValueError) as exc:
            kind = "input" if isinstance(exc, RemoteError) and 400 <= exc.status < 500 else "crashed"
            self._finish({"event": "error", "kind": kind,
                          "message": protocol.tr("remote server: {reason}", reason=exc)})
        if self.terminal_event is None:
            self._finish({"event": "error", "kind": "crashed",
                          "message": protocol.tr("the server's event stream ended early")})
        self.events.put({"event": "exit", "returncode": self.returncode})

    def _submit(self) -> None:
        self.events.put({"event": "log", "line": "packing and uploading the inputs"})
        fd, archive = tempfile.mkstemp(suffix=".zip", prefix="drgs4d-upload-")
        os.close(fd)
        try:
            options = pack_request(self.request, archive)
            upload = self.client.upload(archive)
        finally:
            os.unlink(archive)
        job = self.client.submit(options, upload=upload)
        self.job_id, self._server_run_dir = job["id"], job.get("run_dir")
        self.events.put({"event": "log", "line": f"submitted as job {self.job_id}"})
        if self._cancel.is_set():
            self.client.cancel(self.job_id)

    def _handle(self, raw: dict) -> None:
        try:
            event = protocol.validate_event(raw)
        except protocol.ProtocolError as exc:
            self.events.put({"event": "error", "kind": "protocol", "message": str(exc), "fatal": False})
            return
        name = event["event"]
        if name == "started":
            self._server_run_dir = event.get("run_dir") or self._server_run_dir
        elif name == "snapshot":
            for key in ("volume", "mesh"):
                if event.get(key):
                    rel = self._relative(event[key])
                    if rel is not None:
                        self.client.download_file(self.job_id, rel, self.out / rel)
        elif name in ("done", "cancelled"):
            self.events.put({"event": "log", "line": "downloading the results"})
            self.client.download_result(self.job_id, self.out, checkpoint=self.download_checkpoint)
        if name in protocol.TERMINAL_EVENTS:
            self._finish(self._localize(event))
        else:
            self.events.put(self._localize(event))

    def _finish(self, event: dict) -> None:
        if self.terminal_event is not None:
            return
        self.terminal_event = event
        kind = event.get("kind")
        self.returncode = EXIT_CODES.get(event["event"],
                                         protocol.EXIT_INPUT if kind in ("input", "resources") else protocol.EXIT_INTERNAL)
        self.events.put(event)

    def _relative(self, server_path: str) -> str | None:
        base = (self._server_run_dir or "").rstrip("/")
        if base and isinstance(server_path, str) and server_path.startswith(base + "/"):
            return server_path[len(base) + 1:]
        return None

    def _localize(self, value):
        """Server paths under the job's output folder -> the same files in the local output folder."""
        if isinstance(value, dict):
            return {k: self._localize(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._localize(v) for v in value]
        if isinstance(value, str):
            if value.rstrip("/") == (self._server_run_dir or "\0").rstrip("/"):
                return str(self.out.resolve())
            rel = self._relative(value)
            if rel is not None:
                return str(self.out / rel)
        return value


def check_connection(url: str, token: str, timeout: float = 10.0) -> dict:
    """For a 'Test connection' button: the server's /health answer, or RemoteError with a readable message."""
    try:
        return RemoteClient(url, token, timeout=timeout).health()
    except socket.timeout:
        raise RemoteError(0, protocol.tr("the server at {url} did not answer within {seconds} s", url=url,
                                         seconds=f"{timeout:.0f}")) from None
