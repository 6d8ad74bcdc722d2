"""WorkerProcess: reading events from a real subprocess, crash detection, cancel without orphans, environments.

Most tests run small Python scripts written here (a process that ignores SIGTERM, has children, writes partial lines):
they test the process control itself.  One runs the real worker on the real engine."""

import json
import os
import sys
import textwrap
import time

from procutil import pid_alive
from DRGS4DSlicerLib import process, selftest


def _script_process(tmp_path, body, watch_stdin=False):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return process.WorkerProcess([sys.executable, "-u", str(script)], cwd=str(tmp_path),
                                 watch_stdin=watch_stdin).start()


def _collect(worker, timeout=30):
    events = []
    deadline = time.time() + timeout
    while not worker.finished():
        events += worker.poll_events()
        if time.time() > deadline:
            worker.cancel(1)
            raise AssertionError(f"no exit; events so far: {events}")
        time.sleep(0.02)
    return events


def test_partial_writes_noise_and_stderr_are_separated(tmp_path):
    body = """
        import sys, time, json
        line = json.dumps({"protocol": 1, "event": "progress", "stage": "train", "iteration": 3, "iterations": 9})
        sys.stdout.write(line[:17]); sys.stdout.flush(); time.sleep(0.3)
        sys.stdout.write(line[17:] + "\\nnot an event\\n"); sys.stdout.flush()
        sys.stderr.write("a log line\\n"); sys.stderr.flush()
        sys.stdout.write(json.dumps({"protocol": 1, "event": "done", "outputs": {}}))  # no final newline
    """
    events = _collect(_script_process(tmp_path, body))
    names = [e["event"] for e in events]
    assert names.count("progress") == 1 and names.count("done") == 1
    assert {"event": "output", "line": "not an event"} in events
    assert {"event": "log", "line": "a log line"} in events
    assert names[-1] == "exit" and events[-1]["returncode"] == 0
    progress = next(e for e in events if e["event"] == "progress")
    assert progress["iteration"] == 3


def test_crash_without_terminal_event_becomes_a_readable_error(tmp_path):
    body = """
        import sys, json
        print(json.dumps({"protocol": 1, "event": "progress", "stage": "load"}), flush=True)
        sys.stderr.write("Segmentation fault (simulated)\\n")
        sys.exit(139)
    """
    worker = _script_process(tmp_path, body)
    events = _collect(worker)
    err = next(e for e in events if e["event"] == "error")
    assert err["kind"] == "crashed" and "exit code 139" in err["message"]
    assert "Segmentation fault (simulated)" in err["message"]
    assert worker.terminal_event is err and worker.returncode == 139


def test_protocol_mismatch_is_reported(tmp_path):
    body = """
        import json
        print(json.dumps({"protocol": 99, "event": "progress", "stage": "load"}), flush=True)
        print(json.dumps({"protocol": 1, "event": "done", "outputs": {}}), flush=True)
    """
    events = _collect(_script_process(tmp_path, body))
    problem = next(e for e in events if e["event"] == "error")
    assert problem["kind"] == "protocol" and "protocol 99" in problem["message"]


