#!/usr/bin/env python
"""The HTTP process's intake alone: images → cache references, for N concurrent requests.

    python scripts/bench_intake.py --model_dir ckpt/1b --workload W1 --num-requests 256 --concurrency 64

Starts the embed-cache process and runs, in one uvloop, what the HTTP server does between a
request's arrival and its hand-off to the visual server (base64 decode and header check, md5,
tokenization, cache references, the image bytes written to shared memory), then releases the
references as a finished request does. No model is loaded: this is the `http_intake` stage of
the TTFT breakdown without the GPU processes beside it. Prints intake latency (mean, p50, p99)
and requests/s, and a RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_workloads as bw  # noqa: E402
from mmserver.embed_cache.process import run_cache  # noqa: E402
from mmserver.embed_cache.service import CacheClient  # noqa: E402
from mmserver.frontend.intake import Intake, IntakeLimits  # noqa: E402
from mmserver.http.schemas import ImageSpec  # noqa: E402
from mmserver.models.registry import load_family  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="any checkpoint: only its config and tokenizer are read")
    p.add_argument("--workload", default="W1", choices=bw.IMAGE_WORKLOADS)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--hold-ms", type=float, default=0.0,
                   help="how long a request keeps its references after its intake (its generation)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace, family, socket_path: str, bodies: list[tuple[str, list[str]]]) -> list[float]:
    session = aiohttp.ClientSession()
    cache = CacheClient(socket_path)
    intake = Intake(family, IntakeLimits(32 << 20, 10.0, None, 1 << 20, 10.0), cache, session)
    latencies: list[float] = []
    todo = iter(bodies)
    bar = tqdm(total=len(bodies), desc="intake", unit="req", file=sys.stderr)

    async def one(prompt: str, images: list[str]) -> None:
        start = time.perf_counter()
        specs = [ImageSpec("base64", data) for data in images]
        prepared = await intake.load_images(specs, {})
        intake.tokenize(prompt, prepared)
        refs = await intake.take_cache_refs(prepared)
        latencies.append(time.perf_counter() - start)
        bar.update()
        if args.hold_ms:
            await asyncio.sleep(args.hold_ms / 1e3)
        await intake.release(refs)

    async def worker() -> None:
        for prompt, images in todo:
            await one(prompt, images)

    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        bar.close()
        intake.close()
        cache.close()
        await session.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = bw.build_workload(args.workload, args.num_requests)
    bodies = [(r.prompt.replace(bw.IMAGE_PLACEHOLDER, "<image>"),
               [base64.b64encode(png).decode("ascii") for png in r.images]) for r in requests]
    family = load_family(args.model_dir)
    cfg = family.config
    socket_path = os.path.join(tempfile.mkdtemp(prefix="bench-intake-"), "cache.sock")
    ready = mp.Event()
    proc = mp.Process(target=run_cache, daemon=True,
                      args=(ready.set, f"mmbench{os.getpid()}-", socket_path, cfg.llm.hidden_size, 2,
                            max(200, args.concurrency * 2), 8 << 30))
    proc.start()
    if not ready.wait(30):
        raise SystemExit("the cache process did not start")
    try:
        start = time.perf_counter()
        lat = uvloop.run(run(args, family, socket_path, bodies))
        duration = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.join()
    ms = [x * 1e3 for x in lat]
    fields = [("workload", args.workload, 0), ("requests", len(ms), 0), ("concurrency", args.concurrency, 0),
              ("req_per_s", len(ms) / duration, 1), ("intake_mean_ms", sum(ms) / len(ms), 2),
              ("intake_p50_ms", bw.percentile(ms, 50), 2), ("intake_p99_ms", bw.percentile(ms, 99), 2)]
    print(bw.result_line(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
