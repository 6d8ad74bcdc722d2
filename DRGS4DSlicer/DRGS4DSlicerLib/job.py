"""One reconstruction run as the panel sees it: request file, worker process, scene updates, state.

``ReconstructionJob`` is driven by polling (the panel's QTimer calls ``poll()``; tests call it in a loop), so nothing
here blocks or needs Qt.  After ``done`` the results are loaded one piece per ``poll()``: each piece's files are read in
a background thread and only its scene changes run in the caller's (Slicer's main) thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import process, protocol, remote
from .scene import LoadStep, SceneUpdater, read_preview

log = logging.getLogger("DRGS4D.job")

REQUEST_FILE = "drgs4d_request.json"
CHECKPOINT_FILE = "checkpoint.pt"  # where drgs_core.pipeline keeps the training state of a run

# ReconstructConfig fields the panel may set (the engine rejects unknown keys).
REQUEST_KEYS = ("case", "fill", "mask", "geometry", "dicom", "fill_uid", "mask_uid", "out", "views", "schedule",
                "iterations", "device", "seed",
                "snapshot_every", "checkpoint_every", "resume", "static_field", "iso_level", "preset",
                "n_gaussians", "init_threshold", "log2_table_size", "times_4d", "cine_frame", "progress_every",
                "densify_until", "detector_binning")


def make_request(**fields) -> dict:
    """A ReconstructConfig dict from keyword fields; ``None`` values are left out (engine defaults apply)."""
    unknown = set(fields) - set(REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown request fields: {sorted(unknown)}")
    return {k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in fields.items() if v is not None}


def new_run_dir(output_root: str | os.PathLike, name: str) -> Path:
    """``<output_root>/<name>_<YYYYmmdd-HHMMSS>`` (suffixed when it exists)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_root) / f"{safe}_{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def find_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The training checkpoint a resume of the run in ``run_dir`` would continue from, if there is one.

    The engine keeps exactly one, ``<run>/checkpoint.pt``, and resumes from that file only.  (``model.pt`` is a result,
    and a ``.tmp-*`` file next to it is a checkpoint whose writing was interrupted.)
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    return str(path) if path.is_file() else None


@dataclass
class JobState:
    status: str = "idle"  # idle | running | cancelling | loading | done | cancelled | failed
    stage: str | None = None
    fraction: float = 0.0
    text: str = ""
    iteration: int | None = None
    iterations: int | None = None
    loss: float | None = None
    n_gaussians: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    run_dir: str | None = None
    device: str | None = None
    snapshots: list = field(default_factory=list)  # iterations of snapshots applied to the scene
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    checkpoint: str | None = None
    error: dict | None = None
    returncode: int | None = None


