"""Weight names and shapes of the shared decoder LLM (`llm.*`), as every family loads it.

Hub checkpoints of LLaMA-style LLMs (Qwen2, Vicuna, Mistral; InternVL's Qwen2 backbone) name
a layer's tensors `layers.{i}.self_attn.q_proj.weight` and so on under the LLM's own prefix;
q/k/v become one `qkv` tensor (parts 0, 1, 2 stacked on dim 0) and gate/up one `gate_up`."""

from __future__ import annotations

import re

from .config import LLMConfig

# per-layer module → (canonical name, part)
LLAMA_LAYER = {"self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1), "self_attn.v_proj": ("qkv", 2),
               "self_attn.o_proj": ("o", 0), "mlp.gate_proj": ("gate_up", 0), "mlp.up_proj": ("gate_up", 1),
               "mlp.down_proj": ("down", 0), "input_layernorm": ("norm1", 0),
               "post_attention_layernorm": ("norm2", 0)}


def map_llama_key(rest: str) -> tuple[str, int] | None:
    """A key under the LLM's prefix (`embed_tokens.weight`, `norm.weight`, `layers.{i}.…`) →
    (canonical name, part); None for keys the decoder does not use."""
    if rest == "embed_tokens.weight":
        return ("llm.embed.weight", 0)
    if rest == "norm.weight":
        return ("llm.norm.weight", 0)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m and m.group(2) in LLAMA_LAYER:
        name, part = LLAMA_LAYER[m.group(2)]
        return (f"llm.layers.{m.group(1)}.{name}.{m.group(3)}", part)
    return None


def llm_shapes(l: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Every `llm.*` tensor the decoder needs, with its shape."""
    h = l.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"llm.embed.weight": (l.vocab_size, h), "llm.norm.weight": (h,),
                                          "llm.lm_head.weight": (l.vocab_size, h)}
    qkv_rows = (l.num_heads + 2 * l.num_kv_heads) * l.head_dim
    for i in range(l.num_layers):
        b = f"llm.layers.{i}."
        shapes.update({b + "qkv.weight": (qkv_rows, h), b + "o.weight": (h, l.num_heads * l.head_dim),
                       b + "gate_up.weight": (2 * l.intermediate_size, h), b + "down.weight": (h, l.intermediate_size),
                       b + "norm1.weight": (h,), b + "norm2.weight": (h,)})
        if l.qkv_bias:
            shapes[b + "qkv.bias"] = (qkv_rows,)
    return shapes
