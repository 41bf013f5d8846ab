"""Tensor parallelism across nodes, as two processes on loopback: `--tp 2 --nnodes 2` gives the
single-node outputs token for token; losing node 1 makes node 0 unhealthy within seconds (503s,
no hang), and node 1 exits when node 0 goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import ROOT, alive, children_of, free_port, gen_body, shm_segments, start_server, stop_server

N = 4


def _node(ckpt, rank: int, nccl_port: int, log_path):
    cmd = [sys.executable, "-m", "mmserver.api_server", "--model_dir", str(ckpt), "--device", "cpu", "--tp", "2",
           "--nnodes", "2", "--node_rank", str(rank), "--nccl_host", "127.0.0.1", "--nccl_port", str(nccl_port),
           "--enable_multimodal", "--max_total_token_num", "8192"]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _nccl_port() -> int:
    while True:  # the watchdog takes the next port too
        p = free_port()
        if p < 65000:
            return p


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


def test_tp_across_two_nodes(ckpt, tmp_path):
    pipe = pipeline(ckpt, device="cpu", dtype="float32")
    cases = [("Hello there, tell me a story.", []),
             ("<image>\nWhat is this?", [random_image(448, 448, 91)]),
             ("Image-1: <image>\nImage-2: <image>\nCompare.", [random_image(300, 800, 92), random_image(640, 480, 93)])]
    port = _nccl_port()
    node1 = _node(ckpt, 1, port, tmp_path / "node1.log")
    srv = None
    try:
        srv = start_server(ckpt, "--tp", "2", "--nnodes", "2", "--node_rank", "0", "--nccl_host", "127.0.0.1",
                           "--nccl_port", str(port), "--enable_multimodal", "--max_total_token_num", "8192",
                           log_dir=tmp_path)
        for prompt, images in cases:
            status, body = srv.post("/generate", gen_body(prompt, images, max_new_tokens=N, ignore_eos=True,
                                                          return_details=True))
            assert status == 200, body
            want = pipe.generate(prompt, images=images,
                                 gen_config=GenerationConfig(max_new_tokens=N, ignore_eos=True)).token_ids
            assert [t["id"] for t in body["tokens"]] == want
        node1_children = children_of(node1.pid)
        assert node1_children  # its model rank
        node1.kill()  # the machine goes away
        node1.wait(10)
        t0 = time.monotonic()
        assert _wait(lambda: srv.get("/health")[0] == 503, 15), srv.get("/health")
        assert time.monotonic() - t0 < 10
        assert "node 1 lost" in json.loads(srv.get("/health")[1])["message"]
        status, body = srv.post("/generate", gen_body("Still there?", max_new_tokens=2), timeout=15)
        assert status == 503, body
        assert _wait(lambda: not any(alive(c) for c in node1_children), 20)
    finally:
        if node1.poll() is None:
            node1.kill()
        if srv is not None:
            stop_server(srv)
            assert _wait(lambda: not any(alive(c) for c in srv.children) and not shm_segments(srv.proc.pid), 20)


def test_other_node_exits_when_node_0_goes_away(ckpt, tmp_path):
    port = _nccl_port()
    node1 = _node(ckpt, 1, port, tmp_path / "node1.log")
    srv = None
    try:
        srv = start_server(ckpt, "--tp", "2", "--nnodes", "2", "--node_rank", "0", "--nccl_host", "127.0.0.1",
                           "--nccl_port", str(port), "--max_total_token_num", "8192", log_dir=tmp_path)
        node1_children = children_of(node1.pid)
        srv.proc.kill()
        srv.proc.wait(10)
        node1.wait(30)  # noticed within the watchdog's silence bound, and stopped its ranks
        # a rank exits at most 3 s after its parent (launcher's orphan rule): wait for that, bounded
        deadline = time.monotonic() + 10
        while [c for c in node1_children if alive(c)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [c for c in node1_children if alive(c)]
    finally:
        if node1.poll() is None:
            node1.kill()
        if srv is not None and srv.proc.poll() is None:
            stop_server(srv)
