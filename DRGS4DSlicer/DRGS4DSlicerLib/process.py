"""Start, watch and stop the reconstruction worker process (no Qt: the panel polls ``poll_events`` from a QTimer).

The worker runs ``python -m drgs_core.worker --config REQUEST.json --watch-stdin`` either with Slicer's own Python
(PythonSlicer) or with an external interpreter chosen by the user.  It is started in a new session (POSIX) / process
group (Windows) so that the whole process tree can be stopped.

Cancel works through a launcher too: Slicer's ``PythonSlicer`` is a launcher that runs the real interpreter as a child
and installs no signal handlers, so a signal to it (or to its group) ends it at once.  Cancel therefore (1) writes the
line ``cancel`` on the worker's stdin (inherited through a launcher), (2) on POSIX sends SIGTERM to the interpreter
only, whose pid the worker reports in its first event (``worker``), never to the launcher; (3) the run is over only
when the pipes close or the worker reports ``cancelled`` / ``error``; (4) after the grace period the whole group is
killed, and a final sweep of the group leaves nothing behind.
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
        self._signalled = False
        self._leader_gone_at: float | None = None
        self.interpreter_pid: int | None = None  # from the worker's "worker" event
        self.pgid: int | None = None

    # -- start --
    def start(self) -> "WorkerProcess":
        if self.proc is not None:
            raise RuntimeError(protocol.tr("worker already started"))
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
            if event["event"] == "worker" and isinstance(event.get("pid"), int):
                self.interpreter_pid = event["pid"]
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

    def pipes_closed(self) -> bool:
        """True when both reader threads have seen end of file: nothing of the process tree holds the pipes."""
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    def poll_events(self, max_events: int | None = None) -> list[dict]:
        """Everything that arrived since the last call (never blocks)."""
        if self._cancel_deadline is not None and not self._killed:
            self._signal_interpreter()  # the pid may have arrived since request_cancel
            if not self.pipes_closed() and time.monotonic() >= self._cancel_deadline:
                log.warning("worker did not stop within the grace period: killing its process tree")
                self.kill()
        out = []
        while max_events is None or len(out) < max_events:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        exited = self.proc is not None and self.proc.poll() is not None
        if exited and not self._reaped and not self.pipes_closed() and self._leftovers_may_go():
            # the process we started is gone and the worker is done (or silent too long), but something still
            # holds its pipes open: stop the rest of its tree
            self._reaped = True
            self._reap_group()
        if (max_events is None or len(out) < max_events) and not self._exit_reported and exited \
                and self.pipes_closed():
            # the process is gone and both pipes are drained: drain once more, then report the exit
            while True:
                try:
                    out.append(self.events.get_nowait())
                except queue.Empty:
                    break
            out.extend(self._exit_events())
        return out

    def _leftovers_may_go(self, orphan_grace_s: float = 10.0) -> bool:
        """After the started process exited with the pipes still open: may the rest of the group be killed now?

        Yes once the worker reported its end (``done``/``cancelled``/``error``).  Otherwise an interpreter may still be
        running under a launcher that died: wait for the cancel grace period if one runs, else ``orphan_grace_s``.
        """
        if self.terminal_event is not None:
            return True
        now = time.monotonic()
        if self._leader_gone_at is None:
            self._leader_gone_at = now
        if self._cancel_deadline is not None:
            return now >= self._cancel_deadline
        return now - self._leader_gone_at >= orphan_grace_s

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
                if tail:
                    message = protocol.tr("The reconstruction process stopped unexpectedly (exit code {code}). Last "
                                          "messages:\n{messages}", code=self.returncode, messages=tail)
                else:
                    message = protocol.tr("The reconstruction process stopped unexpectedly (exit code {code}).",
                                          code=self.returncode)
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

    def _kill_group(self) -> bool:
        """Kill the worker's whole process tree: SIGKILL to its process group (POSIX), taskkill /T (Windows)."""
        if self.proc is None:
            return False
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True)
            return True
        try:
            os.killpg(self.pgid if self.pgid is not None else self.proc.pid, signal.SIGKILL)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def request_cancel(self, grace_s: float = 30.0) -> None:
        """Ask the worker to stop (non-blocking): it checkpoints and reports ``cancelled``.

        First the line ``cancel`` on its stdin, then (POSIX) SIGTERM to the interpreter - never to a launcher, which
        would die at once.  If the pipes are still open ``grace_s`` seconds later, ``poll_events`` kills the tree.
        """
        if self.proc is None or self.pipes_closed():
            return
        if self._cancel_deadline is None:
            self._cancel_deadline = time.monotonic() + grace_s
        if self.watch_stdin:
            try:
                self.proc.stdin.write(b"cancel\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass
        self._signal_interpreter()

    def _signal_interpreter(self) -> None:
        """SIGTERM once to the worker's interpreter (POSIX), as soon as its pid is known.  On Windows CTRL_BREAK
        would reach the whole console group, launcher included, so the stdin line is the only request there."""
        if self._signalled or IS_WINDOWS or self.interpreter_pid is None:
            return
        self._signalled = True
        try:
            os.kill(self.interpreter_pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """Kill the whole process tree now."""
        self._killed = True
        self._kill_group()

    def _reap_group(self) -> None:
        """After the leader exited, make sure no member of its process group survives."""
        if IS_WINDOWS or self.pgid is None:
            return
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, timeout: float = 30.0) -> int | None:
        """Stop the worker and wait: cancel request, then kill after ``timeout`` s; no process of the tree remains."""
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
        self._close_pipes()
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


class WorkerCommand:
    """A short worker command (``--probe``, ``--describe FILE``, ``--list-dicom``, ``--make-phantom``) running in the
    background: the panel's one path for starting the worker outside a reconstruction.

    ``poll()`` never blocks: None while it runs, then its answer - the first protocol event it printed, or an
    ``error`` event saying why there was none (interpreter missing, engine missing, crash, timeout).
    ``timeout_message``: the text of the timeout error (default: which command took too long).
    """

    def __init__(self, args: list[str], python: str | None = None, external: bool = False, timeout: float = 300.0,
                 engine: Path | None = None, cwd: str | None = None, timeout_message: str | None = None):
        engine = engine if engine is not None else engine_root()
        command = build_worker_command(python if external else None, args)
        self.args = list(args)
        self.timeout = timeout
        self.timeout_message = timeout_message
        self.result: dict | None = None
        self._answer: dict | None = None
        self._deadline = time.monotonic() + timeout
        try:
            self.worker: WorkerProcess | None = WorkerProcess(
                command, env=worker_environment(external=external, engine=engine), cwd=cwd, watch_stdin=False).start()
        except (FileNotFoundError, PermissionError):
            self.worker = None
            self.result = {"event": "error", "kind": "input", "message": protocol.tr(
                "The Python interpreter '{python}' was not found or cannot be run. Choose an existing python "
                "executable or use Slicer's own Python.", python=command[0])}

    def poll(self) -> dict | None:
        if self.result is not None:
            return self.result
        for event in self.worker.poll_events():
            if self._answer is None and event.get("event") not in ("log", "output", "exit", "worker"):
                self._answer = event
        if not self.worker.finished() and time.monotonic() > self._deadline:
            self.worker.kill()  # the whole group, at once; the pipes close by themselves
            self.result = {"event": "error", "kind": "internal", "message": self.timeout_message or protocol.tr(
                "'{command}' took more than {seconds} s and was stopped.", command=" ".join(self.args),
                seconds=f"{self.timeout:.0f}")}
        elif self.worker.finished():
            self.result = self._answer if self._answer is not None and self._answer.get("kind") != "crashed" \
                else self._no_answer()
        return self.result

    def cancel(self) -> None:
        """Stop it now (a probe or a description has nothing to save)."""
        if self.worker is not None and not self.worker.finished():
            self.worker.kill()
            self.worker.wait(5.0)
            self.worker.poll_events()
        if self.result is None:
            self.result = {"event": "error", "kind": "internal", "message": protocol.tr("Cancelled.")}

    def _no_answer(self) -> dict:
        tail = list(self.worker.stderr_tail)[-10:]
        if any("No module named" in t and "drgs_core" in t for t in tail):
            text = ("The worker gave no answer (exit code {code}). The drgs_core engine is not installed in this "
                    "Python: install it there (pip install -e <DRGS4D source folder>) or use Slicer's own Python."
                    "\n{messages}")
        elif any("No module named" in t for t in tail):
            text = ("The worker gave no answer (exit code {code}). A Python package the engine needs is missing in "
                    "this interpreter.\n{messages}")
        else:
            text = "The worker gave no answer (exit code {code}).\n{messages}"
        return {"event": "error", "kind": "internal",
                "message": protocol.tr(text, code=self.worker.returncode, messages="\n".join(tail))}


def run_worker_command(args: list[str], python: str | None = None, external: bool = False,
                       timeout: float = 120.0, engine: Path | None = None, cwd: str | None = None) -> dict:
    """Blocking form of ``WorkerCommand`` (scripts and tests; the panel polls a WorkerCommand from its timer)."""
    command = WorkerCommand(args, python=python, external=external, timeout=timeout, engine=engine, cwd=cwd)
    while command.poll() is None:
        time.sleep(0.02)
    return command.result
