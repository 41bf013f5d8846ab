"""Kernels: torch references vs naive/HF definitions, and triton kernels vs the references.

Triton runs in its CPU interpreter here (TRITON_INTERPRET=1, set before triton is
imported); on a CUDA machine the same tests exercise the compiled kernels.
"""
from __future__ import annotations

import os

import torch  # does not import triton

if not torch.cuda.is_available():
    # must happen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import mmserver.kernels as K
from mmserver.kernels import reference as R

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="triton kernels need a GPU or TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {  # (atol, rtol) for triton vs reference on O(1) data
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


INTERPRETED = not ON_GPU
# The interpreter (triton 3.9) multiplies bf16 tl.dot operands as raw uint16 bits, so
# bf16 attention can only be checked on a GPU.
DOT_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Bitwise equal, except that the interpreter truncates fp32 -> bf16 casts (GPUs round
    to nearest even), which can move a bf16 result by one ulp."""
    if dtype == torch.bfloat16 and INTERPRETED:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=2**-7)
    else:
        assert torch.equal(actual, expected)


def kmod(name: str):
    return K.kernel_module(name)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- paged batches


class PagedBatch:
    """A KV pool with shuffled slots, a token table with padding rows, and ragged requests."""

    def __init__(self, prefix_lens, q_lens, hq, hk, d, dtype, max_len=96, extra_rows=3):
        num_req = len(q_lens)
        totals = [p + n for p, n in zip(prefix_lens, q_lens)]
        assert max(totals) <= max_len
        num_slots = sum(totals) + 37
        self.kv = torch.randn(num_slots, 2 * hk, d, device=DEVICE).to(dtype)
        rows = num_req + extra_rows
        # positions past a request's length hold out-of-range slots: kernels must never read them
        self.table = torch.full((rows, max_len), 10**6, dtype=torch.int32, device=DEVICE)
        self.req_rows = torch.randperm(rows, device=DEVICE)[:num_req].to(torch.int32)
        perm = torch.randperm(num_slots, device=DEVICE).to(torch.int32)
        used = 0
        for row, total in zip(self.req_rows.tolist(), totals):
            self.table[row, :total] = perm[used : used + total]
            used += total
        self.prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor(totals, dtype=torch.int32, device=DEVICE)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        self.cu_q = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        self.q_lens = list(q_lens)
        self.q = torch.randn(cu[-1], hq, d, device=DEVICE).to(dtype)
        self.hk = hk

    def gathered(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 K, V [L, Hk, D] of request b in position order."""
        row, total = int(self.req_rows[b]), int(self.seq_lens[b])
        rows = self.kv[self.table[row, :total].long()].double()
        return rows[:, : self.hk], rows[:, self.hk :]


