"""`drgs4d batch` and `drgs4d serve`: sub-commands for many cases (Ray) and the remote GPU server (FastAPI).

Kept apart from cli.py so that the core command line has no trace of Ray or FastAPI; both are imported only when
these commands run (extras ``drgs4d[batch]`` and ``drgs4d[serve]``).
"""

from __future__ import annotations

import signal
import sys
import threading

from .batch.jobs import parse_cell
from .errors import DRGSInputError


def _missing(extra: str, exc: ImportError) -> int:
    print(f"error: {exc.name or exc} is not installed; install it with: pip install 'drgs4d[{extra}]'", file=sys.stderr)
    return 2


def _option_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DRGSInputError("bad --set option", repr(pair), "KEY=VALUE with a reconstruct option as KEY",
                                 "e.g. --set views=20 --set schedule=full")
        out[key.strip()] = parse_cell(value)
    return out


class _BatchDisplay:
    """One progress bar over jobs; its description names each running job's stage."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = None if quiet else tqdm(total=total, desc="jobs", unit="job", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, state: dict) -> None:
        if self.bar is None:
            return
        records = state["records"].values()
        self.bar.n = sum(r.get("status") in ("done", "error", "cancelled") for r in records)
        running = []
        for name, info in sorted(state["live"].items()):
            rec = state["records"].get(name, {})
            if rec.get("status") == "running" and info.get("stage"):
                it = f" {info['iteration']}/{info['iterations']}" if info.get("stage") == "train" else ""
                running.append(f"{name}: {info['stage']}{it}")
        self.bar.set_postfix_str("; ".join(running)[:160], refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_batch(a) -> int:
    try:
        import ray
    except ImportError as exc:
        return _missing("batch", exc)
    from .batch import read_jobs
    from .batch.runner import run_batch

    defaults = _option_pairs(a.set)
    for key in ("views", "schedule", "iterations", "preset", "device"):
        if getattr(a, key) is not None:
            defaults[key] = getattr(a, key)
    jobs = read_jobs(a.input, a.out, defaults)
    bad = [j for j in jobs if j.problem]
    print(f"{len(jobs)} jobs ({len(bad)} with input errors) -> {a.out}", file=sys.stderr)
    ray.init(address=a.address, include_dashboard=False, log_to_driver=a.verbose)
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        stop.set()
        print("\nstopping: running jobs save a checkpoint (Ctrl-C again to stop at once) ...", file=sys.stderr)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    display = _BatchDisplay(len(jobs), a.quiet)
    try:
        records = run_batch(jobs, a.out, max_retries=a.max_retries, cpus_per_job=a.cpus_per_job,
                            gpus_per_job=a.gpus_per_job, should_stop=stop.is_set, on_update=display)
    except KeyboardInterrupt:
        print("stopped at once; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        display.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["status"] == "error":
            print(f"{r['name']}: {r.get('error')}", file=sys.stderr)
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; results in {a.out}/results.csv")
    return 0 if counts.get("error", 0) == 0 and not stop.is_set() else (3 if stop.is_set() else 1)


def add_batch_parser(sub) -> None:
    s = sub.add_parser("batch", help="reconstruct many cases (a folder of case folders or a CSV/JSON manifest) on Ray")
    s.add_argument("input", help="a folder of case folders, or a manifest (.csv/.json: one job per row, columns = "
                                 "name and any `reconstruct` option)")
    s.add_argument("--out", required=True, help="output folder: one sub-folder per job, results.csv, results.json")
    s.add_argument("--address", help="an existing Ray cluster ('auto' or host:port); default: start Ray locally")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="a default reconstruct option for every job "
                   "(a manifest column wins), e.g. --set iterations=2000; repeatable")
    s.add_argument("--views", type=int, help="default number of training views")
    s.add_argument("--schedule", choices=["fast", "full"], help="default schedule")
    s.add_argument("--iterations", type=int, help="default iteration count")
    s.add_argument("--preset", choices=["demo", "tiny"], help="default size preset (CPU runs)")
    s.add_argument("--device", help="default device (auto: the GPU Ray assigned to the job, else the CPU)")
    s.add_argument("--max-retries", type=int, default=2, help="retries of a job whose worker process died (default 2)")
    s.add_argument("--cpus-per-job", type=float, default=1, help="CPU cores Ray reserves per job (default 1)")
    s.add_argument("--gpus-per-job", type=float, help="GPUs per job (default: 1 when the cluster has GPUs, else 0)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_batch)


def cmd_serve(a) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        return _missing("serve", exc)
    from .serve.app import ServerSettings, create_app

    settings = ServerSettings.from_args(a)
    app = create_app(settings)
    print(f"DRGS4D server on http://{a.host}:{a.port} (data in {settings.data_dir}); bearer token in "
          f"{settings.token_file}", file=sys.stderr)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine; put it behind a TLS reverse proxy (see README)", file=sys.stderr)
    # open event streams must not hold a shutdown forever; jobs left running resume on the next start
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning" if not a.verbose else "info",
                timeout_graceful_shutdown=5)
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="remote GPU job server for the Slicer panel (HTTP API, bearer token)")
    s.add_argument("--data", required=True, help="server folder: jobs, uploads, the token file")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    s.add_argument("--token-file", help="bearer token file (default DATA/token; created owner-only on first start)")
    s.add_argument("--data-root", help="folder of cases on the server that jobs may name by relative path")
    s.add_argument("--gpus", help="GPU indices to run jobs on, e.g. 0,1 (one job per GPU); default: all visible")
    s.add_argument("--workers", type=int, help="parallel jobs when there is no GPU (default 1)")
    s.add_argument("--max-upload-mb", type=float, default=4096, help="upload size limit in MiB (default 4096)")
    s.set_defaults(func=cmd_serve)
