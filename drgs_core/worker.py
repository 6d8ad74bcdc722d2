"""Background-process entry point used by the 3D Slicer panel (and anything else that wants JSON events).

    python -m drgs_core.worker --config REQUEST.json [--watch-stdin] [--new-session]
    python -m drgs_core.worker --version | --probe
    python -m drgs_core.worker --describe REQUEST.json
    python -m drgs_core.worker --list-dicom PATH [PATH ...]
    python -m drgs_core.worker --make-phantom FOLDER [--phantom-options JSON]

Protocol (version ``PROTOCOL_VERSION``): stdout carries one JSON object per line and nothing else; every object has
``"protocol": 1`` and ``"event"`` (worker - the first event of a run, with the interpreter's pid -, started, progress,
snapshot, done, cancelled, error, or for the utility commands version, probe, described, dicom_runs, phantom).  Each
line is flushed as soon as it is written.  Logging goes to stderr.  Output that a
library prints to stdout by accident is diverted to stderr at the file-descriptor level, so the event stream stays
clean.

REQUEST.json holds a ``ReconstructConfig`` as a JSON object (``ReconstructConfig.to_dict()``).

Stopping: SIGTERM or SIGINT (CTRL_BREAK on Windows), or with ``--watch-stdin`` the line ``cancel`` on stdin or stdin
reaching end of file (the panel went away), sets a stop flag.  Under a launcher (Slicer's PythonSlicer) a front end
writes ``cancel`` first and signals the pid of the ``worker`` event, never the launcher.  A missing third-party
package (e.g. torch) is an ``input`` error that says what to do.  During training the pipeline then writes a checkpoint
and reports ``cancelled`` with its path; a later run of the same request with ``"resume": true`` continues from it.
A stop before training reports ``cancelled`` with ``"checkpoint": null`` (nothing to resume).

Exit codes: 0 done, 1 internal error, 2 input error (message is for the user), 3 cancelled.

The panel starts this process in a new session / process group so that it can stop the whole process tree; a
front end that cannot do that passes ``--new-session`` and the worker calls setsid() itself (POSIX).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback

PROTOCOL_VERSION = 1

EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_CANCELLED = 3

log = logging.getLogger("drgs_core.worker")


# ---- encoding ------------------------------------------------------------------------------------------------------

def _plain(obj):
    """JSON-safe copy: numpy scalars/arrays -> lists/floats, paths -> str, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _plain(obj.tolist())
    if hasattr(obj, "item"):
        return _plain(obj.item())
    return str(obj)


def encode_event(event: dict) -> str:
    """One protocol line (without newline)."""
    payload = {"protocol": PROTOCOL_VERSION}
    payload.update(_plain(event))
    payload["protocol"] = PROTOCOL_VERSION
    return json.dumps(payload, allow_nan=False, separators=(",", ":"))


class EventWriter:
    """Writes protocol lines to a text stream, one flushed line per event, safe to call from several threads.

    A reader that goes away (closed pipe) is treated like a cancel: `on_closed()` is called once (the worker
    passes its stop flag), later events are dropped, and the run stops at its next checkpoint.
    """

    def __init__(self, stream, on_closed=None):
        self.stream = stream
        self.on_closed = on_closed
        self.closed = False
        self._lock = threading.Lock()
        self.last_event: str | None = None

    def __call__(self, event: dict) -> None:
        line = encode_event(event)
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ConnectionResetError, OSError, ValueError):
                self._reader_gone()
                return
            self.last_event = event.get("event")

    def _reader_gone(self) -> None:
        self.closed = True
        log.warning("the event reader closed stdout: stopping as if cancelled")
        try:  # later flushes (also at exit) go nowhere instead of raising again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        if self.on_closed is not None:
            self.on_closed()


# ---- errors --------------------------------------------------------------------------------------------------------

def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or "out of memory" in text.lower()


def error_event(exc: BaseException) -> tuple[dict, int]:
    """Map an exception to (error event, exit code)."""
    from .errors import DRGSInputError

    if isinstance(exc, DRGSInputError):
        return {"event": "error", "kind": "input", "message": str(exc)}, EXIT_INPUT
    missing = missing_dependency(exc)
    if missing:
        return {"event": "error", "kind": "input", "message": missing_dependency_message(missing)}, EXIT_INPUT
    if _is_out_of_memory(exc):
        message = ("Out of memory: " + (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                   + ". What to do: use fewer training views, a smaller volume grid, the 'fast' schedule, "
                     "or another device (a GPU with more memory, or the CPU).")
        return ({"event": "error", "kind": "resources", "message": message,
                 "traceback": traceback.format_exc()}, EXIT_INPUT)
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ({"event": "error", "kind": "internal", "message": message,
             "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}, EXIT_INTERNAL)


def missing_dependency(exc: BaseException) -> str | None:
    """The top-level name of a third-party package the engine could not import, or None.

    A missing ``drgs_core`` module is a broken installation (internal), not a missing dependency.
    """
    if not isinstance(exc, ImportError) or not getattr(exc, "name", None):
        return None
    top = exc.name.split(".")[0]
    return None if top == "drgs_core" else top


def missing_dependency_message(package: str) -> str:
    """What the user reads when this interpreter lacks an engine dependency (e.g. torch on a build machine)."""
    return (f"The reconstruction engine needs the Python package '{package}', which is not installed in "
            f"{sys.executable} (Python {sys.version.split()[0]}). What to do: in 3D Slicer press Reconstruct once "
            "and accept the installation (PyTorch comes through the PyTorch extension), or choose an external "
            "Python environment where 'pip install drgs4d' (or 'pip install -e <DRGS4D source>') was run.")


# ---- the job -------------------------------------------------------------------------------------------------------

def read_request(path: str) -> dict:
    """Load REQUEST.json; problems are DRGSInputError so that the panel shows them as readable messages."""
    from .errors import DRGSInputError

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DRGSInputError("the worker request file does not exist", path, "a JSON file",
                             "start the worker with --config pointing at an existing file") from None
    except OSError as exc:  # a folder, no permission, ...
        raise DRGSInputError("the worker request file cannot be read", f"{path}: {exc.strerror or exc}",
                             "a readable JSON file", "start the worker with --config pointing at a JSON file"
                             ) from None
    except ValueError as exc:
        raise DRGSInputError("the worker request file is not valid JSON", f"{path}: {exc}",
                             "a JSON object with the ReconstructConfig fields") from None
    if not isinstance(data, dict):
        raise DRGSInputError("the worker request file is not a JSON object", type(data).__name__,
                             "a JSON object with the ReconstructConfig fields")
    return data


def run(request: dict, emit, should_stop) -> int:
    """Run one reconstruction; every outcome is reported through ``emit``. Returns the exit code.

    The engine reports its own ``done`` or ``cancelled`` event (a stop before training has ``"checkpoint": null``:
    the run saved nothing to resume from); everything it raises becomes an ``error`` event here.
    """
    seen = {"terminal": None}

    def on_event(event: dict) -> None:
        if event.get("event") in ("done", "cancelled"):
            seen["terminal"] = event["event"]
        emit(event)

    try:
        from . import pipeline

        config = pipeline.ReconstructConfig.from_dict(request)
        result = pipeline.run_reconstruction(config, on_event=on_event, should_stop=should_stop)
    except KeyboardInterrupt:
        if seen["terminal"] is None:
            emit({"event": "cancelled", "checkpoint": None})
        return EXIT_CANCELLED
    except BaseException as exc:  # noqa: BLE001 - everything becomes an error event
        if isinstance(exc, SystemExit):
            raise
        event, code = error_event(exc)
        log.error("%s", event["message"])
        if event.get("traceback"):
            log.debug("%s", event["traceback"])
        emit(event)
        return code
    return EXIT_CANCELLED if result["status"] == "cancelled" else EXIT_DONE


# ---- utility commands ----------------------------------------------------------------------------------------------

def _engine_version() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def version_event() -> dict:
    return {"event": "version", "drgs_core": _engine_version(), "python": sys.version.split()[0],
            "executable": sys.executable}


# Rough training speed on a paper-scale case (512^2 detector, 256^3 grid; bench/RESULTS.md): the CUDA kernels on one
# recent data-centre GPU, and the PyTorch reference path on a GPU, 55-80x slower.  Only an order of magnitude.
EXPECTED_IT_PER_S = {"cuda-ext": 540.0, "triton": 525.0, "torch-gpu": 10.0}
FAST_ITERATIONS = 10000


def expected_speed(backend: str, device_type: str) -> dict:
    """``{"it_per_s", "fast_run_s"}`` for a backend on a device type; None values when no figure exists (CPU)."""
    key = backend if backend in EXPECTED_IT_PER_S else ("torch-gpu" if device_type == "cuda" else None)
    rate = EXPECTED_IT_PER_S.get(key) if key else None
    return {"it_per_s": rate, "fast_run_s": None if rate is None else round(FAST_ITERATIONS / rate + 15.0)}


def probe_event() -> dict:
    """What this interpreter can run: torch version, CUDA devices, the render backend ``device="auto"`` would use
    (``drgs_core.render.active_backend``) and a rough time for a ``fast`` run.  Imports torch: takes a moment."""
    event = version_event()
    event["event"] = "probe"
    event.update(torch=None, cuda=[], problem=None, backend=None, backend_device=None, it_per_s=None,
                 fast_run_s=None)
    try:
        import torch

        event["torch"] = torch.__version__
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                event["cuda"].append({"index": i, "name": props.name,
                                      "memory_gb": round(props.total_memory / 2**30, 1)})
        from .render import active_backend

        device = "cuda:0" if event["cuda"] else "cpu"
        event["backend"] = active_backend(device)
        event["backend_device"] = device
        event.update(expected_speed(event["backend"], device.split(":")[0]))
    except Exception as exc:  # noqa: BLE001
        missing = missing_dependency(exc)
        event["problem"] = missing_dependency_message(missing) if missing else f"{type(exc).__name__}: {exc}"
    return event


def summarize_case(case) -> dict:
    """Facts about a loaded drgs_core.io.Case for display (units in the keys)."""
    import numpy as np

    geo, grid = case.geometry, case.grid
    prim = np.degrees(np.asarray(geo.primary_angles, dtype=float))
    sec = np.degrees(np.asarray(geo.secondary_angles, dtype=float))
    return {
        "name": getattr(case, "name", "case"),
        "source": os.fspath(case.source) if getattr(case, "source", None) is not None else None,
        "n_frames": int(case.n_frames),
        "detector_shape": [int(geo.height), int(geo.width)],
        "detector_spacing_mm": [float(s) for s in geo.detector_spacing],
        "primary_deg": [float(prim.min()), float(prim.max())] if prim.size else [0.0, 0.0],
        "angle_span_deg": float(prim.max() - prim.min()) if prim.size else 0.0,
        "secondary_deg": [float(sec.min()), float(sec.max())] if sec.size else [0.0, 0.0],
        "sad_mm": float(geo.sad),
        "sid_mm": float(geo.sid),
        "volume_resolution": [int(r) for r in grid.resolution],
        "volume_spacing_mm": [float(s) for s in grid.spacing],
        "volume_size_mm": [float(p) for p in grid.physical_size],
        "has_runs": getattr(case, "fill", None) is not None,
        "dsa_max": float(np.max(case.dsa)) if case.dsa.size else 0.0,
    }


def load_case_for_request(request: dict):
    """Read the case a request points at exactly as a run would (pipeline.load_case: detector binning and the
    secondary-angle setting included); the request's values are validated like a run's."""
    from . import pipeline

    values = dict(request)
    if values.get("out") is None:
        values["out"] = "."  # describing reads inputs only; no output folder is used
    return pipeline.load_case(pipeline.ReconstructConfig.from_dict(values))


def describe(request: dict) -> tuple[dict, int]:
    try:
        return {"event": "described", "case": summarize_case(load_case_for_request(request))}, EXIT_DONE
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return error_event(exc)


def list_dicom(paths: list[str]) -> tuple[dict, int]:
    """A 'dicom_runs' event: the rotational XA runs and mask/fill pairs under `paths` (drgs_core.io.dicom.listing)."""
    try:
        from .io.dicom import listing

        return {"event": "dicom_runs", **listing(paths)}, EXIT_DONE
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return error_event(exc)


def make_phantom(folder: str, options_json: str | None) -> tuple[dict, int]:
    """Write a demo phantom case folder (``preset("demo", **options)``); a ``phantom`` event names it."""
    try:
        from .phantom import make_phantom as build, preset, write_phantom

        options = {k: tuple(v) if isinstance(v, list) else v  # JSON lists back to the tuples the config holds
                   for k, v in (json.loads(options_json) if options_json else {}).items()}
        if not os.path.isfile(os.path.join(folder, "transforms.json")):
            write_phantom(build(preset("demo", **options)), folder)
        return {"event": "phantom", "case": os.fspath(folder)}, EXIT_DONE
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return error_event(exc)


# ---- process plumbing ----------------------------------------------------------------------------------------------

def hello_event() -> dict:
    """First event of a run: the pid of this interpreter, which a front end signals on cancel (under a launcher such
    as PythonSlicer the process it started is the launcher, not this one)."""
    return {"event": "worker", "pid": os.getpid(), "python": sys.version.split()[0]}


def _protocol_stream():
    """Keep the real stdout for events only; send fd 1 (stray prints, C libraries) to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", newline="\n")


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum, _frame):
        if not stop.is_set():
            log.warning("received signal %s: stopping after the next checkpoint", signum)
        stop.set()

    names = ["SIGTERM", "SIGINT", "SIGBREAK", "SIGHUP"]
    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread / not allowed here
                pass


def _new_session() -> None:
    if not hasattr(os, "setsid"):
        return  # Windows: the caller uses CREATE_NEW_PROCESS_GROUP
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
    except OSError as exc:  # already a process-group leader (started with start_new_session / setpgid)
        log.debug("setsid: %s", exc)


def _watch_stdin(stop: threading.Event) -> None:
    def loop():
        try:
            for line in sys.stdin:
                if line.strip().lower() in ("cancel", "stop"):
                    log.warning("cancel requested on stdin")
                    stop.set()
        except (OSError, ValueError):
            pass
        if not stop.is_set():
            log.warning("stdin closed (the panel went away): stopping")
        stop.set()

    threading.Thread(target=loop, name="drgs-stdin-watch", daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drgs_core.worker",
                                     description="DRGS4D reconstruction worker (JSON-lines events on stdout)")
    parser.add_argument("--config", help="REQUEST.json: the ReconstructConfig as a JSON object")
    parser.add_argument("--describe", metavar="REQUEST", help="print a 'described' event for the request's inputs")
    parser.add_argument("--version", action="store_true", help="print a 'version' event and exit")
    parser.add_argument("--probe", action="store_true", help="print a 'probe' event (torch, CUDA devices) and exit")
    parser.add_argument("--list-dicom", nargs="+", metavar="PATH",
                        help="print a 'dicom_runs' event: the XA runs and mask/fill pairs in these folders / files "
                             "(a .txt file lists paths)")
    parser.add_argument("--make-phantom", metavar="FOLDER", help="write the demo phantom case into FOLDER")
    parser.add_argument("--phantom-options", metavar="JSON", help="keyword arguments of phantom.preset('demo', ...)")
    parser.add_argument("--watch-stdin", action="store_true",
                        help="stop when stdin says 'cancel' or closes (used by the Slicer panel)")
    parser.add_argument("--new-session", action="store_true",
                        help="become the leader of a new session / process group (POSIX), for front ends that "
                             "cannot start it that way themselves; the whole tree can then be stopped at once")
    parser.add_argument("--log-level", default=os.environ.get("DRGS4D_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if args.new_session:
        _new_session()

    stream = _protocol_stream()
    emit = EventWriter(stream)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.version:
        emit(version_event())
        return EXIT_DONE
    if args.probe:
        emit(probe_event())
        return EXIT_DONE
    if args.list_dicom:
        event, code = list_dicom(args.list_dicom)
        emit(event)
        return code
    if args.make_phantom:
        event, code = make_phantom(args.make_phantom, args.phantom_options)
        emit(event)
        return code
    if args.describe:
        try:
            request = read_request(args.describe)
        except Exception as exc:  # noqa: BLE001
            event, code = error_event(exc)
            emit(event)
            return code
        event, code = describe(request)
        emit(event)
        return code
    if not args.config:
        emit({"event": "error", "kind": "input", "message": "no request given: start the worker with --config FILE"})
        return EXIT_INPUT

    stop = threading.Event()
    emit.on_closed = stop.set
    _install_stop_handlers(stop)
    if args.watch_stdin:
        _watch_stdin(stop)
    emit(hello_event())
    try:
        request = read_request(args.config)
    except Exception as exc:  # noqa: BLE001
        event, code = error_event(exc)
        emit(event)
        return code
    log.info("worker pid %d, protocol %d, drgs_core %s", os.getpid(), PROTOCOL_VERSION, _engine_version())
    code = run(request, emit, stop.is_set)
    try:
        stream.flush()
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
