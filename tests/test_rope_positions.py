"""RoPE positions travel apart from cache positions.

A request's RoPE positions (`add_request(rope_positions=[P, L], rope_delta=d)`) feed the
rotary embedding only; the KV cache and the token table are indexed by cache position. These
tests give some requests positions that differ from their cache positions and check that every
path (eager, emulated CUDA graphs with their padding, the overlap schedule, chunked prefill, a
tensor-parallel follower) gives the same tokens: a path that used the RoPE positions as the
token-table column, or the cache positions for RoPE, would differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmserver.engine.engine import Engine, EngineConfig, RequestError
from mmserver.engine.kv_pool import allocate_kv
from mmserver.engine.sampling import SamplingParams
from mmserver.engine.tp import TPLeader, follow
from mmserver.models.internvl.model import InternVLModel
from mmserver.models.llm.decoder import ForwardBatch
from mmserver.models.parallel import destroy_tp, init_tp
from test_cuda_graphs import _assert_same, _engine, _generate, _requests

STRETCH = 3  # a shifted prompt's RoPE positions are 0, 3, 6, ...: relative distances change


def _shifted(n: int) -> dict:
    """add_request keywords: prompt RoPE positions STRETCH * p; decode tokens follow the last one
    (cache position n at RoPE position STRETCH * (n - 1) + 1). A uniform shift would not do: RoPE
    sees only relative positions, so it would give the same tokens."""
    return {"rope_positions": STRETCH * torch.arange(n)[None], "rope_delta": (STRETCH - 1) * (n - 1)}


def _with_rope(requests: list[dict], shifted: set[int]) -> list[dict]:
    return [{**r, "rope": _shifted(len(r["prompt_ids"]))} if i in shifted else r for i, r in enumerate(requests)]


@pytest.fixture(scope="module")
def requests(pipe):
    reqs = _requests(pipe, 6, seed=11)  # requests 1 and 4 carry an image
    for r in reqs:
        r["max_new_tokens"] = 8
    return reqs


SHIFTED = {1, 2, 5}  # an image request and two text ones; the others keep plain positions


@pytest.fixture(scope="module")
def eager_shifted(pipe, requests):
    joins = {i: (i % 3) * 2 for i in range(len(requests))}
    return joins, _generate(_engine(pipe, cuda_graphs=False), _with_rope(requests, SHIFTED), joins)


def test_explicit_arange_is_the_default(pipe, requests):
    """rope_positions = 0..L-1 (and delta 0) is exactly what None means; a uniform shift (prompt
    and decode tokens 7 ahead) gives the same tokens, as RoPE sees only relative positions."""
    explicit = [{**r, "rope": {"rope_positions": torch.arange(len(r["prompt_ids"]))[None]}} for r in requests]
    for cfg in ({}, {"emulate": True, "overlap_schedule": True}):  # bit for bit, on one path and on another
        assert _generate(_engine(pipe, **cfg), explicit) == _generate(_engine(pipe, **cfg), requests)
    shifted = [{**r, "rope": {"rope_positions": 7 + torch.arange(len(r["prompt_ids"]))[None], "rope_delta": 7}}
               for r in requests]
    tokens = {i: t for i, (t, _) in _generate(_engine(pipe), shifted).items()}
    assert tokens == {i: t for i, (t, _) in _generate(_engine(pipe), requests).items()}


def test_shifted_positions_change_the_tokens(pipe, requests, eager_shifted):
    joins, got = eager_shifted
    plain = _generate(_engine(pipe, cuda_graphs=False), requests, joins)
    for i in range(len(requests)):
        if i in SHIFTED:
            assert got[i][0] != plain[i][0], f"request {i}: its RoPE positions were ignored"
        else:
            assert got[i] == plain[i], f"request {i}: another request's RoPE positions leaked into it"


def _check_positions(eng: Engine, batch: ForwardBatch) -> None:
    """Every real token's table cell is its cache position's; its RoPE position is its request's."""
    by_row = {r.row: r for r in eng.running}
    cu, rows, prefix = batch.cu_q.tolist(), batch.req_rows.tolist(), batch.prefix_lens.tolist()
    index, rope = batch.table_index.tolist(), batch.rope_positions.tolist()
    assert len(rope) == 1
    for b, row in enumerate(rows):
        if batch.seq_lens[b] == 0:
            continue  # a CUDA-graph pad row
        r = by_row[row]
        for t in range(cu[b], cu[b + 1]):
            cache = prefix[b] + t - cu[b]
            assert index[t] == eng.table.flat_index(row, cache)
            if r.rope_positions is None:
                assert rope[0][t] == cache
            else:
                n = len(r.prompt_ids)
                assert rope[0][t] == (STRETCH * cache if cache < n else cache + (STRETCH - 1) * (n - 1))


