"""`drgs4d serve`: the HTTP API (FastAPI) of the remote GPU job server.

Only `drgs4d serve` imports this module (FastAPI is the optional extra ``drgs4d[serve]``).  Every endpoint needs ``Authorization: Bearer <token>``.  Errors are JSON: ``{"error": message, "status": code}``.

==========================  ===========================================================================================
GET    /health              server version, protocol version, slots
POST   /uploads             body: a .zip or .tar(.gz) of a case folder (or of fill/mask/geometry files) -> {upload}
POST   /jobs                JSON {options: {ReconstructConfig keys}, upload: ID | path: "dir under the data root"}
GET    /jobs                all jobs (newest last); GET /jobs/{id}: one job
GET    /jobs/{id}/events    Server-Sent Events: the worker-protocol JSON objects, ``id:`` = their index; resume with
                            the Last-Event-ID header (or ?from=N); the stream ends after the terminal event
POST   /jobs/{id}/cancel    stop (a running job writes a checkpoint first)
GET    /jobs/{id}/files     the output files; GET /jobs/{id}/files/{path}: one of them
GET    /jobs/{id}/result    the output folder as one .zip (?checkpoint=false leaves checkpoint.pt out)
DELETE /jobs/{id}           remove a finished job and its files (409 while it runs)
==========================  ===========================================================================================

Paths in ``options`` (case, fill, mask, geometry) are relative to the uploaded archive's root or to ``path``; with
none given, the case folder is the archive's root or its only sub-folder holding ``transforms.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .. import __version__
from ..errors import DRGSInputError
from .jobs import FINAL, JOB_ID, TERMINAL_EVENTS, JobManager
from ..config import path_fields
from .security import Refused, check_bearer, confined, load_or_create_token, safe_extract

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PATH_KEYS = path_fields()  # every input path a client names is confined to its upload or the data root
SERVER_KEYS = ("out", "resume")  # chosen by the server, never by a client
UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")
KEEPALIVE_S = 15.0
POLL_S = 0.2
STALE_UPLOAD_S = 24 * 3600


@dataclass
class ServerSettings:
    data_dir: Path
    token_file: Path
    data_root: Path | None = None
    slots: list | None = None           # environment additions per slot; None: one CPU slot
    max_upload_bytes: int = 4 << 30

    @classmethod
    def from_args(cls, a) -> "ServerSettings":
        data = Path(a.data).absolute()
        if a.gpus:
            slots = [{"CUDA_VISIBLE_DEVICES": g.strip()} for g in a.gpus.split(",") if g.strip()]
        else:
            slots = _default_slots(a.workers)
        return cls(data_dir=data, token_file=Path(a.token_file) if a.token_file else data / "token",
                   data_root=Path(a.data_root).absolute() if a.data_root else None, slots=slots,
                   max_upload_bytes=int(a.max_upload_mb * 2**20))


def _default_slots(workers: int | None) -> list[dict]:
    """One slot per visible GPU; without GPUs `workers` CPU slots (default 1)."""
    if not workers:
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            n = 0
        if n:
            return [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)]
    return [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(max(1, workers or 1))]


def _remove_older_than(folder: Path, seconds: float) -> None:
    for p in folder.iterdir():
        if time.time() - p.stat().st_mtime > seconds:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def create_app(settings: ServerSettings):
    data_dir = Path(settings.data_dir)
    uploads = data_dir / "uploads"
    scratch = data_dir / "tmp"
    for d in (uploads, scratch):
        d.mkdir(parents=True, exist_ok=True)
        _remove_older_than(d, STALE_UPLOAD_S)  # uploads never submitted, downloads cut off
    token = load_or_create_token(settings.token_file)
    manager = JobManager(data_dir, settings.slots or [{"CUDA_VISIBLE_DEVICES": ""}])

    def authorize(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), token)

    app = FastAPI(title="DRGS4D job server", version=__version__, dependencies=[Depends(authorize)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager

    def error(status: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(Refused)
    async def _refused(request, exc: Refused):
        return error(exc.status, exc.message)

    @app.exception_handler(DRGSInputError)
    async def _input(request, exc: DRGSInputError):
        return error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, f"malformed request: {where}")

    def job_or_404(job_id: str) -> dict:
        job = manager.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise Refused(404, f"no job {job_id!r} on this server (GET /jobs lists them)")
        return job

    @app.get("/health")
    def health():
        return {"server": "drgs4d", "version": __version__, "protocol": PROTOCOL_VERSION,
                "slots": len(manager.slots), "data_root": settings.data_root is not None,
                "max_upload_bytes": settings.max_upload_bytes}

    @app.post("/uploads", status_code=201)
    async def upload(request: Request):
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the upload ({int(declared) / 2**20:.1f} MiB) is larger than the server's limit of "
                               f"{limit / 2**20:.1f} MiB")
        upload_id = secrets.token_hex(8)
        part = uploads / f"{upload_id}.part"
        size = 0
        try:
            with open(part, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise Refused(413, f"the upload is larger than the server's limit of {limit / 2**20:.1f} MiB")
                    fh.write(chunk)
            if size == 0:
                raise Refused(400, "the upload is empty: send the case archive as the request body")
            target = uploads / upload_id
            try:
                count = await asyncio.to_thread(safe_extract, part, target, 4 * limit)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
        finally:
            part.unlink(missing_ok=True)
        return {"upload": upload_id, "files": count, "bytes": size}

    def case_inputs(base: Path, options: dict) -> dict:
        given = {k: options[k] for k in PATH_KEYS if options.get(k) is not None}
        if given:
            return {k: str(confined(base, v, k)) for k, v in given.items()}
        if (base / "transforms.json").is_file():
            return {"case": str(base)}
        found = [p for p in sorted(base.iterdir()) if p.is_dir() and (p / "transforms.json").is_file()]
        if len(found) != 1:
            raise Refused(400, "no case folder found: the archive (or path) must hold transforms.json, fill_run and "
                               "mask_run at its root or in one sub-folder, or the options must name case or "
                               "fill/mask/geometry")
        return {"case": str(found[0])}

    @app.post("/jobs", status_code=201)
    def submit(body: dict = Body(...)):
        from ..pipeline import ReconstructConfig

        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise Refused(400, "'options' must be a JSON object of reconstruct options")
        bad = [k for k in SERVER_KEYS if k in options]
        if bad:
            raise Refused(400, f"the option(s) {', '.join(bad)} are chosen by the server; leave them out")
        if ("upload" in body) == ("path" in body):
            raise Refused(400, "give exactly one of 'upload' (an id from POST /uploads) or 'path' (a folder under the "
                               "server's data root)")
        if "upload" in body:
            upload_id = str(body["upload"])
            source = uploads / upload_id
            if not UPLOAD_ID.match(upload_id) or not source.is_dir():
                raise Refused(404, f"no upload {upload_id!r}: send the archive to POST /uploads first")
        else:
            if settings.data_root is None:
                raise Refused(403, "this server has no data root: upload the case instead (start the server with "
                                   "--data-root to allow paths)")
            source = confined(settings.data_root, body["path"], "path")
            if not source.is_dir():
                raise Refused(404, f"the path {body['path']!r} is not a folder under the data root")
        job_id, folder = manager.new_folder()
        try:
            if "upload" in body:
                os.replace(source, folder / "input")
                base = folder / "input"
            else:
                base = source
            request = {k: v for k, v in options.items() if k not in PATH_KEYS}
            request.update(case_inputs(base, options), out=str(folder / "out"))
            request = ReconstructConfig.from_dict(request).to_dict()  # the engine's own validation, up front
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return manager.submit(job_id, request, options, "upload" if "upload" in body else f"path:{body['path']}")

    @app.get("/jobs")
    def list_jobs():
        return {"jobs": manager.list()}

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str):
        return job_or_404(job_id)

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        job_or_404(job_id)
        return manager.cancel(job_id)

    @app.delete("/jobs/{job_id}")
    def delete(job_id: str):
        job = job_or_404(job_id)
        if job["state"] not in FINAL:
            raise Refused(409, f"job {job_id} is {job['state']}: cancel it first (POST /jobs/{job_id}/cancel)")
        if not manager.wait_exit(job_id, timeout=10.0):
            raise Refused(409, f"job {job_id} has its result but its worker is still shutting down: retry shortly")
        manager.delete(job_id)
        return {"deleted": job_id}

    @app.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, start: int = Query(0, alias="from", ge=0)):
        job_or_404(job_id)
        last = request.headers.get("last-event-id", "")
        if last.strip().isdigit():
            start = max(start, int(last) + 1)
        path = manager.folder(job_id) / "events.jsonl"

        async def stream():
            index, offset, pending, quiet = 0, 0, b"", 0.0
            yield "retry: 1000\n\n"
            while True:
                try:
                    with open(path, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read()
                except FileNotFoundError:  # deleted meanwhile
                    return
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line:
                        continue
                    if index >= start:
                        yield f"id: {index}\ndata: {line}\n\n"
                        quiet = 0.0
                    index += 1
                    try:
                        if json.loads(line).get("event") in TERMINAL_EVENTS:
                            return
                    except ValueError:
                        pass
                job = manager.get(job_id)
                if job is None or (job["state"] in FINAL and not lines and not pending):
                    return
                if await request.is_disconnected():
                    return  # the job runs on; the client reconnects with Last-Event-ID
                await asyncio.sleep(POLL_S)
                quiet += POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def output_files(job_id: str, checkpoint: bool = True) -> list[tuple[str, Path]]:
        out = manager.folder(job_id) / "out"
        files = []
        for p in sorted(out.rglob("*")) if out.is_dir() else []:
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
                continue  # temporary files, locks, links
            if not checkpoint and rel == "checkpoint.pt":
                continue
            files.append((rel, p))
        return files

    @app.get("/jobs/{job_id}/files")
    def list_files(job_id: str):
        job_or_404(job_id)
        return {"files": [{"path": rel, "size": p.stat().st_size} for rel, p in output_files(job_id)]}

    @app.get("/jobs/{job_id}/files/{rel:path}")
    def get_file(job_id: str, rel: str):
        job_or_404(job_id)
        path = confined(manager.folder(job_id) / "out", rel, "file")
        if not path.is_file() or any(part.startswith(".") for part in Path(rel).parts):
            raise Refused(404, f"job {job_id} has no output file {rel!r} (GET /jobs/{job_id}/files lists them)")
        return FileResponse(path, filename=path.name)

    @app.get("/jobs/{job_id}/result")
    def result(job_id: str, checkpoint: bool = True):
        job = job_or_404(job_id)
        if job["state"] not in FINAL:
            raise Refused(409, f"job {job_id} is {job['state']}: wait for its 'done' event (or cancel it)")
        fd, tmp = tempfile.mkstemp(suffix=".zip", dir=scratch)
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # outputs are compressed already
            for rel, path in output_files(job_id, checkpoint):
                zf.write(path, rel)
        return FileResponse(tmp, media_type="application/zip", filename=f"drgs4d-{job_id}.zip",
                            background=BackgroundTask(os.unlink, tmp))

    return app
