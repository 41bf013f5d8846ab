#!/usr/bin/env python
"""Load-test a LightLLM-compatible ``/generate_stream`` endpoint with multimodal requests.

All payloads (images, base64, JSON bodies) are built before the clock starts. Then
``--concurrency`` workers share one aiohttp session and send ``--num-requests`` streaming
requests with ``ignore_eos`` and ``max_new_tokens=--output-len``. Per request it records
TTFT (send -> first token event), TPOT ((last - first token time) / (tokens - 1)),
end-to-end latency and the number of token events; failures (non-200, broken or
unfinished streams, error events) are counted, never fatal.

The last stdout line is ``RESULT key=value ...``; ``--json`` writes the same numbers plus
the run configuration and per-request records. req/s and tok/s count successful requests
only, over the wall time from the first send to the last completion.

Example::

    python scripts/benchmark_serving.py --url http://127.0.0.1:8000 --workload W1 \\
        --num-requests 256 --concurrency 64 --output-len 128 --json w1.json

W4 (multi-turn sessions, for the KV prefix cache): ``--num-requests`` is the number of sessions,
``--concurrency`` the sessions in flight, ``--turns`` their turns; each turn re-sends the whole
conversation with the answers the server gave (its final ``generated_text``). It also reports
TTFT per turn and the fraction of prompt tokens served from the cache (``prompt_cache_len``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as `python scripts/x.py` or imported
import bench_workloads as bw  # noqa: E402

MAX_ERROR_SAMPLES = 10


@dataclass
class RequestResult:
    index: int
    ok: bool
    status: int | None = None
    error: str | None = None  # short kind, e.g. "http_500", "stream_unfinished"
    detail: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    prompt_cache_len: int | None = None  # from the final event (a server with a prefix cache)
    generated_text: str | None = None
    session: int | None = None  # W4
    turn: int | None = None


# ----------------------------------------------------------------------- payloads


def build_bodies(requests: list[bw.BenchRequest], output_len: int, progress: bool = True) -> list[bytes]:
    """Serialised JSON bodies; base64 is computed once per distinct image."""
    b64: dict[int, str] = {}
    bodies = []
    it = tqdm(requests, desc="payloads", unit="req", file=sys.stderr, disable=not progress)
    for req in it:
        def items(ids: list[int], data: list[bytes]) -> list[dict]:
            out = []
            for item_id, raw in zip(ids, data):
                if item_id not in b64:
                    b64[item_id] = base64.b64encode(raw).decode("ascii")
                out.append({"type": "base64", "data": b64[item_id]})
            return out

        media = {"images": items(req.image_ids, req.images)}
        if req.videos:  # W5 (ids never overlap an image's: one workload per run)
            media["videos"] = items(req.video_ids, req.videos)
        body = {
            "inputs": req.prompt,
            "parameters": {"max_new_tokens": output_len, "do_sample": False, "ignore_eos": True},
            "multimodal_params": media,
        }
        bodies.append(json.dumps(body).encode("utf-8"))
    return bodies


def stream_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/generate_stream") else url + "/generate_stream"


# ------------------------------------------------------------------------ client


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The JSON of one SSE ``data:`` line (with or without a space); None for other lines."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None  # blank separators, ``event:``/``id:`` fields, ``:`` comments
    payload = text[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    obj = json.loads(payload)
    return obj if isinstance(obj, dict) else None


async def drain(resp: aiohttp.ClientResponse, timeout_s: float = 5.0) -> None:
    """Read what follows the finished event so the keep-alive connection goes back to the pool
    (an unread body closes it); a server that keeps the stream open only costs the connection."""
    try:
        await asyncio.wait_for(resp.content.read(), timeout_s)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass


async def send_request(session: aiohttp.ClientSession, url: str, index: int, body: bytes) -> RequestResult:
    res = RequestResult(index=index, ok=False)
    token_times: list[float] = []
    finished = False
    start = end = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"http_{resp.status}"
                res.detail = (await resp.text(errors="replace"))[:200]
                return res
            async for line in resp.content:
                event = parse_event(line)
                if event is None:
                    continue
                if event.get("error"):
                    res.error, res.detail = "error_event", str(event["error"])[:200]
                    return res
                token = event.get("token")
                if token is not None:
                    token_times.append(time.perf_counter())
                    if isinstance(token, dict) and token.get("prompt_tokens") is not None:
                        res.prompt_tokens = token["prompt_tokens"]
                if event.get("finished"):
                    finished, end = True, time.perf_counter()
                    res.finish_reason = event.get("finish_reason")
                    res.prompt_cache_len = event.get("prompt_cache_len")
                    res.generated_text = event.get("generated_text")
                    break
            if finished:
                await drain(resp)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: bad JSON
        res.error, res.detail = type(exc).__name__, str(exc)[:200]
        return res
    res.output_tokens = len(token_times)
    if not finished:
        res.error = "stream_unfinished"
        res.detail = f"stream ended after {len(token_times)} token events without finished=true"
        return res
    res.ok = True
    res.latency_s = end - start
    if token_times:
        res.ttft_s = token_times[0] - start
    if len(token_times) > 1:
        res.tpot_s = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return res


async def run_requests(
    url: str, bodies: list[bytes], concurrency: int, timeout_s: float, desc: str
) -> tuple[list[RequestResult], float]:
    """Send all bodies with ``concurrency`` workers; returns results (in index order) and wall time."""
    results: list[RequestResult | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    errors = 0
    bar = tqdm(total=len(bodies), desc=desc, unit="req", file=sys.stderr)
    # No total timeout: queueing at high concurrency is legitimate; only a stalled socket fails.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in next_index:  # shared iterator: each index is taken by exactly one worker
            res = await send_request(session, url, i, bodies[i])
            results[i] = res
            errors += not res.ok
            bar.set_postfix(errors=errors, refresh=False)
            bar.update(1)

    # Large read buffer: a final event may carry the whole generated_text.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=2**20) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, len(bodies)))))
        duration = time.perf_counter() - start
    bar.close()
    return [r for r in results if r is not None], duration


async def run_sessions(url: str, sessions: list[bw.BenchSession], output_len: int, concurrency: int,
                       timeout_s: float) -> tuple[list[RequestResult], float]:
    """W4: ``concurrency`` workers, each running whole sessions turn by turn (a turn is sent once
    the previous one has answered). A failed turn ends its session."""
    results: list[RequestResult] = []
    next_session = iter(sessions)
    bar = tqdm(total=sum(len(s.questions) for s in sessions), desc="W4", unit="turn", file=sys.stderr)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s)

    async def worker(session: aiohttp.ClientSession) -> None:
        for s in next_session:
            answers: list[str] = []
            for t in range(len(s.questions)):
                prompt, images = s.prompt(answers)
                body = json.dumps({"inputs": prompt,
                                   "parameters": {"max_new_tokens": output_len, "do_sample": False, "ignore_eos": True},
                                   "multimodal_params": {"images": [
                                       {"type": "base64", "data": base64.b64encode(png).decode("ascii")}
                                       for png in images]}}).encode()
                res = await send_request(session, url, len(results), body)
                res.session, res.turn = s.index, t
                results.append(res)
                bar.update(1)
                if not res.ok:
                    break
                answers.append(res.generated_text or "")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout,
                                     read_bufsize=2**20) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, len(sessions)))))
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def summarize_sessions(results: list[RequestResult]) -> dict[str, Any]:
    """W4's extra numbers: TTFT per turn, and prompt tokens served from the prefix cache."""
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.prompt_cache_len or 0 for r in ok)
    out: dict[str, Any] = {"prompt_tokens_total": prompt, "prompt_cache_tokens_total": cached,
                           "prompt_tokens_computed": prompt - cached,
                           "prompt_cache_frac": cached / prompt if prompt else None}
    for t in sorted({r.turn for r in ok}):
        ttft = [r.ttft_s for r in ok if r.turn == t and r.ttft_s is not None]
        out[f"ttft_turn{t + 1}_mean_ms"] = bw.scaled(sum(ttft) / len(ttft), 1000.0) if ttft else None
    return out


