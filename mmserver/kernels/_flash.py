"""Online-softmax (flash attention) step shared by the attention kernels.

Scores are kept in base 2: callers pass qk_scale = scale * log2(e) and use exp2.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def softmax_step(q, k_t, v, valid, m_i, l_i, acc, qk_scale, PREC: tl.constexpr, MASKED: tl.constexpr):
    """Fold one key block into the running (max, sum, acc) of each query row.

    q [M, D], k_t [D, N], v [N, D]; valid [M, N] (or [1, N]) bool, read only if MASKED.
    Every row must see at least one valid key in the first block it folds in.
    """
    s = tl.dot(q, k_t, input_precision=PREC) * qk_scale
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc
