"""Run a batch of reconstructions as Ray tasks: one GPU per job (one CPU per job on machines without GPUs).

The driver (this process) submits one task per job that is not done yet, collects results as they come in and
rewrites the state record and the results table after each one.  A small Ray actor, the coordinator, carries the
per-job stage for the progress display and the stop flag: tasks poll it, so that Ctrl-C on the driver makes every
running job checkpoint and stop (the pipeline's own cancel), and jobs still queued are cancelled.  A task whose
worker process dies (killed, out of host memory, node lost) is retried by Ray; the retry resumes from the job's
last checkpoint (``resume=True``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .jobs import Job, is_done, metrics_summary, new_record, read_record, write_record, write_results

log = logging.getLogger(__name__)

STOP_POLL_S = 0.5        # how often a running task asks the coordinator whether to stop
REPORT_EVERY_S = 0.5     # throttle for training progress reports


class Coordinator:
    """Ray actor: the stop flag and the latest stage of every job (for the driver's progress display)."""

    def __init__(self):
        self.stop = False
        self.state: dict[str, dict] = {}

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def attempt(self, name: str, pid: int, host: str) -> int:
        entry = self.state.setdefault(name, {"attempts": 0})
        entry.update(attempts=entry["attempts"] + 1, pid=pid, host=host, stage="start")
        return entry["attempts"]

    def report(self, name: str, info: dict) -> None:
        self.state.setdefault(name, {"attempts": 0}).update(info)

    def snapshot(self) -> dict:
        return self.state


def run_job(name: str, config: dict, out: str, resume: bool, coordinator) -> dict:
    """Body of one Ray task: run the reconstruction in this worker; every outcome is a returned dict.

    Input and engine errors become ``status: error`` (Ray does not retry them); only the death of the worker
    process itself reaches Ray as a failure, which it retries.
    """
    import platform

    from ..errors import DRGSInputError
    from ..pipeline import ReconstructConfig, run_reconstruction

    coordinator.attempt.remote(name, os.getpid(), platform.node())  # actor calls of one caller run in order
    stop = threading.Event()
    finished = threading.Event()

    def stop_requested() -> bool:
        # through a concurrent.futures future, not ray.get: a task blocked in ray.get lends its CPU to the
        # next queued job, and the worker would then run two reconstructions at once
        try:
            return bool(coordinator.stop_requested.remote().future().result(timeout=30))
        except Exception:  # noqa: BLE001 - the driver went away: stop and keep the checkpoint
            return True

    def poll_stop():
        while not finished.wait(STOP_POLL_S):
            if stop_requested():
                stop.set()
                return

    threading.Thread(target=poll_stop, name="drgs-batch-stop", daemon=True).start()
    seen = {"first_train_iteration": None, "last": 0.0, "stage": None}

    def on_event(event: dict) -> None:
        if event.get("event") != "progress":
            return
        stage, now = event.get("stage"), time.monotonic()
        if stage == "train" and seen["first_train_iteration"] is None:
            seen["first_train_iteration"] = event.get("iteration")
        if stage != seen["stage"] or now - seen["last"] >= REPORT_EVERY_S:
            seen.update(stage=stage, last=now)
            coordinator.report.remote(name, {"stage": stage, "iteration": event.get("iteration"),
                                             "iterations": event.get("iterations")})

    checkpoint = Path(out) / "checkpoint.pt"
    resumed = bool(resume and checkpoint.exists())
    t0 = time.perf_counter()
    result = {"resumed": resumed}
    try:
        if stop_requested():
            return {**result, "status": "cancelled", "checkpoint": None}
        cfg = ReconstructConfig.from_dict({**config, "out": out, "resume": resume})
        outcome = run_reconstruction(cfg, on_event=on_event, should_stop=stop.is_set)
        result.update(status=outcome["status"], checkpoint=outcome["outputs"].get("checkpoint"),
                      metrics=metrics_summary(outcome["metrics"]) if outcome["status"] == "done" else None)
    except DRGSInputError as exc:
        result.update(status="error", error=str(exc), error_kind="input")
    except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the batch
        log.exception("job %s failed", name)
        result.update(status="error", error=f"{type(exc).__name__}: {exc}", error_kind="internal")
    finally:
        finished.set()
    result.update(time_s=time.perf_counter() - t0, first_train_iteration=seen["first_train_iteration"])
    return result


def _resources(cpus_per_job: float, gpus_per_job: float | None) -> dict:
    import ray

    if gpus_per_job is None:
        gpus_per_job = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": cpus_per_job, "num_gpus": gpus_per_job}


def run_batch(jobs: list[Job], out_root, *, address: str | None = None, max_retries: int = 2,
              cpus_per_job: float = 1, gpus_per_job: float | None = None, should_stop: Callable[[], bool] = None,
              on_update: Callable[[dict], None] | None = None, poll_s: float = 0.5, stop_grace_s: float = 600,
              ray_init: dict | None = None) -> list[dict]:
    """Run the jobs not done yet; returns the final records (one per job, in input order).

    Ray is started locally (all local GPUs/CPUs) unless it is already initialised or `address` names a cluster
    (``"auto"`` or ``"host:port"``).  `should_stop()` is polled (Ctrl-C in the CLI): running jobs then checkpoint
    and stop, queued ones are cancelled; after `stop_grace_s` the rest is cancelled by force.  `on_update(state)`
    is called every `poll_s` with ``{"records": {name: record}, "live": {name: stage info}}``.
    """
    import ray

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    should_stop = should_stop or (lambda: False)
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
    resources = _resources(cpus_per_job, gpus_per_job)
    log.info("batch of %d jobs, %s per job", len(jobs), resources)

    records: dict[str, dict] = {}
    todo: list[Job] = []
    for job in jobs:
        previous = read_record(out_root, job.name) or {}
        if job.problem:
            records[job.name] = new_record(job, "error", error=job.problem, error_kind="input", attempts=0)
            write_record(out_root, records[job.name])
        elif is_done(job, out_root):
            records[job.name] = {**previous, "reused": True}
        else:
            # a checkpoint left by a killed or stopped run of these options is resumed (also by Ray's retries);
            # one of other options cannot be, and would make the engine refuse to resume
            stale = Path(job.out) / "checkpoint.pt"
            if previous.get("key") != job.key and stale.exists():
                log.warning("job %s: removing the checkpoint of a run with other options", job.name)
                stale.unlink()
            records[job.name] = new_record(job, "pending", attempts=0)
            todo.append(job)
    ordered = [j.name for j in jobs]

    def publish():
        write_results(out_root, [records[n] for n in ordered])

    publish()
    if not todo:
        return [records[n] for n in ordered]

    coordinator = ray.remote(num_cpus=0)(Coordinator).remote()
    task = ray.remote(run_job).options(max_retries=max_retries, retry_exceptions=False, **resources)
    pending = {}
    for job in todo:
        ref = task.remote(job.name, job.config, job.out, True, coordinator)
        pending[ref] = job
        records[job.name] = new_record(job, "running", attempts=0)
        write_record(out_root, records[job.name])  # holds the option key: a killed run resumes on the next batch

    stopping_since = None
    live: dict = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            try:
                live = ray.get(coordinator.snapshot.remote())
            except Exception:  # noqa: BLE001 - progress display only
                pass
            for ref in ready:
                job = pending.pop(ref)
                records[job.name] = _finish(job, ref, live.get(job.name, {}))
                write_record(out_root, records[job.name])
                publish()
                log.info("job %s: %s", job.name, records[job.name]["status"])
            if on_update is not None:
                on_update({"records": dict(records), "live": live})
            if stopping_since is None and should_stop():
                stopping_since = time.monotonic()
                _stop(coordinator, pending, live)
            elif stopping_since is not None and time.monotonic() - stopping_since > stop_grace_s:
                _force_cancel(pending)
    except KeyboardInterrupt:
        _force_cancel(pending)
        for ref, job in list(pending.items()):
            records[job.name] = new_record(job, "cancelled", error="stopped at once (second Ctrl-C)",
                                           attempts=live.get(job.name, {}).get("attempts", 0))
            write_record(out_root, records[job.name])
        publish()
        raise
    return [records[n] for n in ordered]


def _finish(job: Job, ref, live: dict) -> dict:
    import ray
    from ray.exceptions import RayError, TaskCancelledError

    attempts = live.get("attempts", 0)
    try:
        result = ray.get(ref)
    except TaskCancelledError:
        return new_record(job, "cancelled", attempts=attempts, checkpoint=None)
    except RayError as exc:  # the worker died on every attempt, or the cluster lost it
        text = str(exc).strip().splitlines()
        return new_record(job, "error", attempts=attempts, error_kind="worker",
                          error=f"{type(exc).__name__} after {attempts} attempt(s): {text[0] if text else ''}")
    return new_record(job, result.pop("status"), attempts=attempts, **result)


def _stop(coordinator, pending: dict, live: dict) -> None:
    """Ctrl-C: running jobs checkpoint and stop (they poll the flag); queued ones are cancelled."""
    import ray

    log.warning("stopping: running jobs save a checkpoint, queued jobs are cancelled")
    ray.get(coordinator.request_stop.remote())
    for ref, job in pending.items():
        if job.name not in live:  # not started on any worker yet
            ray.cancel(ref)


def _force_cancel(pending: dict) -> None:
    import ray

    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception as exc:  # noqa: BLE001
            log.debug("cancel: %s", exc)
