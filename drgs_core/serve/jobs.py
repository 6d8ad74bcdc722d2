"""The server's jobs: kept on disk, run one at a time per slot (a GPU, or a CPU worker) in worker processes.

Each job is a folder ``DATA/jobs/<id>/``::

    job.json       the record (state, times, the client's options), replaced atomically on every change
    request.json   the worker request (ReconstructConfig)
    input/         the uploaded case (absent when the job names a case under the data root)
    out/           the run's output folder, exactly as a local ``reconstruct`` writes it
    events.jsonl   every event of the run, one worker-protocol JSON object per line (what clients stream)
    worker.log     the worker's stderr

A job runs in ``python -m drgs_core.worker`` (the same process the Slicer panel starts locally), so a crash of the
engine never takes the server down, and the job keeps running whoever is listening.  A server that restarts finds
its jobs again; jobs that were queued or running when it stopped are queued again and resume from their checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..io.atomic import write_text_atomic

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "error", "cancelled")
FINAL = ("done", "error", "cancelled")
TERMINAL_EVENTS = ("done", "cancelled", "error")
KILL_AFTER_S = 120.0  # a cancelled worker that has not stopped by then is killed
JOB_ID = re.compile(r"^[0-9a-f]{16}$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobManager:
    """Jobs on disk plus one runner thread per slot; `slots` are environment additions, e.g.
    ``[{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]``."""

    def __init__(self, data_dir, slots: list[dict]):
        self.root = Path(data_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self._lock = threading.Lock()
        self._jobs: dict[str, dict] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._queue: queue.Queue = queue.Queue()
        self._load()
        for i, env in enumerate(slots):
            threading.Thread(target=self._runner, args=(env,), name=f"drgs-slot-{i}", daemon=True).start()

    # ---- records ----------------------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: dict) -> None:
        write_text_atomic(self.folder(job["id"]) / "job.json", json.dumps(job, indent=1))

    def _update(self, job_id: str, **fields) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:  # deleted meanwhile (a final job may be deleted while its worker exits)
                return {}
            job.update(fields)
            self._save(job)
            return dict(job)

    def _load(self) -> None:
        for path in sorted(self.root.glob("*/job.json")):
            try:
                job = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("skipping the unreadable job record %s: %s", path, exc)
                continue
            self._jobs[job["id"]] = job
            if job["state"] not in ("queued", "running"):
                continue
            last = self._last_event(job["id"])
            if last is not None and last.get("event") in TERMINAL_EVENTS:  # it ended just before the server did
                job.update(state=last["event"], finished=job["finished"] or _now())
            else:  # the server stopped under it: run it again, from its checkpoint
                job.update(state="queued", resume=True)
                self._queue.put(job["id"])
            self._save(job)
        log.info("%d jobs on disk", len(self._jobs))

    def _last_event(self, job_id: str) -> dict | None:
        try:
            lines = (self.folder(job_id) / "events.jsonl").read_text(encoding="utf-8").strip().splitlines()
            return json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def list(self) -> list[dict]:
        with self._lock:
            return sorted((dict(j) for j in self._jobs.values()), key=lambda j: j["created"])

    # ---- submit / cancel / delete -----------------------------------------------------------------------------
    def new_folder(self) -> tuple[str, Path]:
        job_id = secrets.token_hex(8)
        folder = self.folder(job_id)
        folder.mkdir()
        return job_id, folder

    def submit(self, job_id: str, request: dict, options: dict, source: str) -> dict:
        """Queue a job whose folder exists; `request` is the full worker request (with its ``out``)."""
        folder = self.folder(job_id)
        write_text_atomic(folder / "request.json", json.dumps(request, indent=1))
        (folder / "events.jsonl").touch()
        job = {"id": job_id, "state": "queued", "created": _now(), "started": None, "finished": None,
               "options": options, "source": source, "run_dir": request["out"], "resume": False, "exit_code": None,
               "message": None}
        with self._lock:
            self._jobs[job_id] = job
            self._save(job)
        self._queue.put(job_id)
        return dict(job)

    def cancel(self, job_id: str) -> dict:
        """A queued job is cancelled at once; a running one is asked to stop (it writes a checkpoint first)."""
        with self._lock:
            job = self._jobs[job_id]
            if job["state"] == "queued":
                job.update(state="cancelled", finished=_now(), message="cancelled while queued")
                self._save(job)
                self._append(job_id, {"event": "cancelled", "checkpoint": None, "stage": "queued"})
            elif job["state"] == "running":
                job["cancel_requested"] = True
                self._save(job)
            snapshot = dict(job)
        if snapshot["state"] == "running":
            self.stop_process(job_id)  # if the process is not started yet, _run sees cancel_requested
        return snapshot

    def stop_process(self, job_id: str) -> None:
        proc = self._procs.get(job_id)
        if proc is None or proc.poll() is not None:
            return
        try:  # SIGTERM to the worker's process group: it checkpoints and reports 'cancelled'
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return

        def kill_later():
            try:
                proc.wait(KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                log.warning("job %s did not stop within %.0f s: killing it", job_id, KILL_AFTER_S)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        threading.Thread(target=kill_later, daemon=True).start()

    def wait_exit(self, job_id: str, timeout: float) -> bool:
        """Wait for the job's worker process to exit (a job is final at its last event, a moment before its worker
        exits); False if it is still running after `timeout` seconds."""
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def delete(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(job_id)
        shutil.rmtree(self.folder(job_id), ignore_errors=True)
        log.info("deleted job %s (%s)", job_id, job["state"])

    # ---- running ----------------------------------------------------------------------------------------------
    def _append(self, job_id: str, event: dict) -> None:
        from ..worker import encode_event

        with open(self.folder(job_id) / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(encode_event(event) + "\n")

    def _runner(self, env_extra: dict) -> None:
        while True:
            job_id = self._queue.get()
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job["state"] != "queued":
                    continue  # cancelled or deleted while queued
                job.update(state="running", started=_now())
                self._save(job)
            try:
                self._run(job_id, env_extra)
            except Exception as exc:  # noqa: BLE001 - the slot must survive anything
                log.exception("job %s", job_id)
                try:
                    self._append(job_id, {"event": "error", "kind": "internal", "message": f"server: {exc}"})
                except OSError:  # the job's folder is gone (deleted)
                    pass
                self._update(job_id, state="error", finished=_now(), message=str(exc))

    def _run(self, job_id: str, env_extra: dict) -> None:
        folder = self.folder(job_id)
        request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
        if self.get(job_id).get("resume"):
            request["resume"] = True
            write_text_atomic(folder / "request.json", json.dumps(request, indent=1))
        env = {**os.environ, **env_extra}
        with open(folder / "worker.log", "ab") as errlog:
            # --watch-stdin: if the server dies, the pipe closes and the worker checkpoints and stops; the job is
            # then queued again on the next start and resumes from that checkpoint
            proc = subprocess.Popen([sys.executable, "-m", "drgs_core.worker", "--config", str(folder / "request.json"),
                                     "--watch-stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog,
                                    env=env, start_new_session=True)
        with self._lock:
            self._procs[job_id] = proc
            cancel_now = self._jobs[job_id].get("cancel_requested")
        if cancel_now:
            self.stop_process(job_id)
        last = None
        with open(folder / "events.jsonl", "a", encoding="utf-8") as events:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("{"):
                    continue
                events.write(line + "\n")
                events.flush()
                try:
                    last = json.loads(line)
                except ValueError:
                    continue
                if last.get("event") in TERMINAL_EVENTS:  # the outputs are written: final from now on
                    self._update(job_id, state=last["event"],
                                 finished=_now(), message=last.get("message"))
        code = proc.wait()
        proc.stdin.close()
        with self._lock:
            self._procs.pop(job_id, None)
        if last is None or last.get("event") not in TERMINAL_EVENTS:
            message = f"the worker process ended without a result (exit code {code}); see worker.log"
            self._append(job_id, {"event": "error", "kind": "crashed", "message": message})
            self._update(job_id, state="error", finished=_now(), exit_code=code, message=message)
        else:
            self._update(job_id, exit_code=code)
        log.info("job %s: %s", job_id, (self.get(job_id) or {}).get("state", "deleted"))
