"""DRGS4DSlicerLib.remote, the panel's client of `drgs4d serve`, against a real server process on loopback.

The client gets the same worker request a local run gets (job.make_request on the tiny phantom) and must leave the
local output folder exactly as the server's run folder (same files, same bytes), with the event paths pointing there.
"""

import ast
import hashlib
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
SERVE_TESTS = Path(__file__).resolve().parents[1] / "serve"
if str(SERVE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVE_TESTS))
from server_proc import Server  # noqa: E402

from DRGS4DSlicerLib import protocol, remote  # noqa: E402
from DRGS4DSlicerLib.selftest import tiny_request  # noqa: E402

REMOTE_SOURCE = Path(remote.__file__)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("remote") / "data", workers=2).start()
    yield srv
    srv.stop()


def _drive(job, on_event=None, timeout=240):
    events = []
    deadline = time.monotonic() + timeout
    while not job.finished():
        assert time.monotonic() < deadline, events[-3:]
        for e in job.poll_events():
            events.append(e)
            if on_event:
                on_event(job, e)
        time.sleep(0.05)
    return events


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_remote_run_lands_like_a_local_run(server, tiny_case, tmp_path):
    out = tmp_path / "run"
    request = tiny_request(str(tiny_case), str(out), iterations=20, snapshot_every=10)
    client = remote.RemoteClient(server.url, server.token)
    job = remote.RemoteJob(client, request).start()
    events = _drive(job)
    names = [e["event"] for e in events]
    assert names[-1] == "exit" and job.returncode == protocol.EXIT_DONE and events[-1]["returncode"] == 0
    protocol_events = [e for e in events if e["event"] not in ("log", "exit")]
    for e in protocol_events:  # validated like local worker events, and nothing points at the server any more
        assert protocol.validate_event({**e, "protocol": 1})["event"] == e["event"]
        assert str(server.data) not in repr(e)
    started = next(e for e in protocol_events if e["event"] == "started")
    assert Path(started["run_dir"]) == out.resolve()
    snaps = [e for e in protocol_events if e["event"] == "snapshot"]
    assert snaps and all(Path(s["volume"]).is_file() and Path(s["volume"]).parent == out / "snapshots" for s in snaps)
    done = protocol_events[-1]
    assert done["event"] == "done"
    for key, path in done["outputs"].items():
        assert Path(path).parent == out and Path(path).is_file(), key
    server_out = server.data / "jobs" / job.job_id / "out"
    assert _digest(out) == _digest(server_out)                         # the same folder, byte for byte
    assert {"volume.nii.gz", "mesh.vtk", "metrics.json", "checkpoint.pt", "config.json"} <= set(_digest(out))
    assert [j["id"] for j in client.jobs()] == [job.job_id]
    client.delete(job.job_id)


def test_remote_cancel_keeps_a_local_checkpoint(server, tiny_case, tmp_path):
    out = tmp_path / "run"
    request = tiny_request(str(tiny_case), str(out), iterations=2000, checkpoint_every=5, snapshot_every=0)

    def cancel_in_training(job, e):
        if e["event"] == "progress" and e.get("stage") == "train" and e.get("iteration", 0) >= 6:
            job.request_cancel()

    job = remote.RemoteJob(remote.RemoteClient(server.url, server.token), request).start()
    events = _drive(job, cancel_in_training)
    last = [e for e in events if e["event"] not in ("log", "exit")][-1]
    assert last["event"] == "cancelled" and job.returncode == protocol.EXIT_CANCELLED
    assert Path(last["checkpoint"]) == out / "checkpoint.pt" and (out / "checkpoint.pt").is_file()
    assert not (out / "volume.nii.gz").exists()


def test_wrong_token_and_unreachable_server_end_with_clear_errors(server, tiny_case, tmp_path):
    with pytest.raises(remote.RemoteError) as info:
        remote.check_connection(server.url, "not-the-token")
    assert info.value.status == 401 and "token" in info.value.message
    request = tiny_request(str(tiny_case), str(tmp_path / "run"))
    job = remote.RemoteJob(remote.RemoteClient(server.url, "not-the-token"), request).start()
    events = _drive(job, timeout=60)
    assert events[-2]["event"] == "error" and events[-2]["kind"] == "input" and "token" in events[-2]["message"]
    assert job.returncode == protocol.EXIT_INPUT
    with pytest.raises(remote.RemoteError) as info:
        remote.check_connection("http://127.0.0.1:9", server.token)  # nothing listens on the discard port
    assert info.value.status == 0 and "cannot reach" in info.value.message


def test_client_source_runs_on_python_39():
    """Slicer 5.x ships Python 3.9: no 3.10+ syntax in the client (annotations are strings via __future__)."""
    source = REMOTE_SOURCE.read_text()
    ast.parse(source, feature_version=(3, 9))
    assert "from __future__ import annotations" in source
    imports = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    imports |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    assert imports <= set(sys.stdlib_module_names) | {"protocol"}, imports   # no requests, httpx, Qt, drgs_core
