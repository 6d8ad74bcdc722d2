"""`drgs4d serve` as a real process on loopback, with real reconstructions of the tiny phantom in worker processes.

One server (two CPU slots, a data root, a 1 MiB upload limit) runs a long job B and a short job A side by side:
A finishes while B still runs (two slots), A's event stream is dropped after two events and picked up again with
Last-Event-ID after A has finished, B is cancelled mid-training and keeps its checkpoint.  A restart shows the
results download and that a restarted server lists (and serves) its finished jobs.  The security tests send a wrong
token, archives that escape the job folder, paths outside the data root and an oversize upload.
"""

import io
import json
import os
import shutil
import stat
import zipfile

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from server_proc import TINY_OPTIONS, Server, zip_case  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_case):
    root = tmp_path_factory.mktemp("serve")
    cases = root / "cases"
    cases.mkdir()
    shutil.copytree(tiny_case, cases / "tiny")
    os.symlink(root / "secret", cases / "link")  # a link out of the data root
    (root / "secret").mkdir()
    (root / "secret" / "transforms.json").write_text("{}")
    srv = Server(root / "data", "--data-root", str(cases), "--max-upload-mb", "1").start()
    yield srv
    srv.stop()


def _upload(srv, archive_bytes):
    return srv.call("POST", "/uploads", body=archive_bytes, headers={"Content-Type": "application/zip"})


def _submit_upload(srv, tiny_case, tmp_path, **options):
    status, up = _upload(srv, zip_case(tiny_case, tmp_path / "case.zip").read_bytes())
    assert status == 201, up
    status, job = srv.call("POST", "/jobs", {"upload": up["upload"], "options": {**TINY_OPTIONS, **options}})
    assert status == 201, job
    return job


@pytest.fixture(scope="module")
def two_jobs(server, tiny_case, tmp_path_factory):
    srv = server
    status, long_job = srv.call("POST", "/jobs", {"path": "tiny", "options": {
        **TINY_OPTIONS, "iterations": 2000, "checkpoint_every": 5, "progress_every": 1}})
    assert status == 201, long_job
    short = _submit_upload(srv, tiny_case, tmp_path_factory.mktemp("up"))
    first = srv.events(short["id"], stop_after=2)          # then the client goes away
    short_done = srv.wait_state(short["id"])
    _, long_state = srv.call("GET", f"/jobs/{long_job['id']}")
    rest = srv.events(short["id"], last=first[-1][0])      # reconnect after the job has finished
    stream = srv.stream(long_job["id"])
    for _, event in stream:
        if event["event"] == "progress" and event["stage"] == "train" and event["iteration"] >= 6:
            break
    stream.close()
    status, cancelled = srv.call("POST", f"/jobs/{long_job['id']}/cancel")
    assert status == 200, cancelled
    long_events = srv.events(long_job["id"])
    return dict(short=short, short_done=short_done, first=first, rest=rest, long=long_job,
                long_state_when_short_done=long_state, long_events=long_events)


def test_two_jobs_run_at_once(two_jobs):
    assert two_jobs["short_done"]["state"] == "done"
    assert two_jobs["long_state_when_short_done"]["state"] == "running"  # the short one did not wait in the queue


