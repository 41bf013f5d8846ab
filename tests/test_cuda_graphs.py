"""CUDA-graph decode: padding and bucket choice, the packed inputs, the reserved scratch slot and
token-table pad cell, and the engine's graph path.

Everything but the capture itself runs on CPU: `DecodeGraphs.capture(emulate=True)` replays a
padded static batch eagerly, through the same buffers and bookkeeping as the CUDA graphs. The
GPU tests (skipped without CUDA) compare real graph replays with the eager forward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mmserver import pipeline
from mmserver.engine.batch_io import ALIGN, HostBatch, InputBuffers
from mmserver.engine.cuda_graphs import DEFAULT_SIZES, DecodeGraphs, PadValues, graph_sizes, graphs_enabled, pad_decode
from mmserver.engine.engine import Engine, EngineConfig
from mmserver.engine.kv_pool import KVPool, KVPoolExhausted, TokenTable, allocate_kv
from mmserver.engine.sampling import SamplingParams
from mmserver.engine.tp import TPLeader, follow
from mmserver.models.llm.decoder import ForwardBatch
from mmserver.models.parallel import destroy_tp, init_tp
from mmserver.models.internvl.model import InternVLModel

from conftest import random_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------
# Sizes, switch, padding, packing (no model)


def test_graph_sizes_are_capped_by_max_requests():
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_sizes(100)[-3:] == [64, 96, 100]  # every batch the engine can form has a graph
    assert graph_sizes(256) == list(DEFAULT_SIZES)
    assert graph_sizes(1000) == list(DEFAULT_SIZES)  # above 256: eager
    assert graph_sizes(1) == [1] and graph_sizes(3) == [1, 2, 3]


def _graphs(sizes: list[int], max_seq_len: int = 32) -> DecodeGraphs:
    kv, table = KVPool((1, 16, 2, 4), torch.float32, "cpu"), TokenTable(4, max_seq_len, "cpu")
    return DecodeGraphs(None, kv.buffer, table.table, sizes, max_seq_len, PadValues.of(kv, table))  # type: ignore[arg-type]


def test_bucket_is_the_smallest_captured_size_at_least_b():
    g = _graphs(graph_sizes(64))
    assert [g.bucket(b) for b in (1, 2, 3, 5, 17, 24, 25, 49, 64)] == [1, 2, 4, 8, 24, 24, 32, 64, 64]
    assert g.bucket(65) is None and g.bucket(0) is None


def test_switch(monkeypatch):
    monkeypatch.delenv("MMSERVER_CUDA_GRAPHS", raising=False)
    cuda = torch.device("cuda", 0)
    assert graphs_enabled(True, cuda)
    assert not graphs_enabled(False, cuda)
    assert not graphs_enabled(True, torch.device("cpu"))
    assert EngineConfig().cuda_graphs
    monkeypatch.setenv("MMSERVER_CUDA_GRAPHS", "0")  # read once, when the config is built
    assert not EngineConfig().cuda_graphs and not EngineConfig(cuda_graphs=True).cuda_graphs
    config = EngineConfig(cuda_graphs=False)
    monkeypatch.setenv("MMSERVER_CUDA_GRAPHS", "1")
    assert not config.cuda_graphs and EngineConfig().cuda_graphs


def _decode_host_batch(b: int, width: int = 32) -> HostBatch:
    rows = list(range(b))
    pos = [5 + i for i in rows]
    return HostBatch(input_ids=[100 + i for i in rows], rope_positions=pos,
                     table_index=[r * width + p for r, p in zip(rows, pos)], slots=np.arange(b, dtype=np.int32) + 3,
                     req_rows=rows, cu_q=list(range(b + 1)), prefix_lens=pos, seq_lens=[p + 1 for p in pos],
                     logit_rows=list(range(b)), max_q_len=1, max_seq_len=max(pos) + 1)


def test_pad_decode_fills_pad_rows_with_reserved_values():
    pad = PadValues(slot=15, row=0, table_index=31)
    hb = pad_decode(_decode_host_batch(3), 8, pad, max_seq_len=32)
    assert list(hb.input_ids) == [100, 101, 102] + [0] * 5
    assert list(hb.rope_positions) == [5, 6, 7] + [0] * 5  # any position in the cos/sin table would do
    assert list(hb.slots) == [3, 4, 5] + [15] * 5
    assert list(hb.req_rows) == [0, 1, 2] + [0] * 5
    assert list(hb.seq_lens) == [6, 7, 8] + [0] * 5  # seq_len 0: the attention kernel returns zeros
    assert list(hb.table_index)[3:] == [31] * 5
    assert list(hb.cu_q) == list(range(9)) and list(hb.logit_rows) == list(range(8))
    assert hb.max_q_len == 1 and hb.max_seq_len == 32  # fixed split count for capture and replay
    with pytest.raises(ValueError, match="cannot pad"):
        pad_decode(_decode_host_batch(3), 2, pad, 32)
    prefill = HostBatch([1, 2], [0, 1], [0, 1], [0, 1], [0], [0, 2], [0], [2], [1], max_q_len=2, max_seq_len=2)
    with pytest.raises(ValueError, match="all-decode"):
        pad_decode(prefill, 4, pad, 32)
    m_rope = HostBatch(**{**_decode_host_batch(2).__dict__, "rope_positions": np.array([[5, 6], [5, 7]])})
    with pytest.raises(ValueError, match="plain"):  # graphs capture one row of RoPE positions
        pad_decode(m_rope, 4, pad, 32)


def _check_batch(batch, hb: HostBatch) -> None:
    for name in ("input_ids", "rope_positions", "table_index", "slots", "req_rows", "cu_q", "prefix_lens", "seq_lens",
                 "logit_rows"):
        t = getattr(batch, name)
        assert t.reshape(-1).tolist() == [int(x) for x in np.asarray(getattr(hb, name)).reshape(-1)], name
        assert t.data_ptr() % ALIGN == 0, name  # triton specializes on 16-byte alignment
    assert batch.rope_positions.shape == (hb.rope_rows, len(hb.input_ids))
    for name, dtype in (("input_ids", torch.int64), ("rope_positions", torch.int64), ("table_index", torch.int64),
                        ("logit_rows", torch.int64),
                        ("slots", torch.int32), ("req_rows", torch.int32), ("cu_q", torch.int32),
                        ("seq_lens", torch.int32), ("prefix_lens", torch.int32)):
        assert getattr(batch, name).dtype == dtype, name
    assert (batch.max_q_len, batch.max_seq_len) == (hb.max_q_len, hb.max_seq_len)


def test_pack_round_trip_and_growth():
    bufs = InputBuffers("cpu", capacity=64)
    mixed = HostBatch(input_ids=[7, 8, 9, 10, 11], rope_positions=[0, 1, 2, 9, 4], table_index=[0, 1, 2, 41, 68],
                      slots=np.array([5, 6, 7, 1, 2], dtype=np.int32), req_rows=[0, 1, 2], cu_q=[0, 3, 4, 5],
                      prefix_lens=[0, 9, 4], seq_lens=[3, 10, 5], logit_rows=[2, 3, 4], max_q_len=3,
                      max_seq_len=10, image_index=[-1, 0, 1, -1, -1])
    batch = bufs.pack(mixed, image_rows=torch.zeros(2, 4))
    _check_batch(batch, mixed)
    assert batch.image_index.tolist() == [-1, 0, 1, -1, -1] and batch.image_index.dtype == torch.int32
    assert bufs.capacity > 64  # grew
    small = _decode_host_batch(2)
    batch = bufs.pack(small)  # overwrites in place
    _check_batch(batch, small)
    two_rows = HostBatch(**{**small.__dict__, "rope_positions": np.array([[5, 6], [50, 60]])})  # P = 2
    batch = bufs.pack(two_rows)
    _check_batch(batch, two_rows)
    assert batch.rope_positions.tolist() == [[5, 6], [50, 60]]
    assert batch.image_index is None and batch.image_rows is None
    fixed = InputBuffers("cpu", capacity=64, growable=False)
    with pytest.raises(ValueError, match="static inputs"):
        fixed.pack(mixed)


# Per-row fields of a decode batch; cu_q and logit_rows are aranges, fixed in the static inputs.
_ROW_FIELDS = ("input_ids", "table_index", "slots", "req_rows", "prefix_lens", "seq_lens")


@torch.inference_mode()  # the static inputs are created in inference mode
def copy_into_static(static: ForwardBatch, batch: ForwardBatch, pad: PadValues) -> None:
    """Copy a device decode batch of B rows into a larger static batch: rows [:B] from `batch`,
    rows [B:] reset to pad values (stale rows would write K/V into slots requests now own)."""
    n = batch.req_rows.numel()
    fills = {"table_index": pad.table_index, "slots": pad.slot, "req_rows": pad.row}
    for name in _ROW_FIELDS:
        dst = getattr(static, name)
        dst[:n].copy_(getattr(batch, name))
        dst[n:].fill_(fills.get(name, 0))
    static.rope_positions[:, :n].copy_(batch.rope_positions)
    static.rope_positions[:, n:].fill_(0)


def run_graph(graphs: DecodeGraphs, batch: ForwardBatch) -> torch.Tensor:
    """Logits [B, vocab] of a device decode batch of B rows, replayed from `graphs` through a copy
    into the static inputs (the engine packs host batches straight into them instead)."""
    n = batch.req_rows.numel()
    size = graphs.bucket(n)
    assert size is not None and batch.is_decode and batch.image_rows is None and batch.logit_rows.numel() == n
    static = graphs._static[size]
    copy_into_static(static, batch, graphs.pad)
    return graphs.replay(size, static, n)


def test_copy_into_static_resets_stale_rows():
    g = _graphs([8])
    g.capture(emulate=True)
    static = g._static[8]
    bufs = InputBuffers("cpu", 1024)
    for b in (5, 3):  # the 3-row batch must clear rows 3..4 that the 5-row one filled
        batch = bufs.pack(_decode_host_batch(b))
        copy_into_static(static, batch, g.pad)
        expected = pad_decode(_decode_host_batch(b), 8, g.pad, 32)
        for name in ("input_ids", "rope_positions", "table_index", "slots", "req_rows", "prefix_lens", "seq_lens",
                     "cu_q", "logit_rows"):
            assert getattr(static, name).reshape(-1).tolist() == [int(x) for x in getattr(expected, name)], (b, name)


def test_replay_rejects_a_batch_outside_the_static_inputs():
    g = _graphs([4])
    g.capture(emulate=True)
    batch = InputBuffers("cpu", 1024).pack(pad_decode(_decode_host_batch(3), 4, g.pad, 32))
    with pytest.raises(ValueError, match="static inputs"):
        g.replay(4, batch, 3)


# ---------------------------------------------------------------------------------------
# The reserved scratch slot and row


def test_scratch_slot_is_reserved_and_not_counted(pipe):
    llm = pipe.model.llm
    assert llm.kv_shape(10)[1] == 11  # every rank's pool, a TP follower's included, has the scratch slot
    eng = _engine(pipe, max_total_tokens=100)
    assert eng.kv.buffer.shape[1] == 101 and (eng.kv.num_slots, eng.kv.free, eng.kv.used) == (100, 100, 0)
    pool = KVPool((2, 11, 4, 8), torch.float32, "cpu")
    assert pool.buffer.shape == (2, 11, 4, 8) and pool.scratch_slot == 10
    assert (pool.num_slots, pool.free, pool.used) == (10, 10, 0)  # capacity: what requests can use
    slots = pool.alloc(10)
    assert sorted(slots.tolist()) == list(range(10))  # every slot but the scratch one
    assert (pool.free, pool.used) == (0, 10)
    with pytest.raises(KVPoolExhausted):
        pool.alloc(1)
    pool.release(slots[1:])
    with pytest.raises(RuntimeError, match="outside the pool"):
        pool.release(torch.tensor([pool.scratch_slot], dtype=torch.int32))
    pool.release(slots[:1])
    assert (pool.free, pool.used) == (10, 0)
    with pytest.raises(ValueError, match="at least 2 slots"):
        KVPool((1, 1, 2, 4), torch.float32, "cpu")


def test_pad_cell_is_never_recorded():
    table = TokenTable(3, 8, "cpu")
    assert table.table.shape == (3, 8) and (table.pad_row, table.pad_position) == (0, 7)
    rows = [table.alloc_row() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2] and table.free_rows == 0
    with pytest.raises(KVPoolExhausted):
        table.alloc_row()
    table.record(rows[0], 0, np.array([4, 5], dtype=np.int32))
    table.record(rows[0], 2, np.array([9], dtype=np.int32))
    with pytest.raises(RuntimeError, match="in order"):
        table.record(rows[0], 5, np.array([1], dtype=np.int32))
    table.record(rows[1], 0, np.arange(7, dtype=np.int32))  # positions 0..6: the most a request uses
    with pytest.raises(KVPoolExhausted):
        table.record(rows[1], 7, np.array([1], dtype=np.int32))  # the pad cell
    table.write(torch.tensor([table.flat_index(rows[0], p) for p in range(3)]),
                torch.tensor([4, 5, 9], dtype=torch.int32))
    assert table.table[rows[0], :3].tolist() == [4, 5, 9]
    assert table.free_row(rows[0]).tolist() == [4, 5, 9]
    assert table.free_rows == 1
    with pytest.raises(RuntimeError, match="not allocated"):
        table.free_row(rows[0])


# ---------------------------------------------------------------------------------------
# The engine on CPU: graphs requested (eager) and emulated graphs


def _requests(pipe, n: int, seed: int = 0, images: bool = True) -> list[dict]:
    """n requests of mixed prompt lengths and output lengths; with images, two of them carry one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 500, size=int(rng.integers(1, 40))))
        if images and i in (1, 4):
            ids, px = pipe.prepare(f"<image>\n{words}", [random_image(448, 448, seed + i)], 1)
        else:
            ids, px = pipe.prepare(words)
        out.append({"prompt_ids": ids, "images": pipe.image_inputs(ids, pipe.encode(px)),
                    "max_new_tokens": int(rng.integers(2, 10))})
    return out


