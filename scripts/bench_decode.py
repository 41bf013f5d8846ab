#!/usr/bin/env python
"""Decode step time of the engine: B synthetic requests decoding together, in ms per step.

    python scripts/bench_decode.py --model_dir ckpt/1b --batch-sizes 1,8,64 --steps 50 [--no-graphs]

Loads only the LLM, as the router does, into one Engine sized for the largest batch (CUDA graphs
are captured at its construction unless --no-graphs). For each batch size B it adds B requests
of --prompt-len random token ids (ignore_eos, long enough not to finish), runs their prefill and
--warmup decode steps, then times --steps engine steps. Every step ends in the one sync that
reads sampled tokens (the previous step's with the overlap schedule), so wall time per step is
its whole cost: scheduling, the input copy, the forward (graph replay or eager), sampling.
`--overlap both` times each batch size without, then with the overlap schedule (the baseline in
the same run). Prints a table and, last, a RESULT line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmserver.engine.engine import Engine, EngineConfig  # noqa: E402
from mmserver.engine.sampling import SamplingParams  # noqa: E402
from mmserver.models.internvl.config import load_config  # noqa: E402
from mmserver.models.internvl.weights import load_weights  # noqa: E402
from mmserver.models.llm.decoder import DecoderLM  # noqa: E402
from mmserver.pipeline import resolve_device, resolve_dtype  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--batch-sizes", default="1,8,64", help="comma-separated decode batch sizes")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps first")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-req-len", type=int, default=None,
                   help="the engine's max_req_len (graphs fix the decode kernel's split count from it); "
                        "default: just enough for the run. The server's default is 16384")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly")
    p.add_argument("--overlap", choices=["auto", "on", "off", "both"], default="auto",
                   help="the engine's overlap schedule (auto: on with CUDA); both: off then on, per batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's dtype on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="the device's memory bandwidth for the weight-bandwidth floor; default: the "
                        "datasheet figure for a known GPU (H100 SXM 3350, H200 4800), else measured")
    p.add_argument("--profile", action="store_true",
                   help="also profile 10 steps of the first batch size: device time per step and the top kernels")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


DATASHEET_GBS = {"H100 80GB HBM3": 3350.0, "H100": 3350.0, "H200": 4800.0}


def weight_bytes_per_step(weights: dict[str, torch.Tensor]) -> int:
    """Bytes of weights one decode step reads: every LLM tensor once, less the embedding table
    (a step gathers B rows of it), unless the LM head is that same tensor."""
    seen, total = set(), 0
    for name, t in weights.items():
        if not name.startswith("llm.") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    embed, head = weights["llm.embed.weight"], weights["llm.lm_head.weight"]
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def measured_bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth of a 4 GiB reduction: near what a weight-streaming GEMV can reach."""
    x = torch.empty(2 << 30, dtype=torch.bfloat16, device=device).fill_(1.0)
    x.sum()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        x.sum()
    sync(device)
    gbs = x.numel() * 2 * 5 / (time.perf_counter() - t0) / 1e9
    del x
    torch.cuda.empty_cache()
    return gbs