def naive_attention(q, k, v, scale, causal_offset=None):
    """float64 softmax(q k^T) v for q [Lq, Hq, D], k/v [Lk, Hk, D]; causal with query i at offset + i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal_offset is not None:
        qi = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        ki = torch.arange(k.shape[0], device=q.device)[None, :]
        s = s.masked_fill(ki > qi, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


# ----------------------------------------------------------------------------- references vs definitions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_matches_hf(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hf = Qwen2RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48))
    x = torch.randn(7, 48).to(dtype)
    res = torch.randn(7, 48).to(dtype)
    with torch.no_grad():
        assert torch.equal(R.rms_norm(x, hf.weight.data, 1e-6), hf(x))
        normed, summed = R.rms_norm(x, hf.weight.data, 1e-6, residual=res)
        assert torch.equal(summed, x + res)
        assert torch.equal(normed, hf(x + res))


@pytest.mark.parametrize("head_dim,theta", [(64, 1e6), (128, 10000.0)])
def test_rope_cos_sin_matches_hf_bitwise(head_dim, theta):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    heads = 4
    cfg = Qwen2Config(hidden_size=head_dim * heads, num_attention_heads=heads, rope_theta=theta,
                      max_position_embeddings=4096)
    hf = Qwen2RotaryEmbedding(cfg)
    pos = torch.arange(4096)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = R.rope_cos_sin(4096, head_dim, theta)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (4096, head_dim // 2)
    assert torch.equal(torch.cat((cos, cos), -1), hf_cos[0])
    assert torch.equal(torch.cat((sin, sin), -1), hf_sin[0])


def test_apply_rope_reference_matches_hf():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    d, hq, hk, t = 64, 4, 2, 9
    cfg = Qwen2Config(hidden_size=d * hq, num_attention_heads=hq, num_key_value_heads=hk, rope_theta=1e6)
    positions = torch.tensor([0, 1, 2, 5, 100, 7, 3000, 11, 12])
    q, k = torch.randn(t, hq, d), torch.randn(t, hk, d)
    hf_cos, hf_sin = Qwen2RotaryEmbedding(cfg)(q, positions[None])
    # HF layout is [batch, heads, seq, dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    cos, sin = R.rope_cos_sin(4096, d, 1e6)
    R.apply_rope(q, k, positions, cos, sin)
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_silu_and_mul_reference_matches_hf():
    from transformers.activations import ACT2FN

    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(R.silu_and_mul(x), ACT2FN["silu"](x[:, :32]) * x[:, 32:])


def test_embedding_reference():
    weight = torch.randn(50, 16).to(torch.bfloat16)
    image_rows = torch.randn(4, 16)  # float32 vision features get cast
    ids = torch.randint(0, 50, (10,))
    image_index = torch.tensor([-1, 0, 1, -1, -1, 2, 3, -1, -1, -1], dtype=torch.int32)
    out = R.embedding(ids, weight, image_rows, image_index)
    for t in range(10):
        i = int(image_index[t])
        expected = image_rows[i].to(weight.dtype) if i >= 0 else weight[ids[t]]
        assert torch.equal(out[t], expected)
    assert torch.equal(R.embedding(ids, weight), weight[ids])


def test_write_kv_reference():
    kv = torch.zeros(20, 6, 8)
    k, v = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    slots = torch.tensor([7, 2, 19, 0, 11], dtype=torch.int32)
    R.write_kv(kv, k, v, slots)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(kv[s, :3], k[t]) and torch.equal(kv[s, 3:], v[t])
    assert kv[1].abs().sum() == 0


@pytest.mark.parametrize("hq,hk", [(4, 2), (4, 4)])
def test_prefill_reference_vs_naive(hq, hk):
    batch = PagedBatch([0, 5, 12, 3], [7, 1, 9, 4], hq, hk, 16, torch.float32)
    out = R.prefill_attention(batch.q, batch.kv, batch.table, batch.req_rows, batch.cu_q,
                              batch.prefix_lens, 9, 0.3)
    for b in range(4):
        lo, hi = int(batch.cu_q[b]), int(batch.cu_q[b + 1])
        k, v = batch.gathered(b)
        expected = naive_attention(batch.q[lo:hi], k, v, 0.3, causal_offset=int(batch.prefix_lens[b]))
        torch.testing.assert_close(out[lo:hi].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hk", [(4, 2), (2, 2)])
def test_decode_reference_vs_naive(hq, hk):
    seq = [1, 20, 9]
    batch = PagedBatch([s - 1 for s in seq], [1, 1, 1], hq, hk, 16, torch.float32)
    out = R.decode_attention(batch.q, batch.kv, batch.table, batch.req_rows, batch.seq_lens, 0.25)
    for b in range(3):
        k, v = batch.gathered(b)
        torch.testing.assert_close(out[b : b + 1].double(), naive_attention(batch.q[b : b + 1], k, v, 0.25),
                                   atol=1e-5, rtol=1e-5)
    # decode == a 1-token prefill with prefix seq_len - 1
    pre = R.prefill_attention(batch.q, batch.kv, batch.table, batch.req_rows, batch.cu_q, batch.prefix_lens, 1, 0.25)
    torch.testing.assert_close(out, pre, atol=1e-6, rtol=1e-6)
    bounded = R.decode_attention(batch.q, batch.kv, batch.table, batch.req_rows, batch.seq_lens, 0.25, max_seq_len=40)
    torch.testing.assert_close(bounded, out, atol=1e-6, rtol=1e-6)


def test_vit_reference_vs_naive():
    q, k, v = (torch.randn(2, 3, 11, 16) for _ in range(3))
    out = R.vit_attention(q, k, v, 0.25)
    s = torch.einsum("nhqd,nhkd->nhqk", q.double(), k.double()) * 0.25
    expected = torch.einsum("nhqk,nhkd->nhqd", s.softmax(-1), v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- triton vs references


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_triton(dtype):
    weight = torch.randn(60, 40, device=DEVICE).to(dtype)
    image_rows = torch.randn(5, 40, device=DEVICE)
    ids = torch.randint(0, 60, (13,), device=DEVICE)
    image_index = torch.full((13,), -1, dtype=torch.int32, device=DEVICE)
    image_index[3:8] = torch.tensor([4, 0, 1, 2, 3], dtype=torch.int32)
    m = kmod("embedding")
    assert_exact(m.embedding(ids, weight, image_rows, image_index), R.embedding(ids, weight, image_rows, image_index),
                 dtype)
    assert torch.equal(m.embedding(ids, weight), R.embedding(ids, weight))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 40])
def test_rms_norm_triton(dtype, hidden):
    x = torch.randn(9, hidden, device=DEVICE).to(dtype)
    res = torch.randn(9, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    m = kmod("rmsnorm")
    assert_close(m.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), dtype)
    normed, summed = m.rms_norm(x, w, 1e-6, residual=res)
    ref_normed, ref_summed = R.rms_norm(x, w, 1e-6, residual=res)
    assert_exact(summed, ref_summed, dtype)
    assert_close(normed, ref_normed, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hk", [(16, 4, 2), (64, 3, 3)])
def test_apply_rope_triton(dtype, d, hq, hk):
    t = 11
    cos, sin = R.rope_cos_sin(512, d, 1e4, DEVICE)
    positions = torch.randint(0, 512, (t,), device=DEVICE)
    # q and k as views into one fused qkv projection output (non-contiguous token stride)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    q_ref, k_ref = q.clone(), k.clone()
    untouched = qkv[:, (hq + hk) * d :].clone()
    kmod("rope").apply_rope(q, k, positions, cos, sin)
    R.apply_rope(q_ref, k_ref, positions, cos, sin)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(qkv[:, (hq + hk) * d :], untouched)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_triton(dtype):
    kv = torch.randn(30, 4, 16, device=DEVICE).to(dtype)
    kv_ref = kv.clone()
    k, v = torch.randn(6, 2, 16, device=DEVICE).to(dtype), torch.randn(6, 2, 16, device=DEVICE).to(dtype)
    slots = torch.randperm(30, device=DEVICE)[:6]
    kmod("kv_write").write_kv(kv, k, v, slots.to(torch.int32))
    R.write_kv(kv_ref, k, v, slots)
    assert torch.equal(kv, kv_ref)


def rope_kv_inputs(d, hq, hk, dtype, kv_dtype, slot_kind, t=9, num_slots=40):
    """q, k, v as views of one fused qkv output, a random pool, positions and slots."""
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    kv = torch.randn(num_slots, 2 * hk, d, device=DEVICE).to(kv_dtype)
    positions = torch.randint(0, 512, (t,), device=DEVICE)
    if slot_kind == "perm":  # a random subset of the pool in random order
        slots = torch.randperm(num_slots, device=DEVICE)[:t]
    else:  # strided, descending, not starting at 0
        slots = 7 + 3 * torch.arange(t, device=DEVICE).flip(0)
    return q, k, v, kv, positions, slots.to(torch.int32)


ROPE_KV_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("dtype,kv_dtype", ROPE_KV_DTYPES)
@pytest.mark.parametrize("d,hq,hk", [(16, 4, 2), (64, 3, 3), (48, 6, 3)])
@pytest.mark.parametrize("slot_kind", ["perm", "offset"])
def test_rope_and_write_kv_triton(dtype, kv_dtype, d, hq, hk, slot_kind):
    """The fused kernel gives the bits of the two launches it replaces (and of the reference)."""
    q, k, v, kv, positions, slots = rope_kv_inputs(d, hq, hk, dtype, kv_dtype, slot_kind)
    cos, sin = R.rope_cos_sin(512, d, 1e4, DEVICE)
    q2, k2, kv2 = q.clone(), k.clone(), kv.clone()  # two triton launches
    q_ref, k_ref, kv_ref = q.clone(), k.clone(), kv.clone()  # torch reference
    kv_before = kv.clone()
    kmod("rope_kv").rope_and_write_kv(q, k, v, kv, positions, slots, cos, sin)
    kmod("rope").apply_rope(q2, k2, positions, cos, sin)
    kmod("kv_write").write_kv(kv2, k2, v, slots)
    R.apply_rope(q_ref, k_ref, positions, cos, sin)
    R.write_kv(kv_ref, k_ref, v, slots)
    assert torch.equal(q, q2) and torch.equal(kv, kv2)
    # on a GPU triton may contract the rope mul-adds into FMAs, which torch does not
    check_ref = assert_exact if INTERPRETED else assert_close
    check_ref(q, q_ref, dtype)
    check_ref(kv, kv_ref, kv_dtype)
    untouched = torch.ones(kv.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots.long()] = False
    assert torch.equal(kv[untouched], kv_before[untouched])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_triton(dtype):
    x = (3 * torch.randn(7, 2 * 72, device=DEVICE)).to(dtype)
    assert_close(kmod("silu_mul").silu_and_mul(x), R.silu_and_mul(x), dtype)


PREFILL_CASES = [
    # (prefix_lens, q_lens, hq, hk, d): fresh prompts, cached prefixes, decode rows mixed in, empty request
    ([0, 0], [21, 5], 4, 2, 16),
    ([6, 0, 33, 2], [17, 1, 1, 0], 4, 2, 16),
    ([19, 3], [24, 9], 2, 2, 64),
]


@needs_triton
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention_triton(dtype, case):
    prefix_lens, q_lens, hq, hk, d = case
    batch = PagedBatch(prefix_lens, q_lens, hq, hk, d, dtype)
    args = (batch.q, batch.kv, batch.table, batch.req_rows, batch.cu_q, batch.prefix_lens, max(q_lens), d**-0.5)
    assert_close(kmod("prefill_attention").prefill_attention(*args), R.prefill_attention(*args), dtype)


@needs_triton
def test_prefill_attention_triton_strided_q():
    """q as a view into a fused qkv buffer (token stride != heads * dim)."""
    batch = PagedBatch([4, 0], [10, 7], 4, 2, 16, torch.float32)
    qkv = torch.randn(batch.q.shape[0], 8 * 16, device=DEVICE)
    q = qkv[:, : 4 * 16].view(-1, 4, 16)
    args = (q, batch.kv, batch.table, batch.req_rows, batch.cu_q, batch.prefix_lens, 10, 0.25)
    assert_close(kmod("prefill_attention").prefill_attention(*args), R.prefill_attention(*args), torch.float32)


DECODE_CASES = [
    # (seq_lens, hq, hk, d)
    ([1, 37, 70, 16], 4, 2, 16),
    ([5, 64, 33], 6, 2, 16),  # group of 3 padded to the tensor-core row minimum
    ([48, 2], 2, 2, 64),
]


@needs_triton
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_triton(dtype, case, num_splits):
    seq_lens, hq, hk, d = case
    batch = PagedBatch([s - 1 for s in seq_lens], [1] * len(seq_lens), hq, hk, d, dtype)
    args = (batch.q, batch.kv, batch.table, batch.req_rows, batch.seq_lens, d**-0.5)
    out = kmod("decode_attention").decode_attention(*args, max(seq_lens), num_splits=num_splits)
    assert_close(out, R.decode_attention(*args), dtype)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_triton_empty_rows(num_splits):
    """seq_len 0 rows (padding of a CUDA-graph batch) give zeros, not NaN."""
    batch = PagedBatch([0, 29, 0], [0, 1, 0], 4, 2, 16, torch.float32)
    q = torch.randn(3, 4, 16, device=DEVICE)
    args = (q, batch.kv, batch.table, batch.req_rows, batch.seq_lens, 0.25)
    out = kmod("decode_attention").decode_attention(*args, 30, num_splits=num_splits)
    ref = R.decode_attention(*args)
    assert ref[0].abs().sum() == 0 and ref[2].abs().sum() == 0
    assert_close(out, ref, torch.float32)


VIT_CASES = [(2, 2, 37, 16), (1, 2, 33, 64), (1, 1, 20, 48)]  # (N, heads, S, D); S not a block multiple


@needs_triton
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("shape", VIT_CASES)
def test_vit_attention_triton(dtype, shape):
    q, k, v = (torch.randn(*shape, device=DEVICE).to(dtype) for _ in range(3))
    scale = shape[-1] ** -0.5
    assert_close(kmod("vit_attention").vit_attention(q, k, v, scale), R.vit_attention(q, k, v, scale), dtype)


@needs_triton
def test_vit_attention_triton_strided():
    """q/k/v as views of one fused [N, S, 3, heads, D] qkv tensor, permuted to [N, heads, S, D]."""
    qkv = torch.randn(2, 21, 3, 2, 16, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert_close(kmod("vit_attention").vit_attention(q, k, v, 0.25), R.vit_attention(q, k, v, 0.25), torch.float32)


# ----------------------------------------------------------------------------- dispatchers


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("MMSERVER_FORCE_TRITON", raising=False)
    monkeypatch.setattr(K, "kernel_module", lambda name: pytest.fail(f"triton module {name} loaded on CPU"))
    x = torch.randn(3, 16)
    assert not K.use_triton(x)
    assert torch.equal(K.rms_norm(x, torch.ones(16), 1e-6), R.rms_norm(x, torch.ones(16), 1e-6))
    assert torch.equal(K.silu_and_mul(x), R.silu_and_mul(x))
    qv = torch.randn(1, 2, 5, 8)
    assert torch.equal(K.vit_attention(qv, qv, qv, 0.3), R.vit_attention(qv, qv, qv, 0.3))
    q, k, v, kv, positions, slots = rope_kv_inputs(16, 4, 2, torch.float32, torch.float32, "perm")
    q, k, v, kv = q.cpu(), k.cpu(), v.cpu(), kv.cpu()
    positions, slots = positions.cpu(), slots.cpu()
    cos, sin = R.rope_cos_sin(512, 16, 1e4)
    q_ref, k_ref, kv_ref = q.clone(), k.clone(), kv.clone()
    K.rope_and_write_kv(q, k, v, kv, positions, slots, cos, sin)
    R.apply_rope(q_ref, k_ref, positions, cos, sin)
    R.write_kv(kv_ref, k_ref, v, slots)
    assert torch.equal(q, q_ref) and torch.equal(kv, kv_ref)


@needs_triton
def test_dispatchers_forced_triton(monkeypatch):
    """Every public dispatcher through the forced triton path, one layer's worth of calls."""
    monkeypatch.setenv("MMSERVER_FORCE_TRITON", "1")
    hq, hk, d, hidden = 4, 2, 16, 32
    batch = PagedBatch([3, 0], [6, 4], hq, hk, d, torch.float32)
    t = batch.q.shape[0]
    x = torch.randn(t, hidden, device=DEVICE)
    w = torch.randn(hidden, device=DEVICE)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6))
    ids = torch.randint(0, 10, (t,), device=DEVICE)
    emb = torch.randn(10, hidden, device=DEVICE)
    torch.testing.assert_close(K.embedding(ids, emb), R.embedding(ids, emb))
    torch.testing.assert_close(K.silu_and_mul(x), R.silu_and_mul(x))

    # write the new tokens' K/V, then attend
    k, v = torch.randn(t, hk, d, device=DEVICE), torch.randn(t, hk, d, device=DEVICE)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip([3, 0], [6, 4])]).to(DEVICE)
    cos, sin = K.rope_cos_sin(64, d, 1e4, DEVICE)
    q, q_ref, k_ref = batch.q.clone(), batch.q.clone(), k.clone()
    q_fused, k_fused = batch.q.clone(), k.clone()
    K.apply_rope(q, k, positions, cos, sin)
    R.apply_rope(q_ref, k_ref, positions, cos, sin)
    torch.testing.assert_close(q, q_ref)
    slots = torch.cat([batch.table[int(r), p : p + n] for r, p, n in zip(batch.req_rows, [3, 0], [6, 4])])
    kv_ref, kv_fused = batch.kv.clone(), batch.kv.clone()
    K.write_kv(batch.kv, k, v, slots)
    R.write_kv(kv_ref, k_ref, v, slots)
    torch.testing.assert_close(batch.kv, kv_ref)
    # the fused call leaves the same q and pool as the two calls above
    K.rope_and_write_kv(q_fused, k_fused, v, kv_fused, positions, slots, cos, sin)
    assert torch.equal(q_fused, q) and torch.equal(kv_fused, batch.kv)
    args = (q, batch.kv, batch.table, batch.req_rows, batch.cu_q, batch.prefix_lens, 6, 0.25)
    torch.testing.assert_close(K.prefill_attention(*args), R.prefill_attention(*args))
    dec = (q[:2], batch.kv, batch.table, batch.req_rows, batch.seq_lens, 0.25)
    torch.testing.assert_close(K.decode_attention(*dec, max_seq_len=9), R.decode_attention(*dec))
    qv = torch.randn(1, 2, 9, d, device=DEVICE)
    torch.testing.assert_close(K.vit_attention(qv, qv, qv, 0.25), R.vit_attention(qv, qv, qv, 0.25))
    # loading kernel modules must not shadow the dispatchers of the same name
    assert callable(K.prefill_attention) and K.prefill_attention.__module__ == "mmserver.kernels"
    assert K.decode_attention.__module__ == K.embedding.__module__ == "mmserver.kernels"
    assert K.rope_and_write_kv.__module__ == "mmserver.kernels"


