"""GPU correctness check: greedy tokens on CUDA equal the CPU reference path (float32),
and bfloat16 agrees with float32 on the first tokens. Usage: python scripts/gpu_check.py CKPT_DIR"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from mmserver import GenerationConfig, pipeline


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(((base + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8))


def main(ckpt: str) -> int:
    cases = [("Write a haiku about the sea.", []), ("<image>\nWhat is this?", [image(448, 448, 1)]),
             ("<image>\nDescribe.", [image(640, 480, 2)]),
             ("Image-1: <image>\nImage-2: <image>\nCompare.", [image(300, 900, 3), image(1280, 720, 4)])]
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    results = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        pipe = pipeline(ckpt, device=device, dtype=dtype)
        prompts, images = [c[0] for c in cases], [c[1] for c in cases]
        results[(device, dtype)] = [r.token_ids for r in pipe.generate(prompts, images=images, gen_config=cfg)]
        alone = [pipe.generate(p, images=i, gen_config=cfg).token_ids for p, i in cases]
        print(f"{device}/{dtype}: batched == alone: {alone == results[(device, dtype)]}")
        del pipe
    ref, gpu, bf16 = results[("cpu", "float32")], results[("cuda", "float32")], results[("cuda", "bfloat16")]
    ok = ref == gpu
    print(f"cuda float32 == cpu float32 greedy tokens: {ok}")
    for i, (a, b) in enumerate(zip(gpu, bf16)):
        agree = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"case {i}: bf16 agrees with fp32 for the first {agree}/{len(a)} tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
