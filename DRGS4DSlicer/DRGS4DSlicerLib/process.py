"""Start, watch and stop the reconstruction worker process (no Qt: the panel polls ``poll_events`` from a QTimer).

The worker runs ``python -m drgs_core.worker --config REQUEST.json --watch-stdin`` either with Slicer's own Python
(PythonSlicer) or with an external interpreter chosen by the user.  It is started in a new session (POSIX) / process
group (Windows) so that cancel can stop the whole process tree: SIGTERM to the group first (the worker checkpoints and
reports ``cancelled``), SIGKILL after a grace period, and a final sweep of the group so that nothing is left behind.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import protocol

log = logging.getLogger("DRGS4D.process")

IS_WINDOWS = os.name == "nt"

# Environment variables that tie an interpreter to Slicer's own Python; a foreign interpreter must not see them.
PYTHON_ENV_VARS = ("PYTHONHOME", "PYTHONPATH", "PYTHONEXECUTABLE", "PYTHONNOUSERSITE", "PYTHONSTARTUP",
                   "PYTHONSAFEPATH", "PYTHONPLATLIBDIR", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
# Path-list variables the Slicer launcher extends with its own folders.
PATH_LIST_VARS = ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH", "QT_PLUGIN_PATH")
# Variables the Slicer launcher sets that mean nothing (or harm) in another program.
SLICER_ONLY_VARS = ("SLICER_HOME", "SLICER_REVISION", "QT_PLUGIN_PATH", "QTWEBENGINEPROCESS_PATH",
                    "SSL_CERT_FILE", "ITK_AUTOLOAD_PATH", "TCL_LIBRARY", "TK_LIBRARY", "TIX_LIBRARY")


# ---- locating the engine and the interpreter ---------------------------------------------------------------------

def engine_root() -> Path | None:
    """The folder that contains the ``drgs_core`` package the panel should run, if one can be found.

    Order: the ``drgs_core`` importable here (pip install, or bundled with the extension), else the source checkout
    this module sits in (``<repo>/DRGS4DSlicer/DRGS4DSlicerLib/process.py`` -> ``<repo>``).
    """
    spec = importlib.util.find_spec("drgs_core")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    here = Path(__file__).resolve()
    for parent in list(here.parents)[1:4]:
        if (parent / "drgs_core" / "__init__.py").is_file():
            return parent
    return None


def ensure_engine_importable() -> bool:
    """Make ``import drgs_core`` work in this interpreter (a source checkout added as a module path); True if it does."""
    if importlib.util.find_spec("drgs_core") is not None:
        return True
    root = engine_root()
    if root is None:
        return False
    if str(root) not in sys.path:
        sys.path.append(str(root))
    importlib.invalidate_caches()
    return importlib.util.find_spec("drgs_core") is not None


def _slicer_app():
    try:
        import slicer  # noqa: F401

        return getattr(slicer, "app", None)
    except ImportError:  # pragma: no cover
        return None


def slicer_python_executable() -> str:
    """Slicer's own interpreter (PythonSlicer) when running inside Slicer, else the current interpreter."""
    if _slicer_app() is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if IS_WINDOWS else ""))
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def slicer_startup_environment() -> dict[str, str] | None:
    """The environment Slicer was started with (before its launcher added anything), if available."""
    app = _slicer_app()
    if app is None:
        return None
    try:
        import slicer

        return dict(slicer.util.startupEnvironment())
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read Slicer's startup environment: %s", exc)
        return None


def _strip_path_list(value: str, prefixes: list[str]) -> str:
    keep = []
    for entry in value.split(os.pathsep):
        if not entry:
            continue
        norm = os.path.normcase(os.path.abspath(entry))
        if any(norm == p or norm.startswith(p + os.sep) for p in prefixes):
            continue
        keep.append(entry)
    return os.pathsep.join(keep)


