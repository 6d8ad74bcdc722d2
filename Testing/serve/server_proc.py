"""A real `drgs4d serve` process on a free loopback port, and a tiny stdlib HTTP helper for the tests."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TINY_OPTIONS = {"preset": "tiny", "views": 8, "iterations": 20, "n_gaussians": 300, "times_4d": 2, "device": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data: Path, *extra: str, workers: int = 2):
        self.data, self.extra, self.workers = Path(data), extra, workers
        self.proc = None

    def start(self) -> "Server":
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = open(self.data.parent / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "drgs_core.cli", "serve", "--data", str(self.data),
                                      "--port", str(self.port), "--workers", str(self.workers), *self.extra],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.data.parent / f"server-{self.port}.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise TimeoutError("the server did not start")
        self.token = (self.data / "token").read_text().strip()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body=None, token: str | None = None, headers: dict | None = None):
        """(status, decoded JSON or raw bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        head = {"Authorization": f"Bearer {self.token if token is None else token}"}
        if isinstance(body, (dict, list)):
            body, head["Content-Type"] = json.dumps(body).encode(), "application/json"
        head.update(headers or {})
        conn.request(method, path, body=body, headers=head)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        if resp.getheader("content-type", "").startswith("application/json"):
            return resp.status, json.loads(raw)
        return resp.status, raw

    def stream(self, job_id: str, last: int | None = None):
        """Iterate over the SSE stream as (id, event) until it ends; closing the iterator disconnects."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        head = {"Authorization": f"Bearer {self.token}"}
        if last is not None:
            head["Last-Event-ID"] = str(last)
        conn.request("GET", f"/jobs/{job_id}/events", headers=head)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
        index = None
        try:
            while True:
                line = resp.readline().decode()
                if not line:
                    return
                if line.startswith("id: "):
                    index = int(line[4:])
                elif line.startswith("data: "):
                    yield index, json.loads(line[6:])
        finally:
            conn.close()

    def events(self, job_id: str, last: int | None = None, stop_after: int | None = None):
        """[(id, event)] until the stream ends, or the first `stop_after` (then disconnect)."""
        out = []
        it = self.stream(job_id, last)
        for item in it:
            out.append(item)
            if stop_after is not None and len(out) >= stop_after:
                break
        it.close()
        return out

    def wait_state(self, job_id: str, states=("done", "error", "cancelled"), timeout: float = 180,
                   exited: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/jobs/{job_id}")
            assert status == 200, job
            if job["state"] in states and (not exited or job["exit_code"] is not None):
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} stayed {job['state']}")


def zip_case(case, archive: Path) -> Path:
    import zipfile

    case = Path(case)
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(case.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(case).as_posix())
    return archive