def test_cancel_kills_a_stubborn_process_tree_without_orphans(tmp_path):
    """The worker ignores SIGTERM and has a child (and grandchild); cancel must leave nothing behind."""
    body = f"""
        import signal, subprocess, sys, time, json
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
            " open({str(tmp_path / 'grandchild.pid')!r}, 'w').write(str(g.pid)); time.sleep(300)"])
        open({str(tmp_path / 'child.pid')!r}, "w").write(str(child.pid))
        print(json.dumps({{"protocol": 1, "event": "progress", "stage": "train"}}), flush=True)
        time.sleep(300)
    """
    worker = _script_process(tmp_path, body)
    deadline = time.time() + 20
    while not (tmp_path / "grandchild.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert pid_alive(child) and pid_alive(grandchild)
    t0 = time.time()
    worker.cancel(timeout=1.0)
    assert time.time() - t0 < 10
    time.sleep(0.2)
    assert not worker.is_running()
    assert not pid_alive(worker.pid) and not pid_alive(child) and not pid_alive(grandchild)
    events = worker.poll_events()
    assert events[-1]["event"] == "exit"
    assert any(e["event"] == "cancelled" and e.get("forced") for e in events)


def test_request_cancel_escalates_to_kill_from_poll(tmp_path):
    body = """
        import signal, time, json
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"protocol": 1, "event": "progress", "stage": "train"}), flush=True)
        time.sleep(300)
    """
    worker = _script_process(tmp_path, body)
    while not worker.poll_events():
        time.sleep(0.02)
    worker.request_cancel(grace_s=0.5)
    t0 = time.time()
    events = _collect(worker, timeout=15)
    assert 0.4 < time.time() - t0 < 10
    assert events[-1]["event"] == "exit" and events[-1]["returncode"] != 0


def test_external_environment_restores_startup_values():
    startup = {"PATH": "/usr/bin", "PYTHONPATH": "/home/me/lib", "PYTHONHOME": "/bad", "HOME": "/home/me"}
    env = process.external_python_environment({"PATH": "/slicer/bin:/usr/bin"}, startup=startup)
    assert env == {"PATH": "/usr/bin", "PYTHONPATH": "/home/me/lib", "HOME": "/home/me"}


def test_external_environment_strips_slicer_without_startup_info(tmp_path):
    home = str(tmp_path / "Slicer-5.8")
    current = {
        "PATH": os.pathsep.join([f"{home}/bin", "/usr/local/bin", f"{home}/lib/Python/bin"]),
        "LD_LIBRARY_PATH": os.pathsep.join([f"{home}/lib/Slicer-5.8", f"{home}/lib"]),
        "PYTHONHOME": f"{home}/lib/Python", "PYTHONPATH": f"{home}/lib/Python/lib/python3.12",
        "PYTHONNOUSERSITE": "1", "SLICER_HOME": home, "QT_PLUGIN_PATH": f"{home}/lib/QtPlugins",
        "HOME": "/home/me", "CUDA_VISIBLE_DEVICES": "1",
    }
    env = process.external_python_environment(current, startup=None, slicer_home=home)
    assert env["PATH"] == "/usr/local/bin"
    for gone in ("LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "SLICER_HOME", "QT_PLUGIN_PATH"):
        assert gone not in env
    assert env["HOME"] == "/home/me" and env["CUDA_VISIBLE_DEVICES"] == "1"


def test_worker_environment_puts_the_engine_first_and_unbuffers(tmp_path):
    env = process.worker_environment(external=False, engine=tmp_path, current={"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/x"]
    assert env["PYTHONUNBUFFERED"] == "1"
    ext = process.worker_environment(external=True, engine=tmp_path, startup={"PATH": "/usr/bin"},
                                     current={"PYTHONPATH": "/slicer/py", "PATH": "/slicer:/usr/bin"})
    assert ext["PYTHONPATH"] == str(tmp_path) and ext["PATH"] == "/usr/bin"


def test_build_command_and_engine_root():
    assert process.build_worker_command("/opt/py/bin/python", ["--version"]) == \
        ["/opt/py/bin/python", "-u", "-m", "drgs_core.worker", "--version"]
    assert process.build_worker_command(None, [])[0] == sys.executable  # no Slicer app here
    root = process.engine_root()
    assert root is not None and (root / "drgs_core" / "worker.py").is_file()


def test_version_probe_and_missing_interpreter():
    event = process.run_worker_command(["--version"], timeout=60)
    assert event["event"] == "version" and event["protocol"] == 1
    event = process.run_worker_command(["--version"], python="/nonexistent/python3", external=True)
    assert event["event"] == "error" and "was not found" in event["message"]


def test_foreign_interpreter_without_engine_gets_a_hint(tmp_path):
    """An interpreter that cannot import drgs_core: the panel says what to install."""
    wrapper = tmp_path / "python-without-site"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # no site-packages: no drgs_core
    wrapper.chmod(0o755)
    event = process.run_worker_command(["--version"], python=str(wrapper), external=True,
                                       engine=tmp_path, cwd=str(tmp_path))  # an empty folder, not the engine
    assert event["event"] == "error" and "not installed in this Python" in event["message"]


def test_real_worker_reports_through_process(tiny_case, tmp_path, worker_env):
    """The real engine on the tiny phantom: every line it writes is a protocol event, in order, then the exit."""
    req = tmp_path / "req.json"
    req.write_text(json.dumps(selftest.tiny_request(tiny_case, str(tmp_path / "run"), iterations=30,
                                                    snapshot_every=10, progress_every=5)))
    worker = process.start_worker(str(req), extra_env=worker_env)
    events = _collect(worker, timeout=300)
    assert not [e for e in events if e["event"] in ("output", "error")], events
    names = [e["event"] for e in events if e["event"] != "log"]
    assert names[:3] == ["worker", "progress", "started"] and names[-2:] == ["done", "exit"]
    assert [e["iteration"] for e in events if e["event"] == "snapshot"] == [10, 20]
    assert [e["iteration"] for e in events if e["event"] == "progress" and e["stage"] == "train"] == \
        [1, 5, 10, 15, 20, 25, 30]
    assert worker.returncode == 0 and worker.terminal_event["event"] == "done"


def test_leftover_child_holding_the_pipe_does_not_hang_the_exit(tmp_path):
    """The worker exits but a process it started keeps stdout open: the exit is still reported, the child killed."""
    body = f"""
        import json, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # inherits stdout
        open({str(tmp_path / 'child.pid')!r}, "w").write(str(child.pid))
        print(json.dumps({{"protocol": 1, "event": "done", "outputs": {{}}}}), flush=True)
    """
    worker = _script_process(tmp_path, body)
    t0 = time.time()
    events = _collect(worker, timeout=20)
    assert time.time() - t0 < 10
    assert [e["event"] for e in events][-2:] == ["done", "exit"]
    time.sleep(0.2)
    assert not pid_alive(int((tmp_path / "child.pid").read_text()))
