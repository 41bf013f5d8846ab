"""Tensor parallelism across nodes (`--tp N --nnodes K --node_rank r --nccl_host H --nccl_port P`).

Node 0 runs HTTP, the router (rank 0) and its share of the model ranks; every other node runs
only model ranks (`run_node`). The ranks join one torch.distributed group at
tcp://H:P (NCCL on GPU, gloo on CPU); node r holds global ranks r·N/K … (r+1)·N/K − 1.

Beside it, a watchdog link on port P+1: each node r > 0 keeps a TCP connection to node 0 and
both ends send a heartbeat byte every second. Node 0 marks itself unhealthy (and fails its
requests with 503) as soon as a node that joined goes quiet or away, instead of waiting in a
collective that will never finish; a node r > 0 stops its ranks and exits when node 0 goes
away.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger("mmserver.nodes")

HEARTBEAT_S = 1.0
SILENCE_S = 5.0  # no heartbeat for this long: the peer is lost


def link_port(args) -> int:
    return args.nccl_port + 1


def _pump(sock: socket.socket, on_lost) -> None:
    """Send a heartbeat every HEARTBEAT_S and read the peer's; call on_lost(reason) once."""
    sock.settimeout(HEARTBEAT_S)
    last_heard = last_sent = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - last_sent >= HEARTBEAT_S:
                sock.sendall(b".")
                last_sent = now
            try:
                data = sock.recv(64)
                if not data:
                    raise ConnectionError("connection closed")
                last_heard = time.monotonic()
            except socket.timeout:
                pass
            if time.monotonic() - last_heard > SILENCE_S:
                raise TimeoutError(f"no heartbeat for {SILENCE_S:g}s")
    except OSError as e:
        on_lost(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    finally:
        sock.close()


class NodeWatch:
    """Node 0's side: accepts the other nodes' links; `lost` is None while all that joined are there."""

    def __init__(self, host: str, port: int, nnodes: int):
        self.nnodes = nnodes
        self.joined: set[int] = set()
        self.lost: str | None = None
        self._sock = socket.create_server(("", port), reuse_port=False)
        threading.Thread(target=self._accept, name="node-watch", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True).start()

    def _serve(self, conn: socket.socket, addr) -> None:
        try:
            conn.settimeout(SILENCE_S)
            rank = int(conn.recv(16).split(b"\n")[0])
        except (OSError, ValueError):
            conn.close()
            return
        self.joined.add(rank)
        log.info("node %d joined from %s", rank, addr[0])

        def lost(reason: str) -> None:
            if self.lost is None:
                self.lost = f"node {rank} lost ({reason})"
                log.error("%s", self.lost)

        _pump(conn, lost)

    def close(self) -> None:
        self._sock.close()


class NodeLink:
    """A node r > 0's side: connects to node 0 (retrying until `timeout_s`); `lost` once it is gone."""

    def __init__(self, host: str, port: int, node_rank: int, timeout_s: float):
        self.lost: str | None = None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"cannot reach node 0 at {host}:{port}: {e}") from None
                time.sleep(0.5)
        sock.sendall(f"{node_rank}\n".encode())
        threading.Thread(target=_pump, args=(sock, self._lost), name="node-link", daemon=True).start()

    def _lost(self, reason: str) -> None:
        self.lost = f"node 0 is gone ({reason})"


def local_ranks(args) -> range:
    per = args.tp // args.nnodes
    return range(args.node_rank * per, (args.node_rank + 1) * per)


def tp_init_method(args, workdir: str) -> str:
    return f"tcp://{args.nccl_host}:{args.nccl_port}" if args.nnodes > 1 else f"file://{workdir}/llm.init"


def run_node(args) -> int:
    """A node r > 0: its model ranks only, until node 0 (or one of them) goes away."""
    import signal

    from .launcher import START_TIMEOUT_S, StartupError, new_cluster
    from .router.process import run_model_worker

    link = NodeLink(args.nccl_host, link_port(args), args.node_rank, START_TIMEOUT_S)
    cluster = new_cluster()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    init = tp_init_method(args, cluster.workdir)
    try:
        for r in local_ranks(args):
            cluster.spawn(f"model{r}", run_model_worker, args.log_level, args=args, tp_rank=r, init_method=init)
        for r in local_ranks(args):
            cluster.wait_ready(f"model{r}")
        print(f"mmserver node {args.node_rank}/{args.nnodes} ready: ranks {list(local_ranks(args))}", flush=True)
        while not stop.is_set():
            reason = link.lost or cluster.dead()
            if reason:
                log.warning("node %d stopping: %s", args.node_rank, reason)
                return 0 if link.lost else 1
            stop.wait(0.25)
        return 0
    except StartupError as e:
        print(f"mmserver: start-up failed: {e}", flush=True)
        return 1
    finally:
        cluster.shutdown()