class ReconstructionJob:
    """Run ``request`` (a ReconstructConfig dict) in a worker process and stream its results into ``scene``.

    ``load_options`` go to ``SceneUpdater.load_outputs`` (load_sequence, load_renders, threshold, ...).
    ``remote_client`` (a ``remote.RemoteClient``): run on that ``drgs4d serve`` server instead of a local worker; the
    results are downloaded into ``run_dir`` and loaded exactly as after a local run.
    ``on_event(event)`` is called for every worker event, and with ``{"event": "preview_applied", "iteration"}``
    once a snapshot's files are in the scene (they are read in a background thread).
    """

    def __init__(self, scene, request: dict, run_dir: str | os.PathLike, name: str = "DRGS4D",
                 python: str | None = None, external: bool = False, engine: Path | None = None,
                 extra_env: dict | None = None, load_options: dict | None = None, updater_kwargs: dict | None = None,
                 on_event=None, cancel_grace_s: float = 60.0, remote_client: remote.RemoteClient | None = None):
        self.scene = scene
        self.remote_client = remote_client
        self.run_dir = Path(run_dir)
        self.request = dict(request)
        self.request.setdefault("out", str(self.run_dir))
        self.name = name
        self.python = python
        self.external = external
        self.engine = engine
        self.extra_env = extra_env
        self.load_options = dict(load_options or {})
        self.on_event = on_event
        self.cancel_grace_s = cancel_grace_s
        self.state = JobState(run_dir=str(self.run_dir))
        self.worker: process.WorkerProcess | remote.RemoteJob | None = None
        self.updater = SceneUpdater(scene, run_name=name, run_dir=str(self.run_dir), **(updater_kwargs or {}))
        self.scene_updates = True  # set False when the scene is closed while the job still runs
        self.log_lines: list[str] = []
        self._preview: dict | None = None  # the newest snapshot event not yet read
        self._loads: list = []  # scene.LoadStep pieces of the final results still to apply
        self._reading = None  # (step, future) of the piece whose files a background thread reads
        self._reader: ThreadPoolExecutor | None = None

    # -- lifecycle --
    @property
    def request_path(self) -> Path:
        return self.run_dir / REQUEST_FILE

    def write_request(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.request_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.request, indent=2), encoding="utf-8")
        os.replace(tmp, self.request_path)
        return self.request_path

    def start(self) -> "ReconstructionJob":
        self.write_request()
        if self.remote_client is not None:
            self.worker = remote.RemoteJob(self.remote_client, self.request).start()
            self.state.status = "running"
            self.state.text = protocol.tr("Uploading the inputs to the remote server...")
            return self
        self.worker = process.start_worker(str(self.request_path), python=self.python, external=self.external,
                                           cwd=str(self.run_dir), engine=self.engine, extra_env=self.extra_env)
        self.state.status = "running"
        self.state.text = protocol.tr("Starting the reconstruction process...")
        return self

    @classmethod
    def resume(cls, scene, run_dir: str | os.PathLike, **kwargs) -> "ReconstructionJob":
        """A job that continues the run in ``run_dir`` from its last checkpoint."""
        run_dir = Path(run_dir)
        path = run_dir / REQUEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a DRGS4D run folder (no {REQUEST_FILE})")
        request = json.loads(path.read_text(encoding="utf-8"))
        request["resume"] = True
        return cls(scene, request, run_dir, **kwargs)

    @property
    def running(self) -> bool:
        return self.state.status in ("running", "cancelling")

    @property
    def loading(self) -> bool:
        """Results are still being loaded into the scene (the worker has finished)."""
        return bool(self._loads) or self._reading is not None

    @property
    def finished(self) -> bool:
        """The worker has exited and everything it produced is in the scene."""
        return self.worker is not None and self.worker.finished() and not self.loading

    def cancel(self) -> None:
        """Ask the worker to stop (non-blocking); it checkpoints first.  ``poll()`` reports the outcome."""
        if self.worker is not None and self.running:
            self.state.status = "cancelling"
            self.state.text = protocol.tr("Cancelling: saving a checkpoint...")
            if isinstance(self.worker, remote.RemoteJob):
                self._cancel_remote()
            else:
                self.worker.request_cancel(self.cancel_grace_s)

    def _cancel_remote(self) -> None:
        """Ask the server to stop the job from a background thread (an HTTP request must not block the caller)."""
        threading.Thread(target=self.worker.request_cancel, name="drgs-remote-cancel", daemon=True).start()

    def kill(self) -> None:
        if isinstance(self.worker, remote.RemoteJob):
            self._cancel_remote()  # the server stops it; nothing runs here but the event thread
        elif self.worker is not None:
            self.worker.cancel(timeout=0.1)

    # -- polling --
    def poll(self) -> list[dict]:
        """Handle everything the worker reported since the last call; returns the events."""
        if self.worker is None:
            return []
        events = self.worker.poll_events()
        self._handle(events)
        self._load_one()
        return events

    def _handle(self, events: list[dict]) -> None:
        # Only the newest snapshot of a batch is worth loading: older ones are already outdated.
        last_snapshot = max((i for i, e in enumerate(events) if e.get("event") == "snapshot"), default=None)
        for index, event in enumerate(events):
            name = event.get("event")
            if name == "snapshot" and index != last_snapshot:
                continue
            try:
                self._apply(event)
            except Exception as exc:  # noqa: BLE001 - a scene problem must not kill the polling loop
                log.exception("could not apply %s event", name)
                self.state.error = {"event": "error", "kind": "internal",
                                    "message": protocol.tr("Loading the {role} results into the scene failed: {reason}",
                                                           role=name, reason=exc)}
                if name == "done":
                    self.state.status = "failed"
            if self.on_event:
                self.on_event(event)

    def _apply(self, event: dict) -> None:
        name = event.get("event")
        st = self.state
        if name == "log":
            self.log_lines.append(event["line"])
            del self.log_lines[:-2000]
            return
        if name == "output":
            self.log_lines.append(event["line"])
            return
        if name == "started":
            st.run_dir = event.get("run_dir") or st.run_dir
            st.device = event.get("device")
            st.iterations = event.get("iterations")
        elif name == "progress":
            st.stage = event.get("stage")
            for key in ("iteration", "iterations", "loss", "n_gaussians", "elapsed_s", "eta_s"):
                if event.get(key) is not None:
                    setattr(st, key, event[key])
            frac = protocol.progress_fraction(event)
            if frac is not None:
                st.fraction = max(st.fraction, frac)
        elif name == "snapshot":
            if self.scene_updates and not self._loads:  # once the final results load, previews are outdated
                self._preview = event  # only the newest is worth reading

        elif name == "done":
            st.outputs = dict(event.get("outputs") or {})
            st.metrics = dict(event.get("metrics") or {})
            st.fraction = 1.0
            self._preview = None
            if self.scene_updates:
                self._loads = self.updater.output_steps(st.outputs, metrics=st.metrics, **self.load_options)
                st.status = "loading" if self._loads else "done"
            else:
                st.status = "done"
        elif name == "cancelled":
            # The engine names the checkpoint it saved; null when it stopped before training (this run saved nothing)
            # or when the worker was killed.  A checkpoint.pt already in the run folder - from the earlier part of a
            # resumed run, or the last periodic save of a killed worker - can still be resumed from; else nothing can.
            st.checkpoint = event.get("checkpoint") or find_checkpoint(st.run_dir or self.run_dir)
            st.status = "cancelled"
        elif name == "error":
            if event.get("kind") == "protocol" and not event.get("fatal", True):
                log.warning("%s", event.get("message"))
                return
            st.error = event
            st.status = "failed"
        elif name == "exit":
            st.returncode = event.get("returncode")
            if st.status in ("running", "cancelling"):
                st.status = "cancelled" if st.status == "cancelling" else "failed"
            return
        if name == "cancelled":
            st.text = protocol.describe_event(dict(event, checkpoint=st.checkpoint))
        elif name in ("started", "progress", "snapshot", "done", "error"):
            st.text = protocol.describe_event(event)
        if st.status == "loading":
            st.text = protocol.tr("Loading the results into the scene...")

    def _load_one(self) -> None:
        """Advance loading the results by one piece: start reading its files in the background, or apply a piece
        whose files are read (at most one apply per call, so that each call stays short)."""
        if self._reading is None and self._preview is not None and not self._loads:
            event, self._preview = self._preview, None
            self._loads.append(LoadStep("preview", lambda data, it=event.get("iteration"): self._show_preview(data, it),
                                        lambda: read_preview(event.get("volume"), event.get("mesh"))))
        if self._reading is None and self._loads:
            step = self._loads.pop(0)
            if step.read is None:
                self._run_step(step, None)
                self._check_loaded()
                return
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drgs-load")
            self._reading = (step, self._reader.submit(step.read))
            return
        if self._reading is not None and self._reading[1].done():
            step, future = self._reading
            self._reading = None
            try:
                data = future.result()
            except Exception as exc:  # noqa: BLE001 - a broken file must not stop the other results
                log.exception("could not read the %s results", step.role)
                self.state.error = {"event": "error", "kind": "internal",
                                    "message": protocol.tr("Loading the {role} results into the scene failed: {reason}",
                                                           role=step.role, reason=exc)}
                data = None
                step = None
            if step is not None:
                self._run_step(step, data)
        self._check_loaded()

    def _show_preview(self, data, iteration) -> None:
        if self._loads or self.state.status not in ("running", "cancelling"):
            return  # the final results are coming (or the run is over): this preview is outdated
        self.updater.apply_preview(data, iteration)
        self.state.snapshots.append(iteration)
        if self.on_event:
            self.on_event({"event": "preview_applied", "iteration": iteration})

    def _check_loaded(self) -> None:
        if not self.loading and self.state.status == "loading":
            self.state.status = "done"
            self.state.text = protocol.describe_event({"event": "done"})
            if self._reader is not None:
                self._reader.shutdown(wait=False)
                self._reader = None

    def _run_step(self, step, data) -> None:
        try:
            self._loads[:0] = step.finish(data)
        except Exception as exc:  # noqa: BLE001
            log.exception("could not load the %s results", step.role)
            self.state.error = {"event": "error", "kind": "internal",
                                "message": protocol.tr("Loading the {role} results into the scene failed: {reason}",
                                                           role=step.role, reason=exc)}

    def wait(self, timeout: float = 600.0, interval: float = 0.1) -> JobState:
        """Poll until the worker has exited (tests and the in-Slicer self-test; the panel uses a QTimer)."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if time.monotonic() > deadline:
                self.kill()
                self.poll()
                raise TimeoutError(f"the reconstruction did not finish within {timeout:.0f} s")
            time.sleep(interval)
        return self.state
