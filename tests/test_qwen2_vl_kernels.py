"""Qwen2-VL's kernels: varlen ViT attention (triton under TRITON_INTERPRET=1 vs the torch
reference) and the M-RoPE cos/sin gather against transformers' Qwen2VLRotaryEmbedding."""
from __future__ import annotations

import torch

from test_kernels import DOT_DTYPES, assert_close, kmod, needs_triton  # sets TRITON_INTERPRET first

import pytest

import mmserver.kernels as K
from mmserver.kernels import reference as R


def _segments(lengths, heads=3, d=16, dtype=torch.float32):
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, d, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def test_varlen_reference_is_attention_per_segment():
    q, k, v, cu = _segments([5, 17, 1])
    out = R.varlen_attention(q, k, v, cu, 17, 0.25)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) * 0.25
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[lo:hi])
        torch.testing.assert_close(out[lo:hi], ref, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("lengths", [[40], [5, 33, 16, 1], [64, 64, 32, 64]])
def test_varlen_attention_triton(dtype, lengths):
    q, k, v, cu = _segments(lengths, d=20, dtype=dtype)  # head_dim 20: padded to 32 (Qwen2-VL's 80 → 128)
    got = kmod("varlen_attention").varlen_attention(q, k, v, cu, max(lengths), 20 ** -0.5)
    assert_close(got, R.varlen_attention(q, k, v, cu, max(lengths), 20 ** -0.5), dtype)


@needs_triton
def test_varlen_attention_triton_strided():
    """q, k, v as views of one packed qkv (the encoder's layout after the rotary)."""
    qkv = torch.randn(30, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    assert_close(kmod("varlen_attention").varlen_attention(q, k, v, cu, 18, 0.3),
                 R.varlen_attention(q, k, v, cu, 18, 0.3), torch.float32)


def test_mrope_cos_sin_matches_transformers():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    cfg = Qwen2VLConfig(text_config={"hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": 512,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [16, 24, 24]}}).text_config
    rotary = Qwen2VLRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(40), torch.arange(40) // 3 + 5, torch.arange(40) % 7 + 2])
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), pos[:, None, :])
    table_cos, table_sin = K.rope_cos_sin(512, 128, 1e6)
    cos, sin = K.mrope_cos_sin(pos, table_cos, table_sin, (16, 24, 24))
    assert torch.equal(torch.cat([cos, cos], -1), cos_ref[0]) and torch.equal(torch.cat([sin, sin], -1), sin_ref[0])
    same = K.mrope_cos_sin(pos[:1].expand(3, -1), table_cos, table_sin, (16, 24, 24))
    assert torch.equal(same[0], table_cos[pos[0]])  # t = h = w: plain RoPE
