"""Tests for mmserver.engine.sampling."""

from __future__ import annotations

import math

import pytest
import torch

from mmserver.engine.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams, make_generator

V = 50
EOS = 7


def _logits(batch: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _run(logits, params, prompts=None, outputs=None, generators=None):
    batch = logits.shape[0]
    prompts = prompts if prompts is not None else [[] for _ in range(batch)]
    outputs = outputs if outputs is not None else [[] for _ in range(batch)]
    generators = generators if generators is not None else [None] * batch
    return Sampler()(logits, params, prompts, outputs, generators)


def _raw_logprob(logits, tokens):
    return torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)


# --- per-row reference implementations ---------------------------------------


def _ref_repetition(row: list[float], seen: set[int], p: float) -> list[float]:
    return [(x / p if x > 0 else x * p) if t in seen else x for t, x in enumerate(row)]


def _ref_presence_frequency(row: list[float], output: list[int], pres: float, freq: float):
    out = list(row)
    for t in set(output):
        out[t] -= pres + freq * output.count(t)
    return out


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda t: (row[t], -t))


# --- greedy --------------------------------------------------------------------


def test_greedy_is_argmax_with_raw_logprobs():
    logits = _logits(6)
    params = [SamplingParams() for _ in range(6)]
    tokens, logprobs = _run(logits, params, outputs=[[1, 2]] * 6)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, _raw_logprob(logits, tokens))


def test_greedy_ties_go_to_lowest_id():
    logits = torch.zeros(1, V)
    logits[0, [3, 9, 20]] = 5.0
    tokens, _ = _run(logits, [SamplingParams()])
    assert tokens.item() == 3


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = _logits(3)
    params = [
        SamplingParams(do_sample=True, temperature=0.0),
        SamplingParams(do_sample=True, top_k=1, temperature=5.0),
        SamplingParams(do_sample=True, top_k=1, seed=3),
    ]
    gens = [make_generator(p.seed, "cpu") for p in params]
    for _ in range(5):
        tokens, _ = _run(logits, params, generators=gens)
        assert torch.equal(tokens, logits.argmax(-1))


# --- penalties -------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_reference(penalty):
    logits = _logits(4, seed=1)
    prompts = [[1, 2, 3], torch.tensor([4, 4, 10]), [], list(range(0, V, 3))]
    outputs = [[5], [], [6, 6, 1], [2]]
    params = [SamplingParams(repetition_penalty=penalty) for _ in range(4)]
    tokens, logprobs = _run(logits, params, prompts, outputs)
    for i in range(4):
        seen = set(torch.as_tensor(prompts[i]).tolist()) | set(outputs[i])
        ref = _ref_repetition(logits[i].tolist(), seen, penalty)
        assert tokens[i].item() == _argmax(ref)
    # Log-probs stay those of the unmodified logits.
    assert torch.allclose(logprobs, _raw_logprob(logits, tokens))


def test_repetition_penalty_changes_the_choice():
    logits = torch.zeros(1, V)
    logits[0, 4], logits[0, 5] = 2.0, 1.5
    tokens, _ = _run(logits, [SamplingParams(repetition_penalty=2.0)], [[4]], [[]])
    assert tokens.item() == 5  # 2.0 / 2 = 1.0 < 1.5


@pytest.mark.parametrize("pres,freq", [(0.5, 0.0), (0.0, 0.4), (1.5, -0.3), (-2.0, 2.0)])
def test_presence_frequency_matches_reference(pres, freq):
    logits = _logits(3, seed=2)
    # Prompt tokens must not count for presence/frequency.
    prompts = [[logits[i].argmax().item()] for i in range(3)]
    outputs = [[1, 1, 1, 2], [int(logits[1].argmax())] * 3, []]
    params = [SamplingParams(presence_penalty=pres, frequency_penalty=freq) for _ in range(3)]
    tokens, _ = _run(logits, params, prompts, outputs)
    for i in range(3):
        ref = _ref_presence_frequency(logits[i].tolist(), outputs[i], pres, freq)
        assert tokens[i].item() == _argmax(ref)


def test_penalised_logits_exactly(monkeypatch):
    # Check the processed logits themselves, not only the argmax.
    logits = _logits(2, seed=3)
    params = [
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2),
        SamplingParams(),
    ]
    prompts, outputs = [[0, 1], [0]], [[1, 2, 2], [3]]
    captured = {}
    import mmserver.engine.sampling as sampling

    real_mask = sampling._mask_stop_tokens

    def spy(processed, *args):
        captured["logits"] = processed.clone()
        return real_mask(processed, *args)

    monkeypatch.setattr(sampling, "_mask_stop_tokens", spy)
    _run(logits, params, prompts, outputs)
    ref0 = _ref_repetition(logits[0].tolist(), {0, 1, 2}, 1.5)
    ref0 = _ref_presence_frequency(ref0, outputs[0], 0.3, 0.2)
    assert torch.allclose(captured["logits"][0], torch.tensor(ref0))
    assert torch.equal(captured["logits"][1], logits[1])  # neutral row untouched