def test_events_survive_a_disconnect_and_resume_without_gaps(server, two_jobs):
    events = two_jobs["first"] + two_jobs["rest"]
    assert [i for i, _ in events] == list(range(len(events)))   # no event lost or repeated
    # the worker's first event names its interpreter (the protocol's "worker" event), then the run's progress
    assert events[-1][1]["event"] == "done" and [e["event"] for _, e in events[:2]] == ["worker", "progress"]
    on_disk = (server.data / "jobs" / two_jobs["short"]["id"] / "events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in on_disk] == [e for _, e in events]
    assert all(e["protocol"] == 1 for _, e in events)
    out = two_jobs["short_done"]["run_dir"]
    assert events[-1][1]["outputs"]["volume"] == os.path.join(out, "volume.nii.gz")


def test_cancel_stops_a_running_job_and_keeps_its_checkpoint(server, two_jobs):
    last = two_jobs["long_events"][-1][1]
    assert last["event"] == "cancelled" and last["checkpoint"].endswith("checkpoint.pt")
    job = server.wait_state(two_jobs["long"]["id"], exited=True)
    assert job["state"] == "cancelled" and job["exit_code"] == 3
    status, files = server.call("GET", f"/jobs/{job['id']}/files")
    assert "checkpoint.pt" in [f["path"] for f in files["files"]]
    status, gone = server.call("DELETE", f"/jobs/{job['id']}")
    assert status == 200 and not (server.data / "jobs" / job["id"]).exists()


def test_results_download_and_a_restarted_server_lists_its_jobs(server, two_jobs):
    job = two_jobs["short"]
    assert stat.S_IMODE(os.stat(server.data / "token").st_mode) == 0o600
    token = server.token
    server.stop()
    server.start()  # a restart on the same folder: the finished job is listed and served again
    assert server.token == token
    status, listing = server.call("GET", "/jobs")
    assert status == 200 and (job["id"], "done") in [(j["id"], j["state"]) for j in listing["jobs"]]
    status, raw = server.call("GET", f"/jobs/{job['id']}/result")
    assert status == 200
    out = server.data / "jobs" / job["id"] / "out"
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        sent = {n: zf.read(n) for n in zf.namelist()}
    expected = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sent == expected and "volume.nii.gz" in sent and "checkpoint.pt" in sent
    status, raw = server.call("GET", f"/jobs/{job['id']}/result?checkpoint=false")
    assert set(zipfile.ZipFile(io.BytesIO(raw)).namelist()) == set(sent) - {"checkpoint.pt"}
    status, one = server.call("GET", f"/jobs/{job['id']}/files/metrics.json")
    assert status == 200 and one["n_gaussians"] == json.loads((out / "metrics.json").read_text())["n_gaussians"] > 0
    assert server.call("DELETE", f"/jobs/{job['id']}")[0] == 200
    assert server.call("GET", f"/jobs/{job['id']}")[0] == 404
    assert not (server.data / "jobs" / job["id"]).exists()


def test_every_endpoint_needs_the_token(server):
    for method, path in (("GET", "/health"), ("GET", "/jobs"), ("POST", "/uploads"), ("POST", "/jobs"),
                         ("GET", "/jobs/0123456789abcdef/events"), ("GET", "/jobs/0123456789abcdef/result"),
                         ("DELETE", "/jobs/0123456789abcdef")):
        for token in ("", "x" + server.token, server.token[:-1]):
            status, body = server.call(method, path, body=b"{}", token=token)
            assert status == 401, (method, path, body)
            assert "token" in body["error"]
    assert server.call("GET", "/health")[0] == 200


def _zip_with(name: str, data: bytes = b"x", symlink: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("transforms.json", "{}")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return buf.getvalue()


def test_archive_members_and_paths_cannot_escape(server):
    before = sorted(p.name for p in server.data.parent.iterdir())
    for name, link in (("../evil.txt", False), ("/tmp/evil-abs.txt", False), ("a/../../evil.txt", False),
                       ("link", True)):
        status, body = _upload(server, _zip_with(name, b"/etc/passwd" if link else b"x", symlink=link))
        assert status == 400, (name, body)
        assert ("outside the job folder" in body["error"]) or ("link" in body["error"])
    assert sorted(p.name for p in server.data.parent.iterdir()) == before
    assert not os.path.exists("/tmp/evil-abs.txt")
    assert list((server.data / "uploads").iterdir()) == []           # nothing left half-extracted
    for body in ({"path": "../secret", "options": TINY_OPTIONS}, {"path": "/etc", "options": TINY_OPTIONS},
                 {"path": "link", "options": TINY_OPTIONS},
                 {"path": "tiny", "options": {**TINY_OPTIONS, "case": "../../secret"}}):
        status, answer = server.call("POST", "/jobs", body)
        assert status == 403, (body, answer)
    status, answer = server.call("GET", "/jobs/0123456789abcdef/files/..%2F..%2Ftoken")
    assert status in (403, 404) and "error" in answer
    assert server.call("GET", "/jobs/..%2Ftoken")[0] == 404


def test_bad_uploads_and_options_get_clear_errors(server):
    status, body = _upload(server, os.urandom(int(1.5 * 2**20)))
    assert status == 413 and "limit" in body["error"]
    status, body = _upload(server, b"not an archive at all")
    assert status == 415 and "zip" in body["error"]
    damaged = bytearray(_zip_with("case/transforms.json", b"{" * 4096))
    damaged[40:60] = b"\0" * 20  # the member's data no longer matches its CRC / deflate stream
    status, body = _upload(server, bytes(damaged))
    assert status == 400 and "damaged" in body["error"], body
    for body in ({"path": "tiny", "options": {**TINY_OPTIONS, "dicom": "../../secret"}},):
        status, answer = server.call("POST", "/jobs", body)
        assert status == 403, answer  # a DICOM path is confined like the case paths
    for options, words in (({"views": 0}, "views"), ({"bogus": 1}, "bogus"), ({"out": "/tmp/x"}, "out")):
        status, body = server.call("POST", "/jobs", {"path": "tiny", "options": {**TINY_OPTIONS, **options}})
        assert status == 400 and words in body["error"], body
    status, body = server.call("POST", "/jobs", {"upload": "0123456789abcdef", "options": {}})
    assert status == 404 and "upload" in body["error"]