# ----------------------------------------------------------------------- summary


def summarize(results: list[RequestResult], duration: float, output_len: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    ms = 1000.0
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "len_mismatch": sum(r.output_tokens != output_len for r in ok),
        "duration_s": duration,
        "req_per_s": len(ok) / duration if duration > 0 else None,
        "output_tok_per_s": out_tokens / duration if duration > 0 else None,
        "total_output_tokens": out_tokens,
        "output_tokens_min": min((r.output_tokens for r in ok), default=None),
        "output_tokens_max": max((r.output_tokens for r in ok), default=None),
        "ttft_mean_ms": bw.scaled(sum(ttft) / len(ttft), ms) if ttft else None,
        "ttft_p50_ms": bw.scaled(bw.percentile(ttft, 50), ms),
        "ttft_p99_ms": bw.scaled(bw.percentile(ttft, 99), ms),
        "tpot_mean_ms": bw.scaled(sum(tpot) / len(tpot), ms) if tpot else None,
        "tpot_p50_ms": bw.scaled(bw.percentile(tpot, 50), ms),
        "tpot_p99_ms": bw.scaled(bw.percentile(tpot, 99), ms),
        "latency_p50_ms": bw.scaled(bw.percentile(lat, 50), ms),
        "latency_p99_ms": bw.scaled(bw.percentile(lat, 99), ms),
    }