def test_min_new_tokens_masks_eos():
    logits = torch.zeros(2, V)
    logits[:, EOS] = 10.0
    logits[:, 3] = 1.0
    params = [SamplingParams(min_new_tokens=3, stop_token_ids=[EOS, 99 + V]) for _ in range(2)]
    tokens, logprobs = _run(logits, params, outputs=[[1, 2], [1, 2, 3]])
    assert tokens.tolist() == [3, EOS]  # row 0 is short of min_new_tokens
    assert torch.allclose(logprobs, _raw_logprob(logits, tokens))

    # Sampling rows are masked as well.
    sampled = SamplingParams(do_sample=True, min_new_tokens=1, stop_token_ids=[EOS])
    gen = make_generator(0, "cpu")
    for _ in range(20):
        tokens, _ = _run(logits[:1], [sampled], outputs=[[]], generators=[gen])
        assert tokens.item() != EOS

    # ignore_eos never masks: it only means the engine does not stop on EOS.
    ignore = SamplingParams(min_new_tokens=3, stop_token_ids=[EOS], ignore_eos=True)
    tokens, _ = _run(logits[:1], [ignore], outputs=[[]])
    assert tokens.item() == EOS


# --- sampling ----------------------------------------------------------------------


def test_top_k_one_sampling_equals_greedy():
    logits = _logits(4, seed=4)
    params = [SamplingParams(do_sample=True, top_k=1, temperature=2.0, seed=i) for i in range(4)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    tokens, _ = _run(logits, params, generators=gens)
    assert torch.equal(tokens, logits.argmax(-1))


def test_tiny_top_p_gives_the_top_token():
    logits = _logits(4, seed=5)
    params = [SamplingParams(do_sample=True, top_p=1e-6, temperature=3.0) for _ in range(4)]
    for _ in range(10):
        tokens, _ = _run(logits, params)
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_restricts_support():
    logits = _logits(1, seed=6)
    allowed = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(do_sample=True, top_k=3, temperature=10.0)]
    gen = make_generator(0, "cpu")
    seen = {_run(logits, params, generators=[gen])[0].item() for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = make_generator(1, "cpu")
    # 0.5 + 0.3 = 0.8 >= 0.8: exactly the first two are kept.
    params = [SamplingParams(do_sample=True, top_p=0.8)]
    seen = {_run(logits, params, generators=[gen])[0].item() for _ in range(300)}
    assert seen == {0, 1}
    params = [SamplingParams(do_sample=True, top_p=0.81)]
    seen = {_run(logits, params, generators=[gen])[0].item() for _ in range(300)}
    assert seen == {0, 1, 2}


def test_top_p_boundary_is_inclusive():
    # Four equal tokens: cumulative mass 0.25, 0.5 is exact, so top_p=0.5 keeps
    # exactly two of them (ties ordered by id).
    logits = torch.zeros(1, 4)
    gen = make_generator(2, "cpu")
    params = [SamplingParams(do_sample=True, top_p=0.5)]
    seen = {_run(logits, params, generators=[gen])[0].item() for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    gen = make_generator(123, "cpu")
    params = [SamplingParams(do_sample=True)]
    draws = [_run(probs.log(), params, generators=[gen])[0].item() for _ in range(3000)]
    freq = [draws.count(t) / len(draws) for t in range(3)]
    assert all(math.isclose(f, p, abs_tol=0.04) for f, p in zip(freq, probs[0].tolist()))


def _sequence(seed: int, steps: int = 20, others: int = 0) -> list[int]:
    """Tokens drawn for one seeded row over several steps, with `others` noise rows."""
    gen = make_generator(seed, "cpu")
    params = [SamplingParams(do_sample=True, seed=seed)]
    params += [SamplingParams(do_sample=True, top_k=5, temperature=0.5)] * others
    out = []
    for step in range(steps):
        logits = torch.zeros(1 + others, V)  # flat distribution
        logits[1:] = _logits(others, seed=100 + step) if others else 0
        gens = [gen] + [make_generator(999 + j, "cpu") for j in range(others)]
        tokens, _ = _run(logits, params, generators=gens)
        out.append(tokens[0].item())
    return out


def test_same_seed_same_sequence_different_seed_differs():
    assert _sequence(42) == _sequence(42)
    assert _sequence(42) != _sequence(43)


def test_row_result_independent_of_batch():
    alone = _sequence(7)
    assert _sequence(7, others=3) == alone
    assert _sequence(7, others=6) == alone


def test_mixed_batch_greedy_rows_unaffected():
    logits = _logits(4, seed=8)
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=1, top_p=0.9, top_k=10),
        SamplingParams(repetition_penalty=1.0),
        SamplingParams(do_sample=True, seed=2),
    ]
    gens = [make_generator(p.seed, "cpu") for p in params]
    tokens, logprobs = _run(logits, params, generators=gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs, _raw_logprob(logits, tokens))


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- top_logprobs ---------------------------------------------------------------------


