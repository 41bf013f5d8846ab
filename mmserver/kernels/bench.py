"""GPU micro-benchmarks of the triton kernels vs torch: `python -m mmserver.kernels.bench`.

Shapes follow an InternVL3-8B-like model (Qwen2.5-7B LLM: 28 q heads, 4 kv heads,
head_dim 128, hidden 3584, intermediate 18944; InternViT-300M: 16 heads, head_dim 64,
1025 tokens per tile). Reports median times (triton.testing.do_bench) and the
achieved memory bandwidth or matmul throughput.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from . import kernel_module, reference

HQ, HK, D, HIDDEN, INTER = 28, 4, 128, 3584, 18944
DT = torch.bfloat16


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_ms(fn) -> float:
    """Replay time of a captured CUDA graph: excludes the Python launch overhead that
    dominates few-microsecond decode kernels (the engine replays decode graphs too)."""
    fn()  # compile outside the capture
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def _line(name: str, ms: float, extra: str) -> None:
    print(f"{name:<48s} {ms * 1e3:9.1f} us  {extra}", flush=True)


def _gbs(nbytes: int, ms: float) -> str:
    return f"{nbytes / ms / 1e6:7.0f} GB/s"


def bench_elementwise(T: int = 4096) -> None:
    x = torch.randn(T, HIDDEN, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, device="cuda", dtype=DT)
    rms = kernel_module("rmsnorm").rms_norm
    nbytes = 5 * x.numel() * 2
    _line(f"rms_norm+residual T={T}", t := _ms(lambda: rms(x, w, 1e-6, res)), _gbs(nbytes, t))
    _line("  torch reference", t := _ms(lambda: reference.rms_norm(x, w, 1e-6, res)), _gbs(nbytes, t))

    g = torch.randn(T, 2 * INTER, device="cuda", dtype=DT)
    silu = kernel_module("silu_mul").silu_and_mul
    nbytes = 3 * T * INTER * 2
    _line(f"silu_and_mul T={T}", t := _ms(lambda: silu(g)), _gbs(nbytes, t))
    _line("  torch reference", t := _ms(lambda: reference.silu_and_mul(g)), _gbs(nbytes, t))

    qkv = torch.randn(T, (HQ + 2 * HK) * D, device="cuda", dtype=DT)
    q = qkv[:, : HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D : (HQ + HK) * D].view(T, HK, D)
    cos, sin = reference.rope_cos_sin(32768, D, 1e6, "cuda")
    pos = torch.randint(0, 32768, (T,), device="cuda")
    rope = kernel_module("rope").apply_rope
    nbytes = 2 * T * (HQ + HK) * D * 2
    _line(f"apply_rope T={T}", t := _ms(lambda: rope(q, k, pos, cos, sin)), _gbs(nbytes, t))

    kv = torch.empty(200_000, 2 * HK, D, device="cuda", dtype=DT)
    v = qkv[:, (HQ + HK) * D :].view(T, HK, D)
    slots = torch.randperm(200_000, device="cuda")[:T].to(torch.int32)
    wkv = kernel_module("kv_write").write_kv
    nbytes = 4 * T * HK * D * 2
    _line(f"write_kv T={T}", t := _ms(lambda: wkv(kv, k, v, slots)), _gbs(nbytes, t))
    _line("  torch reference", t := _ms(lambda: reference.write_kv(kv, k, v, slots)), _gbs(nbytes, t))

    emb_w = torch.randn(152_064, HIDDEN, device="cuda", dtype=DT)
    ids = torch.randint(0, 152_064, (T,), device="cuda")
    img = torch.randn(T // 2, HIDDEN, device="cuda", dtype=DT)
    img_idx = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    img_idx[T // 4 : T // 4 + T // 2] = torch.arange(T // 2, dtype=torch.int32, device="cuda")
    emb = kernel_module("embedding").embedding
    nbytes = 2 * T * HIDDEN * 2
    _line(f"embedding T={T} (half image rows)", t := _ms(lambda: emb(ids, emb_w, img, img_idx)), _gbs(nbytes, t))
    _line("  torch reference", t := _ms(lambda: reference.embedding(ids, emb_w, img, img_idx)), _gbs(nbytes, t))


def _paged(prefix: list[int], q_lens: list[int], max_len: int):
    B = len(q_lens)
    totals = [p + n for p, n in zip(prefix, q_lens)]
    slots = sum(totals) + 1024
    kv = torch.randn(slots, 2 * HK, D, device="cuda", dtype=DT)
    table = torch.zeros(B, max_len, dtype=torch.int32, device="cuda")
    perm = torch.randperm(slots, device="cuda").to(torch.int32)
    used = 0
    for b, n in enumerate(totals):
        table[b, :n] = perm[used : used + n]
        used += n
    rows = torch.arange(B, dtype=torch.int32, device="cuda")
    return kv, table, rows


def bench_prefill() -> None:
    fn = kernel_module("prefill_attention").prefill_attention
    for prefix, q_lens in [([0] * 4, [2048] * 4), ([0] * 16, [512] * 16), ([6144], [2048]), ([3000] * 8, [1] * 8)]:
        B = len(q_lens)
        kv, table, rows = _paged(prefix, q_lens, max(p + n for p, n in zip(prefix, q_lens)))
        T = sum(q_lens)
        q = torch.randn(T, HQ, D, device="cuda", dtype=DT)
        cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
        pl = torch.tensor(prefix, dtype=torch.int32, device="cuda")
        t = _ms(lambda: fn(q, kv, table, rows, cu, pl, max(q_lens), D**-0.5))
        flops = sum(4 * HQ * D * n * (p + (n + 1) / 2) for p, n in zip(prefix, q_lens))
        _line(f"prefill B={B} prefix={prefix[0]} q_len={q_lens[0]}", t, f"{flops / t / 1e9:7.1f} TFLOP/s")
        if prefix[0] == 0:
            # dense causal flash SDPA on contiguous K/V as a speed-of-light comparison
            qd = torch.randn(B, HQ, q_lens[0], D, device="cuda", dtype=DT)
            kd = torch.randn(B, HK, q_lens[0], D, device="cuda", dtype=DT)
            t = _ms(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True))
            _line("  torch SDPA dense causal", t, f"{flops / t / 1e9:7.1f} TFLOP/s")


def bench_decode() -> None:
    mod = kernel_module("decode_attention")
    for B, L in [(1, 32768), (8, 4096), (64, 2048), (256, 512)]:
        kv, table, rows = _paged([L - 1] * B, [1] * B, L)
        q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
        seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
        nbytes = B * L * 2 * HK * D * 2
        splits = mod.choose_num_splits(B, HK, L, q.device)
        t = _graph_ms(lambda: mod.decode_attention(q, kv, table, rows, seq, D**-0.5, L))
        _line(f"decode B={B} L={L} splits={splits} (graph)", t, _gbs(nbytes, t))
        t = _graph_ms(lambda: mod.decode_attention(q, kv, table, rows, seq, D**-0.5, L, num_splits=1))
        _line("  no split", t, _gbs(nbytes, t))


def bench_vit(N: int = 13) -> None:
    heads, S, d = 16, 1025, 64
    q, k, v = (torch.randn(N, heads, S, d, device="cuda", dtype=DT) for _ in range(3))
    fn = kernel_module("vit_attention").vit_attention
    flops = 4 * N * heads * S * S * d
    _line(f"vit_attention N={N} S={S}", t := _ms(lambda: fn(q, k, v, d**-0.5)), f"{flops / t / 1e9:7.1f} TFLOP/s")
    t = _ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5))
    _line("  torch SDPA", t, f"{flops / t / 1e9:7.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="*", default=["elementwise", "prefill", "decode", "vit"])
    for name in parser.parse_args().which:
        globals()[f"bench_{name}"]()


if __name__ == "__main__":
    main()
