#!/usr/bin/env python
"""transformers baseline: static batches through ``InternVLForConditionalGeneration.generate``.

Same workloads (``bench_workloads``) and metric names as ``benchmark_serving.py``. Requests
are cut into static batches of ``--batch-size``, left-padded, and generated greedily with
``min_new_tokens = max_new_tokens = --output-len`` (the equivalent of ``ignore_eos``).
The timed region covers PNG decoding, image preprocessing, tokenisation and ``generate``
for every batch -- the work a server does per request. Workload images are synthesised
before the clock. TTFT / TPOT are reported as null: ``generate`` exposes no per-token
timing and a separate prefill-only pass would not measure the same run.

Example::

    python scripts/bench_hf.py --model_dir ckpt/1b --workload W1 --num-requests 256 \\
        --batch-size 64 --output-len 128 --json hf_w1.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as `python scripts/x.py` or imported
import bench_workloads as bw  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFRunner:
    """Model, tokenizer and image processor, plus one-batch generation."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: str, max_patches: int = 12) -> None:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        self.device = torch.device(device)
        self.dtype = dtype
        self.model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = GotOcr2ImageProcessorPil(
            crop_to_patches=True, min_patches=1, max_patches=max_patches, size={"height": 448, "width": 448},
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )  # fmt: skip
        self.image_seq_length = int(getattr(self.model.config, "image_seq_length", 256))
        ids = self.tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
        self.img_start, self.img_end, self.img_context = (int(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        eos = self.model.generation_config.eos_token_id
        self.pad_id = int(pad if pad is not None else (eos[0] if isinstance(eos, list) else eos or 0))
        self.eos_id = eos

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prompt_ids(self, prompt: str, tiles: list[int]) -> list[int]:
        """Tokenise text pieces; each ``<image>`` becomes <img> + <IMG_CONTEXT> x 256 x tiles + </img>."""
        pieces = prompt.split(bw.IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(tiles):
            raise ValueError(f"{len(pieces) - 1} image placeholders but {len(tiles)} images")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids += [self.img_start] + [self.img_context] * (self.image_seq_length * tiles[k - 1]) + [self.img_end]
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    @torch.inference_mode()
    def generate(self, batch: list[bw.BenchRequest], output_len: int) -> tuple[int, list[int]]:
        """Run one static batch; returns (prompt length incl. padding, new tokens per request)."""
        from transformers import GenerationConfig

        images = [Image.open(io.BytesIO(png)).convert("RGB") for req in batch for png in req.images]
        proc = self.processor(images=images, return_tensors="pt")
        tiles = [int(n) for n in proc["num_patches"]]
        seqs, t = [], 0
        for req in batch:
            seqs.append(self.prompt_ids(req.prompt, tiles[t : t + len(req.images)]))
            t += len(req.images)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # left padding: generation continues at the same column
            input_ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        cfg = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                               eos_token_id=self.eos_id, pad_token_id=self.pad_id)  # fmt: skip
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            pixel_values=proc["pixel_values"].to(self.device, self.dtype), generation_config=cfg,
        )  # fmt: skip
        # min_new_tokens == max_new_tokens suppresses EOS, so no row stops early: every row
        # has out.shape[1] - width new tokens.
        return width, [int(out.shape[1] - width)] * len(seqs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="transformers-layout InternVL checkpoint")
    bw.add_workload_args(p, "--batch-size", "requests per generate() call (static batch)", bw.IMAGE_WORKLOADS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-patches", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (distinct images)")
    args = p.parse_args(argv)
    bw.check_positive(p, args, ("num_requests", "batch_size", "output_len"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA is not available; pass --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = bw.build_workload(args.workload, args.num_requests, args.seed, args.prompt_tokens)
    runner = HFRunner(args.model_dir, DTYPES[args.dtype], args.device, args.max_patches)
    B, L = args.batch_size, args.output_len
    batches = [requests[i : i + B] for i in range(0, len(requests), B)]

    if args.warmup:
        # Another seed, so nothing measured is seen twice; first calls pay one-off init costs.
        warm = bw.build_workload(args.workload, B * args.warmup, args.seed + 1_000_003, args.prompt_tokens, False)
        for i in tqdm(range(0, len(warm), B), desc="warmup", unit="batch", file=sys.stderr):
            runner.generate(warm[i : i + B], L)
        runner.sync()

    records: list[dict[str, Any]] = []
    errors: list[str] = []
    new_tokens: list[int] = []
    bar = tqdm(total=len(requests), desc=f"hf {args.workload}", unit="req", file=sys.stderr)
    runner.sync()
    start = time.perf_counter()
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        try:
            width, counts = runner.generate(batch, L)
            runner.sync()
        except RuntimeError as exc:  # e.g. CUDA OOM at a large batch: count, keep going
            errors += [f"batch {k}: {type(exc).__name__}: {str(exc)[:200]}"] * len(batch)
            records.append({"batch": k, "size": len(batch), "error": str(exc)[:200]})
        else:
            new_tokens += counts
            records.append({"batch": k, "size": len(batch), "prompt_len": width,
                            "seconds": time.perf_counter() - t0, "new_tokens": counts})  # fmt: skip
        bar.update(len(batch))
        bar.set_postfix(errors=len(errors), refresh=False)
    duration = time.perf_counter() - start
    bar.close()

    batch_s = [r["seconds"] for r in records if "seconds" in r]
    metrics: dict[str, Any] = {
        "requests": len(requests),
        "completed": len(new_tokens),
        "errors": len(errors),
        "len_mismatch": sum(n != L for n in new_tokens),
        "duration_s": duration,
        "req_per_s": len(new_tokens) / duration if duration > 0 else None,
        "output_tok_per_s": sum(new_tokens) / duration if duration > 0 else None,
        "total_output_tokens": sum(new_tokens),
        # Not measurable from one generate() call (see module docstring).
        "ttft_p50_ms": None, "ttft_p99_ms": None, "tpot_p50_ms": None, "tpot_p99_ms": None,
        "batch_latency_p50_ms": bw.scaled(bw.percentile(batch_s, 50), 1000.0),
        "batch_latency_max_ms": bw.scaled(max(batch_s), 1000.0) if batch_s else None,
    }  # fmt: skip
    rows = [
        ("workload", f"{args.workload} ({bw.WORKLOADS[args.workload].description})"),
        ("model_dir / dtype / device", f"{args.model_dir} / {args.dtype} / {args.device}"),
        ("requests / completed / errors", f"{metrics['requests']} / {metrics['completed']} / {metrics['errors']}"),
        ("batch size / batches", f"{B} / {len(batches)}"),
        ("output len / mismatches", f"{L} / {metrics['len_mismatch']}"),
        ("duration (s)", bw.fmt(duration)),
        ("requests/s", bw.fmt(metrics["req_per_s"])),
        ("output tokens/s", bw.fmt(metrics["output_tok_per_s"], 1)),
        ("batch latency p50 / max (ms)", f"{bw.fmt(metrics['batch_latency_p50_ms'], 1)} / "
                                         f"{bw.fmt(metrics['batch_latency_max_ms'], 1)}"),
        ("TTFT / TPOT", "null (not measured for the generate() baseline)"),
    ]  # fmt: skip
    bw.print_table(rows, "transformers generate baseline")
    for e in errors[:10]:
        print(f"  error {e}")
    line = bw.result_line([
        ("workload", args.workload, 0), ("requests", metrics["requests"], 0), ("batch_size", B, 0),
        ("req_per_s", metrics["req_per_s"], 2), ("output_tok_per_s", metrics["output_tok_per_s"], 1),
        ("ttft_p50_ms", None, 1), ("ttft_p99_ms", None, 1), ("tpot_p50_ms", None, 2), ("tpot_p99_ms", None, 2),
        ("errors", metrics["errors"], 0), ("duration_s", duration, 2),
        ("output_len", L, 0), ("len_mismatch", metrics["len_mismatch"], 0),
    ])  # fmt: skip

    if args.json is not None:
        import transformers

        config = {
            "model_dir": str(args.model_dir), "workload": args.workload, "num_requests": args.num_requests,
            "batch_size": B, "output_len": L, "seed": args.seed, "prompt_tokens": args.prompt_tokens,
            "dtype": args.dtype, "device": args.device, "warmup_batches": args.warmup,
            "device_name": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
            "image_sizes": [list(s) for s in sorted({s for r in requests for s in r.image_sizes})],
            "distinct_images": len({i for r in requests for i in r.image_ids}),
            "torch": torch.__version__, "transformers": transformers.__version__, **bw.run_info(),
        }  # fmt: skip
        out = {"backend": "hf", "config": config, "metrics": metrics, "result_line": line, "batches": records}
        bw.write_report(args.json, out)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
