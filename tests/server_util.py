"""Start the real server as subprocesses on CPU and talk to it over HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """All descendant pids, from /proc."""
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                parents[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_named(server: "Server", name: str) -> int:
    """Pid of the server's worker process called mms-<name>."""
    for pid in children_of(server.proc.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == f"mms-{name}"[:15]:
                return pid
        except OSError:
            continue
    raise LookupError(f"no mms-{name} process")


def shm_segments(pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"mms{pid}-")]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path
    children: set[int] = field(default_factory=set)

    def post(self, path: str, body, timeout: float = 120, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stream(self, body, timeout: float = 120) -> tuple[int, list[dict]]:
        req = urllib.request.Request(self.url + "/generate_stream", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                events = [json.loads(line[5:]) for line in r.read().decode().split("\n") if line.startswith("data:")]
                return r.status, events
        except urllib.error.HTTPError as e:
            return e.code, [json.loads(e.read() or b"{}")]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def settled_metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """/metrics once the workers' periodic stats (every 0.2 s) have caught up: three reads
        0.3 s apart agree. Bounded: after `timeout` the last read is returned."""
        deadline = time.monotonic() + timeout
        last, same = self.metrics(), 0
        while same < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.metrics()
            same = same + 1 if now == last else 0
            last = now
        return last

    def metrics(self) -> dict[str, float]:
        _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, value: float, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        while True:
            got = self.metrics().get(name)
            if got == value or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def start_server(model_dir: Path, *flags: str, log_dir: Path, env: dict | None = None,
                 timeout: float = 240) -> Server:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mmserver.api_server", "--model_dir", str(model_dir), "--port", str(port),
           "--device", "cpu", *flags]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            if server.get("/health")[0] == 200:
                server.children = children_of(proc.pid)
                return server
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop_server(server: Server, timeout: float = 30) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


def image_b64(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def gen_body(prompt: str, images=(), **params) -> dict:
    body = {"inputs": prompt, "parameters": params}
    if images:
        body["multimodal_params"] = {"images": [{"type": "base64", "data": image_b64(im)} for im in images]}
    return body


def hang_up(conn, resp=None) -> None:
    """Drop a client connection at once, as a client that goes away does."""
    import socket as _socket

    if conn.sock is not None:
        conn.sock.shutdown(_socket.SHUT_RDWR)
    if resp is not None:
        resp.close()
    conn.close()


@contextlib.contextmanager
def serve_directory(directory: Path):
    """A local HTTP server handing out the files in `directory`; yields its base URL."""
    import functools
    import http.server
    import threading

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler,
                                                                                  directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
