"""TEMPORARY config sweep (to be deleted)."""
import sys
import torch
from triton.testing import do_bench
from . import kernel_module
from .bench import _paged, HQ, HK, D, DT

def sweep_decode():
    mod = kernel_module("decode_attention")
    orig = mod._config
    for B, L in [(1, 32768), (8, 4096), (64, 2048), (256, 512)]:
        kv, table, rows = _paged([L - 1] * B, [1] * B, L)
        q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
        seq = torch.full((B,), L, dtype=torch.int32, device="cuda")
        nbytes = B * L * 2 * HK * D * 2
        res = []
        for splits in sorted({1, 2, 4, 8, 16, 32, 64, mod.choose_num_splits(B, HK, L, q.device)}):
            if L / splits < 128: continue
            for bn in (32, 64, 128):
                for w in (2, 4):
                    for st in (2, 3):
                        mod._config = lambda bd, c=(bn, w, st): c
                        try:
                            t = do_bench(lambda: mod.decode_attention(q, kv, table, rows, seq, 0.1, L, num_splits=splits), warmup=10, rep=30, return_mode="median")
                        except Exception as e:
                            continue
                        res.append((t, splits, bn, w, st))
        res.sort()
        print(f"decode B={B} L={L}", flush=True)
        for t, *c in res[:6]:
            print(f"   {t*1e3:8.1f} us {nbytes/t/1e6:6.0f} GB/s splits,bn,w,st={c}", flush=True)
    mod._config = orig

def sweep_prefill():
    mod = kernel_module("prefill_attention")
    orig = mod._config
    for prefix, q_lens in [([0] * 4, [2048] * 4), ([0] * 16, [512] * 16), ([3000] * 8, [1] * 8), ([1000] * 8, [40] * 8)]:
        kv, table, rows = _paged(prefix, q_lens, max(p + n for p, n in zip(prefix, q_lens)))
        T = sum(q_lens)
        q = torch.randn(T, HQ, D, device="cuda", dtype=DT)
        cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
        pl = torch.tensor(prefix, dtype=torch.int32, device="cuda")
        flops = sum(4 * HQ * D * n * (p + (n + 1) / 2) for p, n in zip(prefix, q_lens))
        res = []
        for bm in ((16, 32) if q_lens[0] < 64 else (64, 128)):
            for bn in (32, 64, 128):
                for w in (4, 8):
                    for st in (2, 3):
                        mod._config = lambda r, bd, c=(bm, bn, w, st): c
                        try:
                            t = do_bench(lambda: mod.prefill_attention(q, kv, table, rows, cu, pl, max(q_lens), 0.1), warmup=10, rep=30, return_mode="median")
                        except Exception as e:
                            continue
                        res.append((t, bm, bn, w, st))
        res.sort()
        mod._config = orig
        t0 = do_bench(lambda: mod.prefill_attention(q, kv, table, rows, cu, pl, max(q_lens), 0.1), warmup=10, rep=30, return_mode="median")
        print(f"prefill prefix={prefix[0]} q={q_lens[0]} B={len(q_lens)} default {t0*1e3:.1f} us {flops/t0/1e9:.0f} TF", flush=True)
        for t, *c in res[:6]:
            print(f"   {t*1e3:8.1f} us {flops/t/1e9:6.0f} TF/s bm,bn,w,st={c}", flush=True)

if __name__ == "__main__":
    for n in sys.argv[1:]:
        globals()["sweep_" + n]()
