#!/usr/bin/env python
"""Decode step time of the engine: B synthetic requests decoding together, in ms per step.

    python scripts/bench_decode.py --model_dir ckpt/1b --batch-sizes 1,8,64 --steps 50 [--no-graphs]

Loads only the LLM, as the router does, into one Engine sized for the largest batch (CUDA graphs
are captured at its construction unless --no-graphs). For each batch size B it adds B requests
of --prompt-len random token ids (ignore_eos, long enough not to finish), runs their prefill and
--warmup decode steps, then times --steps engine steps. Every step ends in the one sync that
reads the sampled tokens, so wall time per step is its whole cost: scheduling, the input copy,
the forward (graph replay or eager), sampling. Prints a table and, last, a RESULT line.
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
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's dtype on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


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
    return {"batch": batch, "ms_per_step": ms, "tok_per_s": batch / ms * 1e3, "graph_steps": replays}


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
    eng = Engine(llm, config, image_token_id=-1)
    setup_s = time.perf_counter() - start
    mode = "graphs" if eng.graphs is not None else "eager"
    if not args.no_graphs and eng.graphs is None:
        print("note: CUDA graphs were requested but are off (CPU, MMSERVER_CUDA_GRAPHS=0 or a failed capture)")
    results = [bench_one(eng, b, args, cfg.llm.vocab_size) for b in sizes]

    name = torch.cuda.get_device_name(eng.device) if eng.device.type == "cuda" else "cpu"
    print(f"\ndecode step time: {name}, {dtype}, mode={mode}, prompt {args.prompt_len}, "
          f"max_req_len {config.max_req_len}, engine set-up {setup_s:.2f} s")
    print(f"{'batch':>6} {'ms/step':>9} {'tok/s':>10} {'graph steps':>12}")
    for r in results:
        print(f"{r['batch']:>6} {r['ms_per_step']:>9.2f} {r['tok_per_s']:>10.0f} {r['graph_steps']:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": name, "mode": mode,
                                               "setup_s": setup_s, "results": results}, indent=2))
    print("RESULT " + " ".join([f"mode={mode}"] + [f"b{r['batch']}_ms={r['ms_per_step']:.3f}" for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