def profile_steps(eng: Engine, batch: int, args: argparse.Namespace, vocab: int, steps: int = 10) -> None:
    """Kernel time per step against wall time per step: the gap is host work the GPU waits for."""
    from torch.profiler import ProfilerActivity, profile

    quick = argparse.Namespace(**{**vars(args), "steps": 3, "warmup": 2})
    params = SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)
    rng = np.random.default_rng(1)
    rids = [eng.add_request(rng.integers(100, min(vocab, 10000), size=quick.prompt_len).tolist(), params)
            for _ in range(batch)]
    while any(eng.requests[r].num_cached < quick.prompt_len for r in rids):
        eng.step()
    for _ in range(3):
        eng.step()
    sync(eng.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync(eng.device)
        wall = (time.perf_counter() - start) / steps * 1e3
    for r in rids:
        eng.abort(r)
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels) / 1e3 / steps
    print(f"\nprofile, batch {batch}: wall {wall:.2f} ms/step, kernels {total:.2f} ms/step "
          f"(the rest, {wall - total:.2f} ms, the GPU waits for the host)")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:15]:
        print(f"  {e.device_time_total / 1e3 / steps:7.3f} ms/step  {e.count // steps:4d}x  {e.key[:90]}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(eng: Engine, batch: int, args: argparse.Namespace, vocab: int) -> dict:
    rng = np.random.default_rng(args.seed + batch)
    params = SamplingParams(max_new_tokens=args.warmup + args.steps + 2, ignore_eos=True)
    rids = [eng.add_request(rng.integers(100, min(vocab, 10000), size=args.prompt_len).tolist(), params)
            for _ in range(batch)]
    while any(eng.requests[r].num_cached < args.prompt_len for r in rids):  # prefill
        eng.step()
    for _ in range(args.warmup):
        eng.step()
    replays = eng.graphs.replays if eng.graphs else 0
    sync(eng.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        outs = eng.step()
        assert len(outs) == batch, f"expected {batch} tokens per step, got {len(outs)}"
    sync(eng.device)
    elapsed = time.perf_counter() - start
    replays = (eng.graphs.replays if eng.graphs else 0) - replays
    for r in rids:
        eng.abort(r)
    ms = elapsed / args.steps * 1e3
    return {"batch": batch, "overlap": eng.overlap, "ms_per_step": ms, "tok_per_s": batch / ms * 1e3,
            "graph_steps": replays}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    device = resolve_device(args.device)
    cfg = load_config(args.model_dir)
    dtype = resolve_dtype(args.dtype, device, cfg.torch_dtype)
    weights = load_weights(args.model_dir, cfg, device=device, dtype=dtype, progress=False, components=("llm",))
    llm = DecoderLM(cfg.llm, weights)
    per_request = args.prompt_len + args.warmup + args.steps + 8
    config = EngineConfig(max_total_tokens=max(sizes) * per_request + 1, max_requests=max(sizes),
                          max_req_len=args.max_req_len or per_request,
                          batch_max_tokens=max(8192, args.prompt_len), cuda_graphs=not args.no_graphs)
    start = time.perf_counter()
    eng = Engine(llm, config)
    setup_s = time.perf_counter() - start
    mode = "graphs" if eng.graphs is not None else "eager"
    if not args.no_graphs and eng.graphs is None:
        print("note: CUDA graphs were requested but are off (CPU, MMSERVER_CUDA_GRAPHS=0 or a failed capture)")
    schedules = {"on": [True], "off": [False], "both": [False, True], "auto": [eng.overlap]}[args.overlap]
    results = []
    for b in sizes:
        for overlap in schedules:
            eng.overlap = overlap
            results.append(bench_one(eng, b, args, cfg.llm.vocab_size))
            print(f"batch {b:>4} overlap {'on ' if overlap else 'off'}: {results[-1]['ms_per_step']:.2f} ms/step",
                  flush=True)
    if args.profile and eng.device.type == "cuda":
        try:
            profile_steps(eng, sizes[0], args, cfg.llm.vocab_size)
        except Exception as e:  # a diagnostic: never lose the timings above to it
            print(f"profile failed: {type(e).__name__}: {e}")

    name = torch.cuda.get_device_name(eng.device) if eng.device.type == "cuda" else "cpu"
    print(f"\ndecode step time: {name}, {dtype}, mode={mode}, prompt {args.prompt_len}, "
          f"max_req_len {config.max_req_len}, engine set-up {setup_s:.2f} s")
    print(f"{'batch':>6} {'overlap':>8} {'ms/step':>9} {'tok/s':>10} {'graph steps':>12}")
    for r in results:
        print(f"{r['batch']:>6} {'on' if r['overlap'] else 'off':>8} {r['ms_per_step']:>9.2f} {r['tok_per_s']:>10.0f} "
              f"{r['graph_steps']:>12}")
    floor = {}
    if eng.device.type == "cuda":
        nbytes = weight_bytes_per_step(weights)
        measured = measured_bandwidth_gbs(eng.device)
        sheet = args.bandwidth_gbs or next((v for k, v in DATASHEET_GBS.items() if k in name), None)
        floor = {"weight_bytes": nbytes, "measured_gbs": measured, "datasheet_gbs": sheet,
                 "floor_ms": nbytes / ((sheet or measured) * 1e9) * 1e3}
        # batch 1 with the last schedule run: the server's (overlap on) under --overlap both
        floor["b1_over_floor"] = ([r for r in results if r["batch"] == 1][-1]["ms_per_step"] / floor["floor_ms"]
                                  if sizes[0] == 1 else None)
        print(f"weights read per step {nbytes / 1e9:.2f} GB; bandwidth: datasheet {sheet} GB/s, measured "
              f"(4 GiB read) {measured:.0f} GB/s; floor {floor['floor_ms']:.2f} ms"
              + (f"; batch 1 = {floor['b1_over_floor']:.2f}x the floor" if floor["b1_over_floor"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": name, "mode": mode,
                                               "setup_s": setup_s, "results": results, "floor": floor}, indent=2))
    print("RESULT " + " ".join([f"mode={mode}"] + [f"b{r['batch']}{'' if r['overlap'] else '_nooverlap'}_ms="
                                                   f"{r['ms_per_step']:.3f}" for r in results]
                               + ([f"floor_ms={floor['floor_ms']:.3f}"] if floor else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
