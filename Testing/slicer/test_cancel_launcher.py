"""Cancel through a launcher, as with Slicer's PythonSlicer: a program that runs the real interpreter as its child,
installs no signal handlers (a SIGTERM ends it at once) and leaves stdin/stdout/stderr to the child.

The panel must ask the worker itself (``cancel`` on stdin, SIGTERM to the interpreter's pid from its ``worker``
event), wait until the pipes close or the worker says ``cancelled``, and kill the tree only after the grace period.
Small scripts test the process control quickly; one scenario runs the real engine under the launcher: cancel during
training gives ``cancelled`` with a checkpoint at the current iteration, and a resume continues from it."""

import json
import os
import signal
import stat
import sys
import textwrap
import time

import pytest

from procutil import group_members, pid_alive
from DRGS4DSlicerLib import process, selftest

IS_POSIX = os.name == "posix"
pytestmark = pytest.mark.skipif(not IS_POSIX, reason="the launcher stand-in is a POSIX executable script")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """An executable like PythonSlicer: runs this Python with the given arguments as a child and returns its code."""
    path = tmp_path_factory.mktemp("launcher") / "PythonLauncher"
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys
        sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# A worker stand-in: says which pid it has, then waits for a stop request (stdin line or SIGTERM, as chosen),
# takes a moment to "write its checkpoint" and reports cancelled with how it was asked.
CHILD = """
import json, os, signal, sys, threading, time
how = []
stop = threading.Event()
def on_term(signum, frame):
    how.append("signal"); stop.set()
signal.signal(signal.SIGTERM, on_term)
def watch():
    for line in sys.stdin:
        if line.strip() == "cancel" and READ_STDIN:
            how.append("stdin"); stop.set()
threading.Thread(target=watch, daemon=True).start()
print(json.dumps({"protocol": 1, "event": "worker", "pid": os.getpid()}), flush=True)
while not stop.wait(0.05):
    pass
time.sleep(0.8)
print(json.dumps({"protocol": 1, "event": "cancelled", "checkpoint": "ckpt-" + "+".join(sorted(set(how))),
                  "iteration": 7}), flush=True)
sys.exit(3)
"""


def _start(tmp_path, launcher, read_stdin):
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("READ_STDIN", str(bool(read_stdin))))
    command = [launcher, "-u", str(script)] if launcher else [sys.executable, "-u", str(script)]
    worker = process.WorkerProcess(command, cwd=str(tmp_path), watch_stdin=True).start()
    deadline = time.time() + 30
    while worker.interpreter_pid is None:
        assert time.time() < deadline, "the stand-in never said its pid"
        time.sleep(0.01)
    return worker


def _until_exit(worker, timeout=30):
    events, deadline = [], time.time() + timeout
    while not worker.finished():
        events += worker.poll_events()
        assert time.time() < deadline, events
        time.sleep(0.02)
    return events


@pytest.mark.parametrize("read_stdin", [True, False], ids=["stdin", "signal-only"])
@pytest.mark.parametrize("through_launcher", [True, False], ids=["launcher", "direct"])
def test_cancel_reaches_the_interpreter_and_waits_for_its_answer(tmp_path, launcher, read_stdin, through_launcher):
    worker = _start(tmp_path, launcher if through_launcher else None, read_stdin)
    interpreter = worker.interpreter_pid
    assert (interpreter != worker.pid) == through_launcher
    worker.request_cancel(grace_s=20)
    events = _until_exit(worker)
    cancelled = [e for e in events if e["event"] == "cancelled"]
    assert len(cancelled) == 1 and not cancelled[0].get("forced"), events
    # the stdin line comes first and always arrives; SIGTERM to the interpreter follows (and is what a worker
    # that does not read stdin gets)
    assert cancelled[0]["checkpoint"] in (("ckpt-signal+stdin", "ckpt-stdin") if read_stdin else ("ckpt-signal",))
    assert events[-1] == {"event": "exit", "returncode": 3}
    assert not pid_alive(interpreter) and not group_members(worker.pgid)


def test_a_killed_launcher_does_not_end_the_run_before_the_worker_answers(tmp_path, launcher):
    """The launcher dies (e.g. a signal meant for someone else) while its child is still checkpointing: the panel waits
    for the pipes to close instead of killing the interpreter at once."""
    worker = _start(tmp_path, launcher, read_stdin=True)
    worker.request_cancel(grace_s=20)
    os.kill(worker.pid, signal.SIGKILL)
    events = _until_exit(worker)
    assert [e["checkpoint"] for e in events if e["event"] == "cancelled"] == ["ckpt-signal+stdin"] or \
        [e["checkpoint"] for e in events if e["event"] == "cancelled"] == ["ckpt-stdin"], events


def test_after_the_grace_period_the_tree_is_killed(tmp_path, launcher):
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent("""
        import json, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"protocol": 1, "event": "worker", "pid": os.getpid()}), flush=True)
        while True:
            time.sleep(0.1)
        """))
    worker = process.WorkerProcess([launcher, "-u", str(script)], cwd=str(tmp_path), watch_stdin=True).start()
    deadline = time.time() + 30
    while worker.interpreter_pid is None:
        assert time.time() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    worker.request_cancel(grace_s=1.0)
    events = _until_exit(worker)
    assert time.monotonic() - start >= 1.0
    assert {"event": "cancelled", "checkpoint": None, "forced": True} in events
    assert not pid_alive(worker.interpreter_pid) and not group_members(worker.pgid)


# ---- the real engine under the launcher --------------------------------------------------------------------------

def _checkpoint_iteration(path) -> int:
    torch = pytest.importorskip("torch")
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["iteration"]


def test_real_worker_cancel_under_the_launcher_checkpoints_and_resumes(tiny_case, tmp_path, launcher, worker_env):
    pytest.importorskip("torch")
    out = tmp_path / "run"
    request = selftest.tiny_request(tiny_case, str(out), iterations=12, snapshot_every=0, checkpoint_every=1000)
    config = tmp_path / "request.json"
    config.write_text(json.dumps(request))

    def start(config_path):
        env = process.worker_environment(external=True, engine=process.engine_root(), startup=dict(os.environ))
        env.update(worker_env)
        command = [launcher, "-u", "-m", "drgs_core.worker", "--config", str(config_path), "--watch-stdin"]
        return process.WorkerProcess(command, env=env, cwd=str(tmp_path), watch_stdin=True).start()

    first = start(config)
    events, deadline = [], time.time() + 300
    while not any(e["event"] == "progress" and e.get("stage") == "train" and e["iteration"] >= 3 for e in events):
        events += first.poll_events()
        assert not first.finished() and time.time() < deadline, events[-5:]
        time.sleep(0.01)
    first.request_cancel(grace_s=120)
    events += _until_exit(first, timeout=200)
    cancelled = [e for e in events if e["event"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["checkpoint"], [e for e in events if e["event"] != "log"][-5:]
    last_trained = max(e["iteration"] for e in events if e["event"] == "progress" and e.get("stage") == "train")
    assert cancelled[0]["iteration"] == last_trained == _checkpoint_iteration(cancelled[0]["checkpoint"])
    assert last_trained < 12 and first.returncode == 3
    assert not group_members(first.pgid)

    resume = tmp_path / "resume.json"
    resume.write_text(json.dumps(dict(request, resume=True)))
    second = start(resume)
    events2 = _until_exit(second, timeout=300)
    trained = [e["iteration"] for e in events2 if e["event"] == "progress" and e.get("stage") == "train"]
    assert trained == list(range(last_trained + 1, 13))
    assert events2[-2]["event"] == "done" and second.returncode == 0
