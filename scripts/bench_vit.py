#!/usr/bin/env python
"""Vision-side cost of one image: preprocessing on the CPU and the ViT forward on the device.

    python scripts/bench_vit.py --model_dir ckpt/1b --batch-sizes 1,8,16,32 [--threads 4]

* preprocess: PNG decode + tiling + normalisation of the benchmark's W1 (448x448) and W2
  (1280x720) images, one thread, then --threads threads over a batch (what a ViT worker does);
* encode: `VisionEncoder.encode` (ViT + pixel shuffle + mlp1) on batches of B tiles, with our
  triton attention and, for comparison, torch's SDPA; each timing ends in a device sync.

`--decode-batch B` also loads the LLM and keeps B requests decoding on a thread of this process
(high-priority stream, CUDA graphs) while the encoder runs on its own stream: what the encoder
and the decode step cost each other inside one process. Run it beside another process that
decodes (e.g. `bench_decode.py`) to see what sharing the GPU between processes costs instead.
Prints a table and, last, a RESULT line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_workloads as bw  # noqa: E402
from bench_decode import sync  # noqa: E402
from mmserver import kernels  # noqa: E402
from mmserver.models.internvl.config import load_config  # noqa: E402
from mmserver.models.internvl.preprocess import load_image, preprocess_image  # noqa: E402
from mmserver.models.internvl.vision import VisionEncoder  # noqa: E402
from mmserver.models.internvl.weights import load_weights  # noqa: E402
from mmserver.pipeline import resolve_device, resolve_dtype  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--batch-sizes", default="1,8,16,32", help="comma-separated numbers of tiles per forward")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per batch size")
    p.add_argument("--threads", type=int, default=4, help="preprocessing threads (a ViT worker's pool)")
    p.add_argument("--images", type=int, default=32, help="images per preprocessing measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA comparison")
    p.add_argument("--decode-batch", type=int, default=0,
                   help="B > 0: decode B requests on a thread of this process while encoding")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def bench_preprocess(n_images: int, threads: int) -> dict:
    out = {}
    for name, (w, h) in (("W1", (448, 448)), ("W2", (1280, 720))):
        pngs = [bw.encode_png(bw.make_image(w, h, seed=(9, i))) for i in range(n_images)]
        one = lambda png: preprocess_image(load_image(png))  # noqa: E731
        one(pngs[0])
        t0 = time.perf_counter()
        for png in pngs:
            one(png)
        serial = (time.perf_counter() - t0) / n_images
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(one, pngs))
            pooled = (time.perf_counter() - t0) / n_images
        out[name] = {"ms_per_image_1_thread": serial * 1e3, f"ms_per_image_{threads}_threads": pooled * 1e3}
        print(f"preprocess {name}: {serial * 1e3:.2f} ms/image on 1 thread, "
              f"{pooled * 1e3:.2f} ms/image on {threads} threads", flush=True)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def time_encode(enc: VisionEncoder, batch: int, iters: int) -> float:
    size = enc.v.image_size
    tiles = torch.randn(batch, 3, size, size, device=enc.device, dtype=enc.dtype)
    for _ in range(2):
        enc.encode(tiles)
    sync(enc.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        enc.encode(tiles)
    sync(enc.device)
    return (time.perf_counter() - t0) / iters * 1e3


class DecodeLoop:
    """B requests decoding in a loop on a high-priority stream, on a thread of this process."""

    def __init__(self, model_dir: str, cfg, device: str, dtype: torch.dtype, batch: int):
        import threading

        from mmserver.engine.engine import Engine, EngineConfig
        from mmserver.engine.sampling import SamplingParams
        from mmserver.models.llm.decoder import DecoderLM

        weights = load_weights(model_dir, cfg, device=device, dtype=dtype, progress=False, components=("llm",))
        self.engine = Engine(DecoderLM(cfg.llm, weights), EngineConfig(
            max_total_tokens=batch * 4200 + 1, max_requests=batch, max_req_len=4200, batch_max_tokens=8192))
        params = SamplingParams(max_new_tokens=4000, ignore_eos=True)
        for i in range(batch):
            self.engine.add_request(list(range(100 + i, 228 + i)), params)
        self.stream = torch.cuda.Stream(priority=-1) if device.startswith("cuda") else None
        self.steps, self.busy_s = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            while not self._stop.is_set():
                t0 = time.perf_counter()
                self.engine.step()
                self.busy_s += time.perf_counter() - t0
                self.steps += 1

    def start(self) -> None:
        self._thread.start()
        time.sleep(2.0)  # past prefill and first steps

    def measure(self, seconds: float) -> float:
        """Mean ms per decode step over the next `seconds`."""
        s0, b0 = self.steps, self.busy_s
        time.sleep(seconds)
        return (self.busy_s - b0) / max(1, self.steps - s0) * 1e3

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    device = resolve_device(args.device)
    cfg = load_config(args.model_dir)
    dtype = resolve_dtype(args.dtype, device, cfg.torch_dtype)
    weights = load_weights(args.model_dir, cfg, device=device, dtype=dtype, progress=False,
                           components=("vision",))
    enc = VisionEncoder(cfg, weights)
    pre = bench_preprocess(args.images, args.threads)

    loop = None
    if args.decode_batch:
        loop = DecodeLoop(args.model_dir, cfg, device, dtype, args.decode_batch)
        loop.start()
        print(f"decode step alone (batch {args.decode_batch}): {loop.measure(2.0):.2f} ms", flush=True)
    side = torch.cuda.Stream() if loop is not None and device.startswith("cuda") else None

    variants = {"triton": kernels.vit_attention}
    if not args.no_sdpa:
        variants["sdpa"] = _sdpa
    rows = []
    for name, attn in variants.items():
        kernels.vit_attention = attn  # vision.py calls it through the package
        for b in sizes:
            s0, b0 = (loop.steps, loop.busy_s) if loop else (0, 0.0)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                ms = time_encode(enc, b, args.iters)
            row = {"attention": name, "tiles": b, "ms": ms, "ms_per_tile": ms / b}
            extra = ""
            if loop:
                row["decode_ms_during"] = (loop.busy_s - b0) / max(1, loop.steps - s0) * 1e3
                extra = f"  decode step meanwhile {row['decode_ms_during']:.2f} ms"
            rows.append(row)
            print(f"encode {name:>6} {b:>3} tiles: {ms:8.2f} ms  ({ms / b:6.2f} ms/tile){extra}", flush=True)
    kernels.vit_attention = variants["triton"]
    if loop:
        loop.stop()

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": dev, "dtype": str(dtype),
                                               "preprocess": pre, "encode": rows}, indent=2))
    print("RESULT " + " ".join(f"{r['attention']}_b{r['tiles']}_ms={r['ms']:.2f}" for r in rows)
          + f" pre_W1_ms={pre['W1']['ms_per_image_1_thread']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