def _engine(pipe, emulate: bool = False, **cfg) -> Engine:
    config = EngineConfig(**{"max_total_tokens": 8192, "max_requests": 32, "max_req_len": 1024, **cfg})
    eng = Engine(pipe.model.llm, config)
    if emulate:
        eng.graphs = eng.runner.capture_graphs(emulate=True)
        assert eng.graphs is not None and eng.graphs.emulated
    return eng


def _generate(eng: Engine, requests: list[dict], join_at: dict[int, int] | None = None) -> dict[int, tuple]:
    """Greedy tokens and logprobs per request index; request i joins at step join_at.get(i, 0)."""
    join_at = join_at or {}
    rids: dict[int, int] = {}
    out: dict[int, tuple[list[int], list[float]]] = {}
    step = 0
    while step == 0 or eng.has_work() or any(s >= step for s in join_at.values()):
        for i, r in enumerate(requests):
            if join_at.get(i, 0) == step:
                params = SamplingParams(max_new_tokens=r["max_new_tokens"], ignore_eos=True)
                rids[eng.add_request(r["prompt_ids"], params, **r["images"], **r.get("rope", {}))] = i
        for o in eng.step():
            toks, lps = out.setdefault(rids[o.req_id], ([], []))
            toks.append(o.token_id)
            lps.append(o.logprob)
        step += 1
        assert step < 500
    return out


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for i in expected:
        assert got[i][0] == expected[i][0], f"request {i}"
        np.testing.assert_allclose(got[i][1], expected[i][1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def eager_result(pipe):
    reqs = _requests(pipe, 17)
    joins = {i: (i % 5) * 2 for i in range(17)}  # joins and finishes change the batch size step by step
    return reqs, joins, _generate(_engine(pipe, cuda_graphs=False), reqs, joins)


def test_graphs_requested_on_cpu_run_eagerly(pipe, eager_result):
    reqs, joins, expected = eager_result
    eng = _engine(pipe, cuda_graphs=True)
    assert eng.graphs is None  # graphs only on CUDA
    got = _generate(eng, reqs, joins)
    assert {i: t for i, (t, _) in got.items()} == {i: t for i, (t, _) in expected.items()}
    assert {i: lp for i, (_, lp) in got.items()} == {i: lp for i, (_, lp) in expected.items()}
    assert eng.kv.used == 0


def test_emulated_graph_decode_matches_eager(pipe, eager_result):
    """The graph path end to end on CPU: padded static batches, scratch slot and pad cell, table
    writes, bucket changes as requests join and finish; image and prefill batches stay eager."""
    reqs, joins, expected = eager_result
    eng = _engine(pipe, emulate=True)
    handed_slots: set[int] = set()
    alloc = eng.kv.alloc

    def spy_alloc(n):
        s = alloc(n)
        handed_slots.update(s.tolist())
        return s

    eng.kv.alloc = spy_alloc
    sizes_used: list[int] = []
    padded = []
    replay = eng.graphs.replay

    def spy_replay(size, batch, n):
        sizes_used.append(size)
        padded.append(size > n)
        assert batch.seq_lens[n:].eq(0).all() and batch.slots[n:].eq(eng.kv.scratch_slot).all()
        assert batch.req_rows[n:].eq(eng.table.pad_row).all()
        assert batch.table_index[n:].eq(eng.table.flat_index(eng.table.pad_row, eng.table.pad_position)).all()
        assert batch.rope_positions[:, n:].eq(0).all()
        return replay(size, batch, n)

    eng.graphs.replay = spy_replay
    got = _generate(eng, reqs, joins)
    _assert_same(got, expected)
    assert len(set(sizes_used)) >= 3 and eng.graphs.replays == len(sizes_used) and any(padded)
    assert eng.kv.scratch_slot not in handed_slots
    assert eng.kv.buffer[:, eng.kv.scratch_slot].abs().sum() > 0  # pad rows wrote there
    assert eng.table.table[eng.table.pad_row, eng.table.pad_position] == eng.kv.scratch_slot
    assert (eng.kv.used, eng.kv.free + eng.kv.cached) == (0, eng.config.max_total_tokens)
    assert eng.table.free_rows == eng.config.max_requests


def test_request_of_max_req_len_with_emulated_graphs(pipe):
    """A request using all max_req_len positions never reaches the pad cell (record() would raise)."""
    ids = pipe.prepare("one two three four five")[0]
    reqs = [{"prompt_ids": ids, "images": {}, "max_new_tokens": 24 - len(ids)}]
    expected = _generate(_engine(pipe, cuda_graphs=False, max_req_len=24), reqs)
    eng = _engine(pipe, emulate=True, max_req_len=24)
    _assert_same(_generate(eng, reqs), expected)
    assert len(expected[0][0]) == 24 - len(ids) and eng.graphs.replays == len(expected[0][0]) - 1


def test_emulated_graphs_with_chunked_prefill(pipe):
    """Small prefill chunks mix prefill and decode rows: those batches run eagerly."""
    reqs = _requests(pipe, 5, seed=3)
    expected = _generate(_engine(pipe, cuda_graphs=False, batch_max_tokens=64), reqs)
    eng = _engine(pipe, emulate=True, batch_max_tokens=64)
    _assert_same(_generate(eng, reqs), expected)
    assert eng.graphs.replays > 0


def test_run_copies_a_device_batch_into_the_static_inputs(pipe):
    eng = _engine(pipe, max_requests=8)
    graphs = eng.runner.capture_graphs(emulate=True)
    for r in _requests(pipe, 3, seed=5, images=False):
        eng.add_request(r["prompt_ids"], SamplingParams(max_new_tokens=5, ignore_eos=True))
    eng.step()  # prefill: every request now decodes
    plan = eng.scheduler.schedule()
    batch, _ = eng.runner.prepare(plan, None)
    assert batch.is_decode and len(plan) == 3
    expected = eng.llm.forward(batch, eng.kv.buffer, eng.table.table)
    got = run_graph(graphs, batch)
    assert got.shape == expected.shape == (3, expected.shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for r in list(eng.running):
        eng.abort(r.req_id)
    assert eng.kv.used == 0


def test_capture_failure_falls_back_to_eager(pipe, monkeypatch, caplog):
    eng = _engine(pipe)

    def boom(self, emulate=False):
        raise RuntimeError("capture went wrong")

    monkeypatch.setattr(DecodeGraphs, "capture", boom)
    with caplog.at_level(logging.WARNING, logger="mmserver.engine"):
        assert eng.runner.capture_graphs() is None
    assert "decoding eagerly" in caplog.text and "capture went wrong" in caplog.text


# ---------------------------------------------------------------------------------------
# Tensor parallelism: rank 0 replays (emulated) padded batches, the follower runs them eagerly


def _tp_worker(rank: int, world: int, init_file: str, ckpt: str, requests: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    tp = init_tp(rank, world, f"file://{init_file}", backend="gloo")
    try:
        model = InternVLModel.load(ckpt, progress=False, tp=tp)
        cfg = EngineConfig(max_total_tokens=2048, max_requests=8, max_req_len=256)
        if rank > 0:  # as the server's model worker: pad rows must fit in what it allocates
            kv, table = allocate_kv(model.llm, cfg)
            follow(model.llm, kv.buffer, table.table, tp)
            return
        leader = TPLeader(model.llm, tp)
        try:
            eng = Engine(leader, cfg)
            eng.graphs = eng.runner.capture_graphs(emulate=True)
            tokens = {i: t for i, (t, _) in _generate(eng, requests).items()}
            torch.save({"tokens": tokens, "replays": eng.graphs.replays}, out)
        finally:
            leader.stop()
    finally:
        destroy_tp(tp)


def test_tp_follower_runs_the_padded_batches(pipe, checkpoints, tmp_path: Path):
    reqs = _requests(pipe, 5, seed=7, images=False)
    expected = _generate(_engine(pipe, cuda_graphs=False), reqs)
    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(checkpoints("original", "qwen2")), reqs,
                               str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["replays"] > 0
    assert got["tokens"] == {i: t for i, (t, _) in expected.items()}


# ---------------------------------------------------------------------------------------
# GPU: real graphs against the eager forward


@pytest.fixture(scope="module")
def gpu_pipe(checkpoints):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return pipeline(checkpoints("original", "qwen2"), device="cuda", dtype="float32", cuda_graphs=False)


class _LogitsRecorder:
    """Wraps the engine's sampler to keep each step's logits."""

    def __init__(self, sampler):
        self.sampler, self.logits = sampler, []

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.clone())
        return self.sampler(logits, *args, **kwargs)


@needs_cuda
@pytest.mark.parametrize("n", [1, 3, 17])
def test_graph_decode_matches_eager_on_gpu(gpu_pipe, n):
    reqs = _requests(gpu_pipe, n, seed=n, images=False)
    if n > 1:
        reqs[1]["max_new_tokens"] = 12  # a long one keeps decoding alone after the others finish
    eager = _engine(gpu_pipe, cuda_graphs=False)
    graph = _engine(gpu_pipe, cuda_graphs=True)
    assert graph.graphs is not None and not graph.graphs.emulated, "capture failed: see the warning"
    eager.sampler, graph.sampler = _LogitsRecorder(eager.sampler), _LogitsRecorder(graph.sampler)
    expected, got = _generate(eager, reqs), _generate(graph, reqs)
    assert graph.graphs.replays > 0
    assert len(got) == n
    assert {i: t for i, (t, _) in got.items()} == {i: t for i, (t, _) in expected.items()}
    assert len(eager.sampler.logits) == len(graph.sampler.logits)
    for e, g in zip(eager.sampler.logits, graph.sampler.logits):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)
    assert graph.kv.used == 0 and graph.table.free_rows == graph.config.max_requests


@needs_cuda
@pytest.mark.parametrize("n", [3, 17])
def test_graph_run_matches_forward_on_gpu(gpu_pipe, n):
    eng = _engine(gpu_pipe, cuda_graphs=False)
    graphs = eng.runner.capture_graphs()
    assert graphs is not None and not graphs.emulated
    for r in _requests(gpu_pipe, n, seed=10 + n, images=False):
        eng.add_request(r["prompt_ids"], SamplingParams(max_new_tokens=5, ignore_eos=True))
    eng.step()
    batch, _ = eng.runner.prepare(eng.scheduler.schedule(), None)
    expected = eng.llm.forward(batch, eng.kv.buffer, eng.table.table).clone()
    got = run_graph(graphs, batch).clone()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for r in list(eng.running):
        eng.abort(r.req_id)
