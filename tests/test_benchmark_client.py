"""Benchmark tooling: workload generators, the serving client against a fake server, the HF baseline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bw = _load("bench_workloads")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- fake server


class FakeServer:
    """LightLLM-style /generate_stream: validates the request, streams one SSE event per token.

    By arrival order k: k in ``fail`` gets HTTP 500, k in ``cut`` a stream that ends after two
    tokens without a finished event, k in ``short`` one token fewer than asked (but finished).
    """

    def __init__(self, fail: Collection[int] = (), cut: Collection[int] = (), short: Collection[int] = ()) -> None:
        self.fail, self.cut, self.short = set(fail), set(cut), set(short)
        self.port = 0
        self.count = 0
        self.inflight = 0
        self.max_inflight = 0
        self.problems: list[str] = []  # checked by the tests: handler asserts would just look like 500s
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        k = self.count
        self.count += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        released = False

        def release() -> None:
            # Called before the final event goes out: once the client has it, it may send
            # its next request before this handler task resumes.
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1

        try:
            return await self._handle(k, request, release)
        finally:
            release()

    async def _handle(self, k: int, request: web.Request, release: Callable[[], None]) -> web.StreamResponse:
        body = await request.json()
        params, images = body["parameters"], body["multimodal_params"]["images"]
        videos = body["multimodal_params"].get("videos", [])
        inputs: str = body["inputs"]
        if inputs.count("<image>") != len(images) or inputs.count("<video>") != len(videos) \
                or not inputs.endswith("<|im_start|>assistant\n"):
            self.problems.append(f"request {k}: bad inputs {inputs!r}")
        if params.get("ignore_eos") is not True or params.get("do_sample") is not False:
            self.problems.append(f"request {k}: bad parameters {params}")
        hashes, sizes = [], []
        for im in images:
            raw = base64.b64decode(im["data"])
            img = Image.open(io.BytesIO(raw))
            img.load()  # full decode: a truncated PNG fails here
            if im["type"] != "base64" or img.format != "PNG":
                self.problems.append(f"request {k}: bad image {im['type']} {img.format}")
            hashes.append(_sha(raw))
            sizes.append(img.size)
        for v in videos:
            from mmserver.models.video_io import probe

            raw = base64.b64decode(v["data"])
            meta = probe(raw)  # a whole, readable clip (VideoError otherwise: the 500 the test sees)
            hashes.append(_sha(raw))
            sizes.append((meta.width, meta.height))
        n = int(params["max_new_tokens"])
        self.seen.append({"k": k, "inputs": inputs, "hashes": hashes, "sizes": sizes, "max_new_tokens": n})

        if k in self.fail:
            return web.Response(status=500, text="injected failure")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive comment\n\n")
        n -= k in self.short
        for i in range(n):
            if k in self.cut and i == 2:
                return resp  # ends the body without a finished event
            last = i == n - 1
            event = {
                "token": {"id": i + 1, "text": "a", "logprob": -0.1, "special": False,
                          "count_output_tokens": i + 1, "prompt_tokens": 290},
                "generated_text": None, "finished": last, "finish_reason": "length" if last else None,
                "details": None,
            }  # fmt: skip
            prefix = "data:" if i % 2 == 0 else "data: "  # LightLLM omits the space; others add it
            if last:
                release()
            await resp.write(f"{prefix}{json.dumps(event)}\n\n".encode())
            if not last:
                await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp


@contextmanager
def fake_server(**kw: Collection[int]) -> Iterator[FakeServer]:
    srv = FakeServer(**kw)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/generate_stream", srv.handle)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())  # port 0: a free one
        srv.port = runner.addresses[0][1]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30), "fake server did not start"
    try:
        yield srv
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def run_client(port: int, *args: str) -> tuple[dict[str, str], str]:
    cmd = [sys.executable, str(SCRIPTS / "benchmark_serving.py"), "--url", f"http://127.0.0.1:{port}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return bw.parse_result_line(last), proc.stdout


# ------------------------------------------------------------------------- tests


def test_workload_generators() -> None:
    w1 = bw.build_workload("W1", 4, seed=0, progress=False)
    assert len({_sha(r.images[0]) for r in w1}) == 4
    for r in w1:
        img = Image.open(io.BytesIO(r.images[0]))
        assert img.format == "PNG" and img.size == (448, 448) and img.mode == "RGB"
        assert 50_000 < len(r.images[0]) < 600_000  # photo-like, not flat and not pure noise
        assert r.prompt.startswith("<|im_start|>user\n<image>\n") and r.prompt.endswith("<|im_start|>assistant\n")
        assert r.prompt.count("<image>") == 1 and 25 <= len(r.prompt.split()) <= 45
    # Deterministic in the seed, different across seeds.
    assert [x.images[0] for x in bw.build_workload("W1", 2, seed=0, progress=False)] == [r.images[0] for r in w1[:2]]
    assert _sha(bw.build_workload("W1", 1, seed=1, progress=False)[0].images[0]) != _sha(w1[0].images[0])

    w2 = bw.build_workload("W2", 2, seed=0, progress=False)
    assert len({_sha(r.images[0]) for r in w2}) == 2
    assert all(Image.open(io.BytesIO(r.images[0])).size == (1280, 720) for r in w2)
    assert bw.num_tiles(1280, 720) == 9 and bw.num_tiles(448, 448) == 1

    w3 = bw.build_workload("W3", 20, seed=0, progress=False)
    hashes = [_sha(r.images[0]) for r in w3]
    assert len(set(hashes)) == 8 and hashes[0] == hashes[8] == hashes[16]
    assert len({r.image_ids[0] for r in w3}) == 8
    for r in w3:
        assert r.prompt.count("<|im_start|>user") == 2 and r.prompt.count("<|im_start|>assistant") == 2
        assert r.prompt.index("<image>") < r.prompt.index(bw.PRIOR_ANSWER) < r.prompt.index(bw.FOLLOW_UP)
    assert not set(hashes) & {_sha(r.images[0]) for r in w1}  # workloads never share images


def test_serving_benchmark_against_fake_server(tmp_path: Path) -> None:
    out = tmp_path / "w1.json"
    with fake_server() as srv:
        result, stdout = run_client(srv.port, "--workload", "W1", "--num-requests", "8", "--concurrency", "4",
                                    "--output-len", "5", "--warmup", "2", "--json", str(out))  # fmt: skip
    assert srv.problems == []
    assert srv.count == 10  # 2 warmup + 8 measured
    assert 2 <= srv.max_inflight <= 4
    assert all(s["max_new_tokens"] == 5 and s["sizes"] == [(448, 448)] for s in srv.seen)
    assert len({s["hashes"][0] for s in srv.seen}) == 10  # warmup images differ from measured ones

    assert result["workload"] == "W1" and result["requests"] == "8" and result["concurrency"] == "4"
    assert result["errors"] == "0" and result["len_mismatch"] == "0" and result["output_len"] == "5"
    for key in ("req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                "duration_s"):  # fmt: skip
        assert float(result[key]) > 0, key
    assert float(result["output_tok_per_s"]) == pytest.approx(5 * float(result["req_per_s"]), rel=0.02)
    assert "serving benchmark" in stdout

    data = json.loads(out.read_text())
    cfg, m = data["config"], data["metrics"]
    for key in ("url", "workload", "num_requests", "concurrency", "output_len", "seed", "image_sizes", "date",
                "client_host"):  # fmt: skip
        assert key in cfg, key
    assert (cfg["num_requests"], cfg["concurrency"], cfg["output_len"]) == (8, 4, 5)
    assert cfg["image_sizes"] == [[448, 448]] and cfg["distinct_images"] == 8
    assert m["requests"] == 8 and m["completed"] == 8 and m["errors"] == 0 and m["total_output_tokens"] == 40
    assert len(data["requests"]) == 8
    assert all(r["ok"] and r["output_tokens"] == 5 and r["finish_reason"] == "length" for r in data["requests"])
    assert all(r["prompt_tokens"] == 290 and r["ttft_s"] <= r["latency_s"] for r in data["requests"])
    assert data["result_line"] == stdout.strip().splitlines()[-1]


def test_w5_video_workload(tmp_path: Path) -> None:
    """W5: one distinct H.264 clip per request (4 s at 24 fps, 448x448, panning), `<video>` in the
    prompt, sent as multimodal_params.videos."""
    from mmserver.models.video_io import decode_frames, probe

    w5 = bw.build_workload("W5", 3, seed=0, progress=False)
    assert len({_sha(r.videos[0]) for r in w5}) == 3 and all(not r.images for r in w5)
    for r in w5:
        meta = probe(r.videos[0])
        assert (meta.n_frames, meta.fps, meta.width, meta.height) == (96, 24.0, 448, 448)
        assert r.prompt.startswith("<|im_start|>user\n<video>") and r.prompt.count("<video>") == 1
    first, last = decode_frames(w5[0].videos[0], [0, 95])
    assert first.tobytes() != last.tobytes()  # the clip moves
    assert w5[0].videos == bw.build_workload("W5", 1, seed=0, progress=False)[0].videos  # deterministic
    with fake_server() as srv:
        result, _ = run_client(srv.port, "--workload", "W5", "--num-requests", "3", "--concurrency", "2",
                               "--output-len", "4", "--warmup", "0")
    assert srv.problems == []
    assert result["requests"] == "3" and result["errors"] == "0" and result["len_mismatch"] == "0"
    assert sorted(h for seen in srv.seen for h in seen["hashes"]) == sorted(_sha(r.videos[0]) for r in w5)


def test_serving_benchmark_counts_errors(tmp_path: Path) -> None:
    out = tmp_path / "w3.json"
    # Of 8 requests (arrival order): two HTTP 500s, two streams cut before finished, one
    # finished request one token short (a length mismatch, not an error).
    with fake_server(fail={1, 5}, cut={3, 7}, short={6}) as srv:
        result, _ = run_client(srv.port, "--workload", "W3", "--num-requests", "8", "--concurrency", "4",
                               "--output-len", "5", "--json", str(out))  # fmt: skip
    assert srv.problems == [] and srv.count == 8
    assert result["requests"] == "8" and result["errors"] == "4" and result["len_mismatch"] == "1"
    m = json.loads(out.read_text())["metrics"]
    assert m["completed"] == 4 and m["error_kinds"] == {"http_500": 2, "stream_unfinished": 2}
    assert m["total_output_tokens"] == 19  # successful requests only: 5 + 5 + 5 + 4
    assert (m["output_tokens_min"], m["output_tokens_max"]) == (4, 5)


def test_serving_benchmark_all_requests_fail() -> None:
    with fake_server(fail=range(3)) as srv:
        result, _ = run_client(srv.port, "--workload", "W1", "--num-requests", "3", "--concurrency", "2",
                               "--output-len", "2")  # fmt: skip
    assert result["errors"] == "3" and result["ttft_p50_ms"] == "null" and float(result["req_per_s"]) == 0


def test_serving_benchmark_server_down(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "down.json"
    result, _ = run_client(port, "--workload", "W1", "--num-requests", "2", "--concurrency", "2",
                           "--output-len", "2", "--json", str(out))  # fmt: skip
    assert result["errors"] == "2" and result["requests"] == "2"
    assert list(json.loads(out.read_text())["metrics"]["error_kinds"]) == ["ClientConnectorError"]


def test_num_tiles_matches_transformers_processor() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,
                                    size={"height": 448, "width": 448})  # fmt: skip
    sizes = [(448, 448), (1280, 720), (800, 600), (300, 1000), (2000, 500)]
    out = proc(images=[Image.new("RGB", s) for s in sizes], return_tensors="pt")
    assert [int(n) for n in out["num_patches"]] == [bw.num_tiles(*s) for s in sizes]


def test_bench_hf_tiny_checkpoint(checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (not a subprocess): saves a second transformers import, which dominates the cost.
    bench_hf = _load("bench_hf")
    ckpt = checkpoints("hf", "qwen2")
    out = tmp_path / "hf.json"
    rc = bench_hf.main(["--model_dir", str(ckpt), "--workload", "W1", "--num-requests", "2", "--batch-size", "2",
                        "--output-len", "3", "--device", "cpu", "--dtype", "float32", "--warmup", "0",
                        "--json", str(out)])  # fmt: skip
    assert rc == 0
    result = bw.parse_result_line(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["requests"] == "2" and result["batch_size"] == "2" and result["errors"] == "0"
    assert result["len_mismatch"] == "0" and float(result["req_per_s"]) > 0
    assert result["ttft_p50_ms"] == result["tpot_p50_ms"] == "null"
    data = json.loads(out.read_text())
    assert data["metrics"]["total_output_tokens"] == 6 and data["metrics"]["ttft_p50_ms"] is None
    assert data["batches"][0]["new_tokens"] == [3, 3]
    assert data["config"]["image_sizes"] == [[448, 448]] and data["config"]["device"] == "cpu"


def test_w4_sessions_resend_their_history():
    sessions = bw.build_sessions(3, 4, seed=0, progress=False)
    s = sessions[0]
    assert [len(t) for t in s.images] == [2, 0, 1, 0]
    assert len({i for x in sessions for t in x.image_ids for i in t}) == 9  # distinct across sessions
    p2, images = s.prompt(["first answer", "second answer"])
    assert p2.count(bw.IMAGE_PLACEHOLDER) == len(images) == 3
    assert p2.startswith(s.prompt([])[0]) and "first answer<|im_end|>" in p2 and p2.endswith("assistant\n")
    assert bw.build_sessions(3, 4, seed=0, progress=False)[2].questions == sessions[2].questions