def report(args: argparse.Namespace, m: dict[str, Any], results: list[RequestResult]) -> str:
    def trio(prefix: str, digits: int, keys: tuple[str, ...] = ("mean", "p50", "p99")) -> str:
        return " / ".join(bw.fmt(m[f"{prefix}_{k}_ms"], digits) for k in keys)

    turns = sorted(k for k in m if k.startswith("ttft_turn"))
    w4 = [("prompt tokens / from cache / computed",
           f"{m['prompt_tokens_total']} / {m['prompt_cache_tokens_total']} / {m['prompt_tokens_computed']}"),
          ("prompt cache fraction", bw.fmt(m["prompt_cache_frac"], 3)),
          ("TTFT mean per turn (ms)", " / ".join(bw.fmt(m[k], 1) for k in turns))] if turns else []
    rows = [
        ("workload", f"{args.workload} ({bw.WORKLOADS[args.workload].description})"),
        ("requests / completed / errors", f"{m['requests']} / {m['completed']} / {m['errors']}"),
        ("concurrency", str(args.concurrency)),
        ("output len (expected)", str(args.output_len)),
        ("output tokens min / max", f"{bw.fmt(m['output_tokens_min'])} / {bw.fmt(m['output_tokens_max'])}"),
        ("token count mismatches", str(m["len_mismatch"])),
        ("duration (s)", bw.fmt(m["duration_s"])),
        ("requests/s", bw.fmt(m["req_per_s"])),
        ("output tokens/s", bw.fmt(m["output_tok_per_s"], 1)),
        ("TTFT mean / p50 / p99 (ms)", trio("ttft", 1)),
        ("TPOT mean / p50 / p99 (ms)", trio("tpot", 2)),
        ("latency p50 / p99 (ms)", trio("latency", 1, ("p50", "p99"))),
    ] + w4  # fmt: skip
    if m["errors"]:
        rows.append(("error kinds", ", ".join(f"{k}={v}" for k, v in sorted(m["error_kinds"].items()))))
    bw.print_table(rows, "serving benchmark")
    for r in [r for r in results if not r.ok][:MAX_ERROR_SAMPLES]:
        print(f"  error request={r.index} kind={r.error} detail={r.detail!r}")
    return bw.result_line([
        ("workload", args.workload, 0), ("requests", m["requests"], 0), ("concurrency", args.concurrency, 0),
        ("req_per_s", m["req_per_s"], 2), ("output_tok_per_s", m["output_tok_per_s"], 1),
        ("ttft_p50_ms", m["ttft_p50_ms"], 1), ("ttft_p99_ms", m["ttft_p99_ms"], 1),
        ("tpot_p50_ms", m["tpot_p50_ms"], 2), ("tpot_p99_ms", m["tpot_p99_ms"], 2),
        ("errors", m["errors"], 0), ("duration_s", m["duration_s"], 2),
        ("output_len", args.output_len, 0), ("len_mismatch", m["len_mismatch"], 0),
    ] + ([("prompt_cache_frac", m["prompt_cache_frac"], 3), ("prompt_tokens_computed", m["prompt_tokens_computed"], 0)]
         + [(k.removesuffix("_mean_ms") + "_ms", m[k], 1) for k in turns] if turns else []))  # fmt: skip


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL (or the full /generate_stream URL)")
    bw.add_workload_args(p, "--concurrency", "requests in flight at once")
    p.add_argument("--warmup", type=int, default=0, help="uncounted requests sent first (distinct images)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request socket read timeout (s)")
    p.add_argument("--turns", type=int, default=4, help="W4: turns per session")
    args = p.parse_args(argv)
    bw.check_positive(p, args, ("num_requests", "concurrency", "output_len"))
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = stream_url(args.url)
    if args.workload == "W4":
        return main_sessions(args, url)
    requests = bw.build_workload(args.workload, args.num_requests, args.seed, args.prompt_tokens)
    bodies = build_bodies(requests, args.output_len)
    if args.warmup:
        # Another seed: warmup must not pre-load the measured images into a server-side cache.
        warm = bw.build_workload(args.workload, args.warmup, args.seed + 1_000_003, args.prompt_tokens)
        warm_results, _ = asyncio.run(
            run_requests(url, build_bodies(warm, args.output_len, False), args.concurrency, args.timeout, "warmup")
        )
        warm_errors = sum(not r.ok for r in warm_results)
        if warm_errors:
            print(f"warning: {warm_errors}/{len(warm_results)} warmup requests failed", file=sys.stderr)

    results, duration = asyncio.run(run_requests(url, bodies, args.concurrency, args.timeout, args.workload))
    metrics = summarize(results, duration, args.output_len)
    line = report(args, metrics, results)

    if args.json is not None:
        sizes = sorted({s for r in requests for s in r.image_sizes})
        pngs = [png for r in requests for png in r.images]
        config = {
            "url": url, "workload": args.workload, "num_requests": args.num_requests,
            "concurrency": args.concurrency, "output_len": args.output_len, "seed": args.seed,
            "prompt_tokens": args.prompt_tokens, "warmup": args.warmup,
            "image_sizes": [list(s) for s in sizes],
            "distinct_images": len({i for r in requests for i in r.image_ids}),
            "mean_image_bytes": sum(map(len, pngs)) / max(1, len(pngs)),
            **({"clip": list(bw.WORKLOADS[args.workload].clip),
                "distinct_videos": len({i for r in requests for i in r.video_ids}),
                "mean_video_bytes": sum(len(v) for r in requests for v in r.videos) / len(requests)}
               if bw.WORKLOADS[args.workload].clip else {}),
            "aiohttp": aiohttp.__version__, **bw.run_info(),
        }  # fmt: skip
        out = {"backend": "serving", "config": config, "metrics": metrics, "result_line": line,
               "requests": [asdict(r) for r in results]}  # fmt: skip
        bw.write_report(args.json, out)
    print(line, flush=True)
    return 0


def main_sessions(args: argparse.Namespace, url: str) -> int:
    sessions = bw.build_sessions(args.num_requests, args.turns, args.seed, args.prompt_tokens)
    if args.warmup:  # other images, and sessions of their own
        warm = bw.build_sessions(args.warmup, args.turns, args.seed + 1_000_003, args.prompt_tokens, False)
        asyncio.run(run_sessions(url, warm, args.output_len, args.concurrency, args.timeout))
    results, duration = asyncio.run(run_sessions(url, sessions, args.output_len, args.concurrency, args.timeout))
    metrics = {**summarize(results, duration, args.output_len), **summarize_sessions(results)}
    line = report(args, metrics, results)
    if args.json is not None:
        config = {"url": url, "workload": "W4", "sessions": args.num_requests, "turns": args.turns,
                  "concurrency": args.concurrency, "output_len": args.output_len, "seed": args.seed,
                  "prompt_tokens": args.prompt_tokens, "warmup": args.warmup, **bw.run_info()}
        bw.write_report(args.json, {"backend": "serving", "config": config, "metrics": metrics, "result_line": line,
                                    "requests": [asdict(r) for r in results]})
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