# ----------------------------------------------------------------------------- GPU only

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_gpu_model_shapes(dtype):
    """Production block sizes: head_dim 128, GQA 7, long prefixes, many splits, ViT S=1025."""
    batch = PagedBatch([0, 700, 130, 1500], [300, 129, 1, 64], 28, 4, 128, dtype, max_len=1600)
    args = (batch.q, batch.kv, batch.table, batch.req_rows, batch.cu_q, batch.prefix_lens, 300, 128**-0.5)
    assert_close(kmod("prefill_attention").prefill_attention(*args), R.prefill_attention(*args), dtype)
    dec = (batch.q[:4], batch.kv, batch.table, batch.req_rows, batch.seq_lens, 128**-0.5)
    for splits in (None, 1, 7, 64):  # 64: most splits empty
        out = kmod("decode_attention").decode_attention(*dec, 1600, num_splits=splits)
        assert_close(out, R.decode_attention(*dec), dtype)
    q, k, v = (torch.randn(3, 16, 1025, 64, device=DEVICE).to(dtype) for _ in range(3))
    assert_close(kmod("vit_attention").vit_attention(q, k, v, 0.125), R.vit_attention(q, k, v, 0.125), dtype)


@gpu_only
def test_decode_attention_cuda_graph():
    """Capture once, replay with new lengths/slots: no host syncs, grid independent of data."""
    batch = PagedBatch([40, 90, 7], [1, 1, 1], 8, 2, 64, torch.bfloat16, max_len=128)
    q = batch.q.clone()
    seq_lens = batch.seq_lens.clone()
    args = (q, batch.kv, batch.table, batch.req_rows, seq_lens, 0.125)
    K.decode_attention(*args, max_seq_len=128)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.decode_attention(*args, max_seq_len=128)
    seq_lens.copy_(torch.tensor([13, 91, 8], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert_close(out, R.decode_attention(*args), torch.bfloat16)
