"""Worker failures and a full embedding cache: prompt errors, never a hang."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import child_named, gen_body, hang_up, start_server, stop_server


def _open_stream(server, body) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    return conn


@pytest.mark.parametrize("worker", ["visual", "router"])
def test_killed_worker_fails_requests_promptly(ckpt, tmp_path, worker):
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "8192", log_dir=tmp_path)
    try:
        conn = _open_stream(srv, gen_body("Talk for a long time.", max_new_tokens=5000, ignore_eos=True))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data:")
        os.kill(child_named(srv, worker), signal.SIGKILL)
        t0 = time.monotonic()
        rest = resp.read().decode()  # the open stream ends with an error event, not a hang
        assert '"error"' in rest and time.monotonic() - t0 < 10
        conn.close()
        status, body = srv.post("/generate", gen_body("<image>\nhi", [random_image(64, 64)], max_new_tokens=2),
                                timeout=10)
        assert status == 503 and "unhealthy" in body["message"]
        status, text = srv.get("/health")
        assert status == 503 and worker in text
    finally:
        stop_server(srv)


def test_full_cache_waits_then_503_and_never_evicts_in_use(ckpt, tmp_path):
    pipe = pipeline(ckpt, device="cpu", dtype="float32")
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "16384", "--cache_capacity", "1",
                       "--cache_wait_s", "3", log_dir=tmp_path)
    try:
        held_img, other_img = random_image(448, 448, 41), random_image(600, 300, 42)
        # A long stream holds the only cache record.
        conn = _open_stream(srv, gen_body("<image>\nHold.", [held_img], max_new_tokens=5000, ignore_eos=True))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data:")
        t0 = time.monotonic()
        status, body = srv.post("/generate", gen_body("<image>\nNext.", [other_img], max_new_tokens=2))
        assert status == 503 and "cache is full" in body["message"]
        status, body = srv.post("/generate", {"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "file", "data": "/etc/passwd"}]}})  # no --allowed_local_media_path on this server
        assert status == 400 and "local files are disabled" in body["message"]
        assert 2.5 < time.monotonic() - t0 < 15  # waited its bounded time, then gave up
        # The held image was not evicted: the same image is a hit and gives the pipeline's tokens.
        m0 = srv.metrics()
        status, body = srv.post("/generate", gen_body("<image>\nHold.", [held_img], max_new_tokens=3,
                                                      ignore_eos=True, return_details=True))
        assert status == 200
        assert srv.metrics()["mmserver_embed_cache_hits_total"] == m0["mmserver_embed_cache_hits_total"] + 1
        want = pipe.generate("<image>\nHold.", images=[held_img],
                             gen_config=GenerationConfig(max_new_tokens=3, ignore_eos=True)).token_ids
        assert [t["id"] for t in body["tokens"]] == want
        hang_up(conn, resp)
        assert srv.wait_metric("mmserver_embed_cache_in_use", 0) == 0
        # Now two requests with different images take turns in the one-record cache.
        bodies = [gen_body("<image>\nA.", [other_img], max_new_tokens=2, ignore_eos=True, return_details=True),
                  gen_body("<image>\nB.", [random_image(300, 600, 43)], max_new_tokens=2, ignore_eos=True,
                           return_details=True)]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda b: srv.post("/generate", b), bodies))
        assert [s for s, _ in results] == [200, 200]
        assert srv.metrics()["mmserver_embed_cache_evictions_total"] >= 2
    finally:
        stop_server(srv)


@pytest.mark.parametrize("case", ["bad_flag", "no_checkpoint", "bad_image_length", "worker_fails_to_load"])
def test_startup_failure_exits_nonzero_with_cause(ckpt, tmp_path, case):
    import shutil
    import subprocess
    import sys

    env = None
    if case == "bad_flag":
        argv, want = ["--model_dir", str(ckpt), "--visual_dp", "0"], "--visual_dp must be >= 1"
    elif case == "no_checkpoint":
        argv, want = ["--model_dir", str(tmp_path)], "no config.json"
    elif case == "bad_image_length":
        argv, want = ["--model_dir", str(ckpt)], "INTERNVL_IMAGE_LENGTH=7 disagrees"
        env = {**os.environ, "INTERNVL_IMAGE_LENGTH": "7"}
    else:  # the config is fine, a weight shard is not: the workers fail while loading
        broken = tmp_path / "ckpt"
        shutil.copytree(ckpt, broken)
        shard = sorted(broken.glob("*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[:1000])
        argv, want = ["--model_dir", str(broken), "--enable_multimodal", "--device", "cpu"], "cannot read weight file"
    proc = subprocess.run([sys.executable, "-m", "mmserver.api_server", *argv], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 1
    assert "start-up failed" in proc.stderr and want in proc.stderr


def test_killed_server_leaves_no_workers_or_segments(ckpt, tmp_path):
    from server_util import alive, shm_segments

    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "8192", log_dir=tmp_path)
    assert srv.post("/generate", gen_body("<image>\nhi", [random_image(448, 448, 61)], max_new_tokens=2))[0] == 200
    pid = srv.proc.pid
    assert shm_segments(pid)
    srv.proc.kill()  # no chance to clean up: the children must notice and do it
    srv.proc.wait(10)
    deadline = time.monotonic() + 20
    while (any(alive(c) for c in srv.children) or shm_segments(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in srv.children if alive(c)]
    assert shm_segments(pid) == []
