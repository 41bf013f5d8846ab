"""Start order, readiness, shutdown and cleanup of the server's processes (DESIGN §1).

embed cache → visual server (ViT) → router (+ model worker) → HTTP in this process.
Each child reports ready or its error; any failure at start-up stops everything and
exits non-zero with the cause. Children die with the parent (PR_SET_PDEATHSIG), and
shutdown unlinks every shared-memory segment carrying this server's prefix.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from .args import ServerArgs
from .embed_cache import shm

log = logging.getLogger("mmserver.launcher")

START_TIMEOUT_S = float(os.environ.get("MMSERVER_START_TIMEOUT", "900"))
_CTX = mp.get_context("spawn")


class StartupError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies, so no worker outlives the server.

    SIGTERM (not SIGKILL) so that `finally` blocks run: the cache process then unlinks the
    server's shared-memory segments even when the HTTP process was killed outright."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _exit_when_orphaned(parent_pid: int, grace_s: float = 3.0) -> None:
    """Backstop of PR_SET_PDEATHSIG: a child whose main thread sits in a collective (a model rank
    waiting on a broadcast from a rank that will never send) cannot run its SIGTERM handler. A
    thread notices the parent is gone and, after `grace_s` for the handler's cleanup, exits hard."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _set_process_name(name: str) -> None:
    """Shown by ps/top (and /proc/PID/comm), so operators can tell the workers apart."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, ctypes.c_char_p(f"mms-{name}"[:15].encode()), 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass


def _child_entry(name: str, target: Callable, kwargs: dict, status: Connection, log_level: str,
                 parent_pid: int) -> None:
    _die_with_parent()
    _set_process_name(name)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    _exit_when_orphaned(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind, running cleanup code
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    if hasattr(kwargs.get("args"), "limit_cpu_threads"):
        kwargs["args"].limit_cpu_threads()
    try:
        target(ready=lambda info=None: status.send(("ready", info)), **kwargs)
    except BaseException:
        try:
            status.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


@dataclass
class Cluster:
    """The processes of one server and the resources to clean up after them."""

    prefix: str
    workdir: str
    procs: dict[str, Any] = field(default_factory=dict)
    _status: dict[str, Connection] = field(default_factory=dict)

    def spawn(self, name: str, target: Callable, log_level: str, **kwargs) -> None:
        """Start a child without waiting (ranks of one process group must all start first)."""
        recv, send = _CTX.Pipe(duplex=False)
        p = _CTX.Process(target=_child_entry, name=f"mmserver-{name}",
                         args=(name, target, kwargs, send, log_level, os.getpid()), daemon=False)
        p.start()
        send.close()
        self.procs[name] = p
        self._status[name] = recv

    def wait_ready(self, name: str) -> Any:
        """Block until `name` reports ready; returns what it reported, or raises StartupError."""
        p, recv = self.procs[name], self._status.pop(name)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if recv.poll(0.2):
                try:
                    kind, info = recv.recv()
                except EOFError:
                    raise StartupError(f"{name} exited during start-up (exit code {p.exitcode})") from None
                if kind == "error":
                    raise StartupError(f"{name} failed to start:\n{info}")
                return info
            if not p.is_alive():
                raise StartupError(f"{name} exited during start-up (exit code {p.exitcode})")
            if time.monotonic() > deadline:
                raise StartupError(f"{name} did not become ready within {START_TIMEOUT_S:g}s")

    def start(self, name: str, target: Callable, log_level: str, **kwargs) -> Any:
        self.spawn(name, target, log_level, **kwargs)
        return self.wait_ready(name)

    def dead(self) -> str | None:
        for name, p in self.procs.items():
            if not p.is_alive():
                return f"{name} process exited (code {p.exitcode})"
        return None

    def shutdown(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs.clear()
        shm.sweep(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)


def new_cluster() -> Cluster:
    prefix = f"mms{os.getpid()}-{secrets.token_hex(3)}-"  # pid first: tools can tell servers apart
    return Cluster(prefix=prefix, workdir=tempfile.mkdtemp(prefix="mmserver-"))


def pipe() -> tuple[Connection, Connection]:
    """(receiving end, sending end)."""
    return _CTX.Pipe(duplex=False)


def fail(message: str) -> None:
    print(f"mmserver: start-up failed: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def configure_logging(args: ServerArgs) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s http %(levelname)s %(message)s")