def _sample(logits, params, generators=None, **kw):
    batch = logits.shape[0]
    generators = generators if generators is not None else [None] * batch
    return Sampler().sample(logits, params, [[] for _ in range(batch)], [[] for _ in range(batch)], generators, **kw)


def test_no_top_logprobs_computes_nothing():
    result = _sample(_logits(3), [SamplingParams() for _ in range(3)])
    assert result.top_ids is None and result.top_logprobs is None


def test_top_logprobs_are_sorted_raw_log_softmax():
    logits = _logits(4, seed=9)
    params = [SamplingParams(top_logprobs=5), SamplingParams(do_sample=True, top_logprobs=5, seed=1),
              SamplingParams(repetition_penalty=1.5, top_logprobs=5), SamplingParams(top_logprobs=5)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    result = _sample(logits, params, gens)
    assert result.top_ids.shape == result.top_logprobs.shape == (4, 5)
    assert result.top_ids.dtype == torch.int64 and result.top_logprobs.dtype == torch.float32
    raw = torch.log_softmax(logits, -1)
    ref_values, ref_ids = raw.topk(5, dim=-1)
    assert torch.equal(result.top_ids, ref_ids)
    assert torch.equal(result.top_logprobs, ref_values)
    # The values are exactly the raw logprobs of those ids, best first.
    assert torch.equal(result.top_logprobs, raw.gather(1, result.top_ids))
    assert (result.top_logprobs[:, :-1] >= result.top_logprobs[:, 1:]).all()


def test_greedy_choice_is_first_alternative_with_the_same_logprob():
    logits = _logits(6, seed=10)
    logits[2, [4, 11]] = logits[2].max() + 1  # a tie: argmax takes the lower id, so must the list
    result = _sample(logits, [SamplingParams(top_logprobs=3) for _ in range(6)])
    assert torch.equal(result.top_ids[:, 0], result.token_ids)
    assert torch.equal(result.top_logprobs[:, 0], result.logprobs)  # exactly, not approximately
    assert result.top_ids[2, :2].tolist() == [4, 11]


def test_k_is_the_batch_maximum_and_other_rows_are_padding():
    logits = _logits(3, seed=11)
    params = [SamplingParams(top_logprobs=2), SamplingParams(), SamplingParams(top_logprobs=MAX_TOP_LOGPROBS)]
    result = _sample(logits, params)
    assert result.top_ids.shape == (3, MAX_TOP_LOGPROBS)
    raw = torch.log_softmax(logits, -1)
    for i, p in enumerate(params):
        k = p.top_logprobs
        assert torch.equal(result.top_ids[i, :k], raw[i].topk(k).indices) if k else True
        assert (result.top_ids[i, k:] == -1).all()
        assert torch.isneginf(result.top_logprobs[i, k:]).all()


def test_top_logprobs_leave_the_tokens_alone():
    logits = _logits(4, seed=12)
    params = [SamplingParams(do_sample=True, seed=i, top_p=0.9) for i in range(4)]
    asked = [SamplingParams(do_sample=True, seed=i, top_p=0.9, top_logprobs=i * 3) for i in range(4)]
    plain = _sample(logits, params, [make_generator(i, "cpu") for i in range(4)])
    with_top = _sample(logits, asked, [make_generator(i, "cpu") for i in range(4)])
    assert torch.equal(plain.token_ids, with_top.token_ids)
    assert torch.equal(plain.logprobs, with_top.logprobs)


def test_call_still_returns_a_pair():
    tokens, logprobs = _run(_logits(2), [SamplingParams(top_logprobs=3)] * 2)
    assert tokens.shape == logprobs.shape == (2,)


# --- validation ---------------------------------------------------------------------


def test_defaults_are_valid():
    params = SamplingParams()
    params.validate()
    assert params.is_greedy
    assert params.stop_sequences == [] and params.stop_sequences is not SamplingParams().stop_sequences


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("min_new_tokens", -1),
        ("min_new_tokens", 17),
        ("stop_sequences", [""]),
        ("stop_sequences", "stop"),
        ("stop_sequences", ["x"] * 17),
        ("seed", -1),
        ("seed", 2**63),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("top_logprobs", 2.0),
        ("top_logprobs", True),
        ("top_logprobs", "3"),
    ],
)
def test_validate_names_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_p": 1.0, "top_k": 0},
        {"top_k": -1},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"min_new_tokens": 0},
        {"min_new_tokens": 16},
        {"stop_sequences": ["a"] * 16},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"top_logprobs": 0},
        {"top_logprobs": 20},
    ],
)
def test_validate_accepts_edges(kwargs):
    SamplingParams(**kwargs).validate()


def test_validate_message_gives_range():
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        SamplingParams(top_p=0).validate()