def external_python_environment(current: dict[str, str], startup: dict[str, str] | None = None,
                                slicer_home: str | None = None) -> dict[str, str]:
    """Environment for a foreign Python interpreter launched from inside Slicer.

    With ``startup`` (Slicer's startup environment) the user's own values are restored as they were before Slicer
    started - including their own PYTHONPATH if they had one.  Without it, the current environment is cleaned:
    Python variables are removed and entries under ``slicer_home`` are dropped from path lists.
    """
    if startup is not None:
        env = dict(startup)
        for name in ("PYTHONHOME", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__"):
            env.pop(name, None)  # these would point any interpreter at the wrong standard library
        return env
    env = dict(current)
    for name in PYTHON_ENV_VARS:
        env.pop(name, None)
    for name in SLICER_ONLY_VARS:
        env.pop(name, None)
    if slicer_home:
        prefixes = [os.path.normcase(os.path.abspath(slicer_home))]
        for name in PATH_LIST_VARS:
            if name in env:
                stripped = _strip_path_list(env[name], prefixes)
                if stripped:
                    env[name] = stripped
                else:
                    env.pop(name)
    return env


def _prepend_path(env: dict[str, str], name: str, entry: str) -> None:
    old = env.get(name)
    parts = [entry] + ([p for p in old.split(os.pathsep) if p and p != entry] if old else [])
    env[name] = os.pathsep.join(parts)


def worker_environment(external: bool, engine: Path | None = None, current: dict[str, str] | None = None,
                       startup: dict[str, str] | None = None, slicer_home: str | None = None) -> dict[str, str]:
    """The complete environment for the worker process."""
    current = dict(os.environ if current is None else current)
    if external:
        if startup is None:
            startup = slicer_startup_environment()
        if slicer_home is None:
            slicer_home = current.get("SLICER_HOME")
        env = external_python_environment(current, startup, slicer_home)
    else:
        env = current
    if engine is not None:
        _prepend_path(env, "PYTHONPATH", str(engine))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def build_worker_command(python: str | None, args: list[str]) -> list[str]:
    """``[python, "-m", "drgs_core.worker", *args]``; ``python=None`` means Slicer's own interpreter."""
    exe = python or slicer_python_executable()
    return [str(exe), "-u", "-m", "drgs_core.worker", *args]


# ---- the process ---------------------------------------------------------------------------------------------------

class WorkerProcess:
    """One running worker.  Thread-safe event queue; the owner calls ``poll_events()`` regularly.

    Events returned by ``poll_events`` are the protocol events of the worker plus these, made here:
    ``{"event": "output", "line"}`` (stdout noise), ``{"event": "log", "line"}`` (a stderr line),
    ``{"event": "error", "kind": "protocol"|"crashed", ...}`` and finally ``{"event": "exit", "returncode"}``.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 watch_stdin: bool = True, log_lines: int = 400):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.watch_stdin = watch_stdin
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.terminal_event: dict | None = None
        self.returncode: int | None = None
        self._threads: list[threading.Thread] = []
        self._exit_reported = False
        self._cancel_deadline: float | None = None
        self._killed = False
        self._reaped = False
        self.pgid: int | None = None

    # -- start --
    def start(self) -> "WorkerProcess":
        if self.proc is not None:
            raise RuntimeError("worker already started")
        kwargs = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                      cwd=self.cwd, bufsize=0)
        if IS_WINDOWS:
            kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True
        log.info("starting worker: %s", " ".join(self.command))
        self.proc = subprocess.Popen(self.command, **kwargs)
        if not IS_WINDOWS:
            try:
                self.pgid = os.getpgid(self.proc.pid)
            except ProcessLookupError:  # exited already
                self.pgid = self.proc.pid
        if not self.watch_stdin:
            self._close_stdin()
        for target, name in ((self._read_stdout, "drgs-stdout"), (self._read_stderr, "drgs-stderr")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    # -- reader threads --
    @staticmethod
    def _read_lines(stream, on_line) -> None:
        """Call on_line for every complete line of a pipe until it closes, then for a last partial line."""
        buf = protocol.LineBuffer()
        try:
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                for line in buf.feed(chunk):
                    on_line(line)
        except (OSError, ValueError):
            pass
        for line in buf.flush():
            on_line(line)

    def _read_stdout(self) -> None:
        self._read_lines(self.proc.stdout, self._handle_line)

    def _handle_line(self, line: str) -> None:
        parsed = protocol.parse_line(line)
        if parsed.kind == "event":
            event = parsed.event
            if event["event"] in protocol.TERMINAL_EVENTS and self.terminal_event is None:
                self.terminal_event = event
            self.events.put(event)
        elif parsed.kind == "invalid":
            log.warning("worker protocol problem: %s", parsed.problem)
            self.events.put({"event": "error", "kind": "protocol", "message": parsed.problem, "line": parsed.text,
                             "fatal": False})
        elif parsed.text:
            self.events.put({"event": "output", "line": parsed.text})

    def _read_stderr(self) -> None:
        self._read_lines(self.proc.stderr, self._handle_log_line)

    def _handle_log_line(self, line: str) -> None:
        self.stderr_tail.append(line)
        self.events.put({"event": "log", "line": line})

    # -- state --
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finished(self) -> bool:
        """True once the process has exited and its ``exit`` event has been handed out."""
        return self._exit_reported

    def poll_events(self, max_events: int | None = None) -> list[dict]:
        """Everything that arrived since the last call (never blocks)."""
        if self._cancel_deadline is not None and self.is_running() and time.monotonic() >= self._cancel_deadline:
            log.warning("worker did not stop within the grace period: killing its process tree")
            self.kill()
        out = []
        while max_events is None or len(out) < max_events:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        exited = self.proc is not None and self.proc.poll() is not None
        if exited and not self._reaped and any(t.is_alive() for t in self._threads):
            # the worker is gone but something it started still holds its pipes open: stop the rest of its tree
            self._reaped = True
            self._reap_group()
        if (max_events is None or len(out) < max_events) and not self._exit_reported and exited \
                and not any(t.is_alive() for t in self._threads):
            # the process is gone and both pipes are drained: drain once more, then report the exit
            while True:
                try:
                    out.append(self.events.get_nowait())
                except queue.Empty:
                    break
            out.extend(self._exit_events())
        return out

    def _exit_events(self) -> list[dict]:
        self._exit_reported = True
        self.returncode = self.proc.returncode
        self._reap_group()
        self._close_pipes()
        events = []
        if self.terminal_event is None:
            if self._killed or self._cancel_deadline is not None:
                events.append({"event": "cancelled", "checkpoint": None, "forced": True})
            else:
                tail = "\n".join(list(self.stderr_tail)[-15:])
                message = (f"The reconstruction process stopped unexpectedly (exit code {self.returncode})."
                           + (f" Last messages:\n{tail}" if tail else ""))
                events.append({"event": "error", "kind": "crashed", "message": message, "traceback": tail})
            self.terminal_event = events[-1]
        events.append({"event": "exit", "returncode": self.returncode})
        return events

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process exits and the pipes are drained (tests and shutdown only)."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.proc.returncode

    # -- stopping --
    def _close_stdin(self) -> None:
        try:
            if self.proc and self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def _close_pipes(self) -> None:
        self._close_stdin()
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                if stream and not stream.closed:
                    stream.close()
            except OSError:
                pass

    def _signal_group(self, sig) -> bool:
        """POSIX: send ``sig`` to the worker's process group.  Windows: SIGTERM -> CTRL_BREAK, else taskkill /T."""
        if self.proc is None:
            return False
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            if sig == signal.SIGTERM:
                try:
                    self.proc.send_signal(signal.CTRL_BREAK_EVENT)
                    return True
                except OSError:
                    return False
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True)
            return True
        try:
            os.killpg(self.pgid if self.pgid is not None else self.proc.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def request_cancel(self, grace_s: float = 30.0) -> None:
        """Ask the worker to stop (non-blocking): it checkpoints and reports ``cancelled``.

        If it is still running ``grace_s`` seconds later, the next ``poll_events`` kills the process tree.
        """
        if self.proc is None or not self.is_running():
            return
        if self._cancel_deadline is None:
            self._cancel_deadline = time.monotonic() + grace_s
        if self.watch_stdin:
            try:
                self.proc.stdin.write(b"cancel\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole process tree now."""
        self._killed = True
        self._signal_group(getattr(signal, "SIGKILL", None))

    def _reap_group(self) -> None:
        """After the leader exited, make sure no member of its process group survives."""
        if IS_WINDOWS or self.pgid is None:
            return
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, timeout: float = 30.0) -> int | None:
        """Stop the worker and wait: SIGTERM, then SIGKILL after ``timeout`` s; no process of the tree remains."""
        if self.proc is None:
            return None
        if self.is_running():
            self.request_cancel(timeout)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        for thread in self._threads:
            thread.join(5.0)
        self._reap_group()
        return self.proc.returncode

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
        except Exception:  # noqa: BLE001
            pass


def start_worker(config_path: str, python: str | None = None, external: bool = False, cwd: str | None = None,
                 engine: Path | None = None, extra_env: dict[str, str] | None = None) -> WorkerProcess:
    """Start ``drgs_core.worker`` on a request file with the right interpreter and environment."""
    engine = engine if engine is not None else engine_root()
    env = worker_environment(external=external, engine=engine)
    if extra_env:
        env.update(extra_env)
    command = build_worker_command(python if external else None, ["--config", str(config_path), "--watch-stdin"])
    return WorkerProcess(command, env=env, cwd=cwd, watch_stdin=True).start()


def run_worker_command(args: list[str], python: str | None = None, external: bool = False,
                       timeout: float = 120.0, engine: Path | None = None, cwd: str | None = None) -> dict:
    """Run a short worker command (``--version``, ``--probe``, ``--describe``) and return its single event.

    Never raises for worker-side problems: they come back as an ``error`` event.
    """
    engine = engine if engine is not None else engine_root()
    env = worker_environment(external=external, engine=engine)
    command = build_worker_command(python if external else None, args)
    kwargs = {"start_new_session": True} if not IS_WINDOWS else \
        {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout,
                              cwd=cwd, **kwargs)
    except FileNotFoundError:
        return {"event": "error", "kind": "input",
                "message": f"The Python interpreter '{command[0]}' was not found. Choose an existing python "
                           "executable or use Slicer's own Python."}
    except subprocess.TimeoutExpired:
        return {"event": "error", "kind": "internal", "message": f"'{' '.join(args)}' took more than {timeout:.0f} s"}
    for line in done.stdout.decode("utf-8", errors="replace").splitlines():
        parsed = protocol.parse_line(line)
        if parsed.kind == "event":
            return parsed.event
    tail = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[-10:]
    hint = ""
    if any("No module named" in t and "drgs_core" in t for t in tail):
        hint = (" The drgs_core engine is not installed in this Python: install it there (pip install -e "
                "<DRGS4D source folder>) or use Slicer's own Python.")
    elif any("No module named" in t for t in tail):
        hint = " A Python package the engine needs is missing in this interpreter."
    return {"event": "error", "kind": "internal",
            "message": f"The worker gave no answer (exit code {done.returncode}).{hint}\n" + "\n".join(tail)}
