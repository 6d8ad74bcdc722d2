"""drgs_core.worker: the background-process protocol, on the real engine and the tiny phantom case of
Testing/conftest.py.

In-process tests call ``worker.run()`` with a stop callback that watches the events, which puts a cancel at an exact
iteration; process tests start ``python -m drgs_core.worker`` and stop it the ways the panel and a terminal do
(SIGTERM, SIGINT, ``cancel`` on stdin, stdin closing).  Outcomes covered: done, input error (a case whose angles are
in degrees, resuming from a corrupt checkpoint), internal error (a bug planted in the engine), cancel during training (a checkpoint, then a
resume to the end) and cancel before training (nothing to resume).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from drgs_core import worker

torch = pytest.importorskip("torch")
protocol = pytest.importorskip("DRGS4DSlicerLib.protocol")  # the panel's parser (Qt-free, no Slicer needed)

REPO = Path(__file__).resolve().parents[1]


def _request(case, out, **kw):
    req = {"case": str(case), "out": str(out), "preset": "tiny", "device": "cpu", "views": 8, "iterations": 30,
           "n_gaussians": 400, "times_4d": 2, "snapshot_every": 10, "checkpoint_every": 10, "progress_every": 1}
    req.update(kw)
    return req


def _corrupt_checkpoint(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint: this copy was cut off\n")


def _train_iterations(events):
    return [e["iteration"] for e in events if e["event"] == "progress" and e["stage"] == "train"]


def _checkpoint_iteration(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["iteration"]


# ---- in-process: run() -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_run(tiny_case, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("worker_done") / "run"
    events = []
    code = worker.run(_request(tiny_case, out), events.append, lambda: False)
    return code, events


def test_run_done_reports_events_in_order(done_run):
    code, events = done_run
    assert code == worker.EXIT_DONE
    names = [e["event"] for e in events]
    assert names[-1] == "done" and names.count("done") == 1 and names.count("started") == 1
    assert "error" not in names and "cancelled" not in names
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    ranks = [protocol.STAGES.index(s) for s in stages]
    assert ranks == sorted(ranks) and stages[0] == "load" and stages[-1] == "write"
    assert names.index("started") < names.index("done")
    assert _train_iterations(events) == list(range(1, 31))
    snapshots = [e for e in events if e["event"] == "snapshot"]
    assert [s["iteration"] for s in snapshots] == [10, 20]
    for s in snapshots:
        assert os.path.isfile(s["volume"]) and (s["mesh"] is None or os.path.isfile(s["mesh"]))


def test_done_event_names_the_outputs_and_the_iso_level(done_run):
    done = done_run[1][-1]
    for key in protocol.OUTPUT_KEYS:
        assert os.path.isfile(done["outputs"][key]), key
    full = json.loads(Path(done["outputs"]["metrics"]).read_text())
    assert full["iso_level"] > 0 and done["metrics"]["iso_level"] == pytest.approx(full["iso_level"])


def test_every_event_of_a_real_run_passes_the_panel_parser(done_run):
    for event in done_run[1]:
        parsed = protocol.parse_line(worker.encode_event(event))
        assert parsed.kind == "event", (parsed.problem, event)
        assert parsed.event.get("stage_known", True), event


def test_run_input_error_from_a_broken_case(degrees_case, tmp_path, one_torch_thread):
    case = degrees_case(tmp_path / "degrees")
    events = []
    assert worker.run(_request(case, tmp_path / "run"), events.append, lambda: False) == worker.EXIT_INPUT
    err = events[-1]
    assert [e["event"] for e in events] == ["progress", "error"]  # it stopped while loading
    assert err["kind"] == "input" and "traceback" not in err
    assert "degrees" in err["message"] and "transforms.json" in err["message"] and "what to do" in err["message"]


def test_run_rejects_unknown_config_keys_as_input_error(tiny_case, tmp_path):
    events = []
    code = worker.run(_request(tiny_case, tmp_path / "run", bogus=1), events.append, lambda: False)
    assert code == worker.EXIT_INPUT
    assert events == [{"event": "error", "kind": "input", "message": events[0]["message"]}]
    assert "bogus" in events[0]["message"]


def test_run_input_error_from_a_corrupt_checkpoint(tiny_case, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    _corrupt_checkpoint(out)
    events = []
    code = worker.run(_request(tiny_case, out, resume=True), events.append, lambda: False)
    assert code == worker.EXIT_INPUT
    err = events[-1]
    assert err["event"] == "error" and err["kind"] == "input"
    assert "damaged" in err["message"] and "delete" in err["message"]
    assert not _train_iterations(events)
    assert (out / "checkpoint.pt").read_bytes().startswith(b"not a checkpoint")  # left for the user to decide


def _broken_fdk(*args, **kwargs):
    raise ZeroDivisionError("a bug inside the engine")


def test_run_internal_error_keeps_the_traceback(tiny_case, tmp_path, one_torch_thread, monkeypatch):
    from drgs_core import pipeline

    monkeypatch.setattr(pipeline, "fdk", _broken_fdk)
    events = []
    code = worker.run(_request(tiny_case, tmp_path / "run"), events.append, lambda: False)
    assert code == worker.EXIT_INTERNAL
    err = events[-1]
    assert err["event"] == "error" and err["kind"] == "internal"
    assert err["message"].split(":")[0].endswith("Error")  # the exception type comes first
    assert "Traceback" in err["traceback"] and "_broken_fdk" in err["traceback"]
    assert not _train_iterations(events)


@pytest.fixture(scope="module")
def interrupted(tiny_case, tmp_path_factory, one_torch_thread):
    """A run stopped right after training iteration 5, then resumed to the end."""
    out = tmp_path_factory.mktemp("worker_cancel") / "run"
    request = _request(tiny_case, out, snapshot_every=0)
    first, flag = [], {"stop": False}

    def emit(event):
        first.append(event)
        if event["event"] == "progress" and event["stage"] == "train" and event["iteration"] >= 5:
            flag["stop"] = True

    code1 = worker.run(request, emit, lambda: flag["stop"])
    saved_at = _checkpoint_iteration(out / "checkpoint.pt")  # before the resume overwrites it
    second = []
    code2 = worker.run(dict(request, resume=True), second.append, lambda: False)
    return {"out": out, "first": first, "code1": code1, "saved_at": saved_at, "second": second, "code2": code2}


def test_run_cancel_during_training_keeps_a_checkpoint(interrupted):
    assert interrupted["code1"] == worker.EXIT_CANCELLED
    event = interrupted["first"][-1]
    assert event["event"] == "cancelled" and event["iteration"] == 5
    assert os.path.samefile(event["checkpoint"], interrupted["out"] / "checkpoint.pt")
    assert interrupted["saved_at"] == 5
    assert "done" not in [e["event"] for e in interrupted["first"]]


def test_resume_continues_from_the_checkpoint(interrupted):
    assert interrupted["code2"] == worker.EXIT_DONE
    assert _train_iterations(interrupted["second"]) == list(range(6, 31))
    assert interrupted["second"][-1]["event"] == "done"


def test_stop_before_training_has_nothing_to_resume(tiny_case, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    events = []
    assert worker.run(_request(tiny_case, out), events.append, lambda: True) == worker.EXIT_CANCELLED
    event = events[-1]
    assert event["event"] == "cancelled" and event["checkpoint"] is None
    assert event["iteration"] == 0 and event["stage"] == "load"
    assert not _train_iterations(events) and not (out / "checkpoint.pt").exists()


def test_missing_request_file_is_an_input_error(tmp_path):
    from drgs_core.errors import DRGSInputError

    with pytest.raises(DRGSInputError) as info:
        worker.read_request(str(tmp_path / "nope.json"))
    assert "does not exist" in str(info.value)


# ---- as a process -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(worker_env):
    e = dict(os.environ)
    e.update(worker_env)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return e


def _lines(stdout: bytes):
    return [json.loads(line) for line in stdout.decode().splitlines()]


def _run_worker(args, env, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "drgs_core.worker", *args], capture_output=True, env=env,
                          timeout=timeout, cwd=str(REPO), **kw)


def _write_request(tmp_path, request) -> str:
    path = tmp_path / "req.json"
    path.write_text(json.dumps(request))
    return str(path)


def test_version_command(env):
    done = _run_worker(["--version"], env)
    assert done.returncode == 0
    (event,) = _lines(done.stdout)
    assert event["protocol"] == 1 and event["event"] == "version" and event["drgs_core"]


def test_stdout_carries_only_protocol_lines(env):
    """Once the worker has set up its event stream, a print or a library writing to fd 1 lands on stderr."""
    code = ("import os\nfrom drgs_core import worker\nworker.main(['--version'])\n"
            "print('a stray print')\nos.write(1, b'bytes written to fd 1\\n')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60, cwd=str(REPO))
    assert done.returncode == 0, done.stderr.decode()
    (event,) = _lines(done.stdout)  # would raise on any non-JSON line
    assert event["event"] == "version"
    err = done.stderr.decode()
    assert "a stray print" in err and "bytes written to fd 1" in err


@pytest.mark.parametrize("outcome, code", [("input", 2), ("internal", 1)])
def test_process_exit_codes_for_errors(tiny_case, degrees_case, tmp_path, env, outcome, code):
    out = tmp_path / "run"
    if outcome == "input":
        request = _request(degrees_case(tmp_path / "degrees"), out)
        done = _run_worker(["--config", _write_request(tmp_path, request)], env)
    else:  # an engine bug, planted in a real worker process
        code_text = ("import sys, drgs_core.pipeline as p\n"
                     "def broken(*a, **k): raise ZeroDivisionError('a bug')\n"
                     "p.fdk = broken\n"
                     "from drgs_core import worker\n"
                     f"sys.exit(worker.main(['--config', {_write_request(tmp_path, _request(tiny_case, out))!r}]))")
        done = subprocess.run([sys.executable, "-c", code_text], capture_output=True, env=env, timeout=120,
                              cwd=str(REPO))
    assert done.returncode == code, done.stderr.decode()[-3000:]
    last = _lines(done.stdout)[-1]
    assert last["event"] == "error" and last["kind"] == outcome and last["message"]


def test_process_bad_request_file_is_input_error(tmp_path, env):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = _run_worker(["--config", str(bad)], env)
    assert done.returncode == 2
    hello, event = _lines(done.stdout)
    assert hello["event"] == "worker" and isinstance(hello["pid"], int)  # a run's first event names its pid
    assert event["kind"] == "input" and "not valid JSON" in event["message"]


# ---- an interpreter without the engine's dependencies (the extensions build machines have no torch) ------------

_NO_TORCH = "import sys\nsys.modules['torch'] = None  # import torch raises ImportError\nfrom drgs_core import worker\n"


def _run_without_torch(args, env):
    code = _NO_TORCH + f"sys.exit(worker.main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120, cwd=str(REPO))


def test_missing_dependency_is_an_input_error_that_says_what_to_do(tiny_case, tmp_path, env):
    req = _write_request(tmp_path, _request(tiny_case, tmp_path / "run"))
    for args in (["--config", req], ["--describe", req]):
        done = _run_without_torch(args, env)
        assert done.returncode == worker.EXIT_INPUT, done.stderr.decode()[-2000:]
        event = _lines(done.stdout)[-1]
        assert event["event"] == "error" and event["kind"] == "input", event
        assert "'torch'" in event["message"] and "What to do" in event["message"]
        assert "Traceback" not in event["message"]


def test_probe_without_torch_explains_instead_of_failing(env):
    done = _run_without_torch(["--probe"], env)
    assert done.returncode == 0
    (event,) = _lines(done.stdout)
    assert event["event"] == "probe" and event["torch"] is None and event["backend"] is None
    assert "'torch'" in event["problem"]


def test_probe_names_the_backend_and_a_time_only_where_known(env):
    done = _run_worker(["--probe"], env)
    (event,) = _lines(done.stdout)
    import torch

    from drgs_core.render import active_backend

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert event["backend"] == active_backend(device) and event["backend_device"] == device
    assert len(event["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    # the rough figure exists for GPUs only, from the rates in worker.EXPECTED_IT_PER_S
    for backend in ("cuda-ext", "triton"):
        rate = worker.EXPECTED_IT_PER_S[backend]
        assert worker.expected_speed(backend, "cuda") == {"it_per_s": rate, "fast_run_s": round(10000 / rate + 15)}
    assert worker.expected_speed("torch", "cuda")["it_per_s"] == 10.0  # the reference path on a GPU
    assert worker.expected_speed("torch", "cpu") == {"it_per_s": None, "fast_run_s": None}
    if device == "cpu":
        assert event["it_per_s"] is None and event["fast_run_s"] is None


def _wait_for_event(proc, name, accept=lambda event: True):
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["event"] == name and accept(event):
            return seen
    raise AssertionError(f"no {name} event; saw {[e['event'] for e in seen]}")


def _start(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "drgs_core.worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=str(REPO), **kw)


def _stop_group(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("how", ["sigterm", "sigint", "stdin-cancel", "stdin-eof"])
def test_process_stops_cleanly_during_training_and_checkpoints(tiny_case, tmp_path, env, how):
    out = tmp_path / "run"
    req = _write_request(tmp_path, _request(tiny_case, out, iterations=2000, snapshot_every=0))
    proc = _start(["--config", req, "--watch-stdin"], env, stdin=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_event(proc, "progress", accept=lambda e: e["stage"] == "train" and e["iteration"] >= 3)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "sigint":
            proc.send_signal(signal.SIGINT)
        elif how == "stdin-cancel":
            proc.stdin.write(b"cancel\n")
            proc.stdin.flush()
        else:
            proc.stdin.close()
        seen = _wait_for_event(proc, "cancelled")
        assert proc.wait(60) == worker.EXIT_CANCELLED
    finally:
        _stop_group(proc)
    event = seen[-1]
    assert event["iteration"] >= 3 and os.path.samefile(event["checkpoint"], out / "checkpoint.pt")
    assert _checkpoint_iteration(event["checkpoint"]) == event["iteration"]


def test_process_cancel_before_training_has_nothing_to_resume(tiny_case, tmp_path, env):
    """'cancel' is on stdin before the engine has even loaded the case."""
    out = tmp_path / "run"
    req = _write_request(tmp_path, _request(tiny_case, out))
    done = _run_worker(["--config", req, "--watch-stdin"], env, input=b"cancel\n")
    assert done.returncode == worker.EXIT_CANCELLED, done.stderr.decode()[-3000:]
    event = _lines(done.stdout)[-1]
    assert event["event"] == "cancelled" and event["checkpoint"] is None and event["stage"] == "load"
    assert not (out / "checkpoint.pt").exists()


def test_new_session_flag_makes_the_worker_a_group_leader(tiny_case, tmp_path, env):
    req = _write_request(tmp_path, _request(tiny_case, tmp_path / "run", iterations=2000, snapshot_every=0))
    proc = _start(["--config", req, "--new-session"], env, stdin=subprocess.DEVNULL)
    try:
        _wait_for_event(proc, "started")
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        os.killpg(proc.pid, signal.SIGTERM)
        _wait_for_event(proc, "cancelled")
        assert proc.wait(60) == worker.EXIT_CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