@pytest.mark.parametrize("emulate,overlap,batch_max_tokens", [(True, False, 8192), (False, True, 48),
                                                             (True, True, 48)])
def test_shifted_positions_same_on_every_path(pipe, requests, eager_shifted, emulate, overlap, batch_max_tokens,
                                              monkeypatch):
    """Graph padding, pending decode rows and prefill chunks starting mid-prompt all keep the
    RoPE positions apart from the cache positions."""
    joins, expected = eager_shifted
    eng = _engine(pipe, emulate=emulate, overlap_schedule=overlap, batch_max_tokens=batch_max_tokens)
    llm = pipe.model.llm
    monkeypatch.setattr(llm, "forward", lambda batch, *a, _f=llm.forward: _check_positions(eng, batch) or _f(batch, *a))
    _assert_same(_generate(eng, _with_rope(requests, SHIFTED), joins), expected)
    if emulate:
        assert eng.graphs.replays > 0
    assert eng.kv.used == 0


def test_rope_arguments_are_checked(pipe):
    eng = _engine(pipe)
    ids = pipe.prepare("a few words")[0]
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(RequestError, match=r"rope_positions must be \[P"):
        eng.add_request(ids, params, rope_positions=torch.arange(len(ids)))  # 1-D
    with pytest.raises(RequestError, match="integers"):
        eng.add_request(ids, params, rope_positions=torch.zeros(1, len(ids)))
    with pytest.raises(RequestError, match="outside the model"):
        eng.add_request(ids, params, rope_positions=torch.arange(len(ids))[None] - 1)
    with pytest.raises(RequestError, match="outside the model"):
        eng.add_request(ids, params, rope_delta=pipe.model.llm.cfg.max_position_embeddings)
    assert not eng.has_work()


# ---------------------------------------------------------------------------------------
# Tensor parallelism: the follower writes its token table from the cache positions


def _tp_worker(rank: int, world: int, init_file: str, ckpt: str, requests: list[dict], joins: dict,
               out: str) -> None:
    torch.set_num_threads(1)
    tp = init_tp(rank, world, f"file://{init_file}", backend="gloo")
    try:
        model = InternVLModel.load(ckpt, progress=False, tp=tp)
        cfg = EngineConfig(max_total_tokens=8192, max_requests=32, max_req_len=1024, batch_max_tokens=48,
                           overlap_schedule=True)
        if rank > 0:
            kv, table = allocate_kv(model.llm, cfg)
            follow(model.llm, kv.buffer, table.table, tp)
            return
        leader = TPLeader(model.llm, tp)
        try:
            eng = Engine(leader, cfg)
            eng.graphs = eng.runner.capture_graphs(emulate=True)
            torch.save({"result": _generate(eng, requests, joins), "replays": eng.graphs.replays}, out)
        finally:
            leader.stop()
    finally:
        destroy_tp(tp)


def test_shifted_positions_with_a_tp_follower(requests, eager_shifted, checkpoints, tmp_path: Path):
    joins, expected = eager_shifted
    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(checkpoints("original", "qwen2")),
                               _with_rope(requests, SHIFTED), joins, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["replays"] > 0
    assert {i: t for i, (t, _) in got["result"].items()} == {i: t for i, (t, _) in expected.items()}
