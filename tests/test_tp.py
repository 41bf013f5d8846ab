"""Tensor parallelism on CPU (gloo): sharded ranks reproduce the single-process model.

Each spawned rank loads its shard, runs the ViT on some tiles and an identical Engine on
identical requests (scheduling is deterministic and greedy sampling needs no RNG), and rank
0 saves what it got; the parent compares with the unsharded model. One more phase drives the
ranks as the server does: only rank 0 has an Engine and the others follow its batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmserver.pipeline import Pipeline
from mmserver.engine.engine import Engine, EngineConfig
from mmserver.engine.kv_pool import allocate_kv
from mmserver.engine.sampling import SamplingParams
from mmserver.engine.tp import TPLeader, follow
from mmserver.models.parallel import (TPGroup, destroy_tp, init_tp, local_kv_heads, shard_llm_weights,
                                      shard_vision_weights, shard_weights)
from mmserver.models.internvl.config import LLMConfig, load_config
from mmserver.models.internvl.model import InternVLModel, load_sharded_weights
from mmserver.models.internvl.preprocess import preprocess_image
from mmserver.models.internvl.prompt import context_spans
from mmserver.models.internvl.weights import load_weights

from conftest import random_image

N_NEW = 5


def _engine_config() -> EngineConfig:
    # A small prefill budget mixes prefill chunks and decode tokens in the same batches.
    return EngineConfig(max_total_tokens=2048, max_req_len=1024, batch_max_tokens=160)


def _generate(eng: Engine, requests: list[dict]) -> list[list[int]]:
    rids = [eng.add_request(params=SamplingParams(max_new_tokens=N_NEW, ignore_eos=True), **r) for r in requests]
    tokens: dict[int, list[int]] = {r: [] for r in rids}
    while eng.has_work():
        for o in eng.step():
            tokens[o.req_id].append(o.token_id)
    return [tokens[r] for r in rids]


def _image_inputs(ids: list[int], rows: list[torch.Tensor], job: dict) -> dict:
    if not rows:
        return {}
    return {"image_embeds": torch.cat(rows), "image_spans": context_spans(ids, job["image_token_id"])}


def _run_job(model: InternVLModel, job: dict) -> dict:
    """ViT features of job["tiles"], then greedy tokens of job["requests"] run together in one Engine."""
    feats = model.vision.encode(job["tiles"])
    eng = Engine(model.llm, _engine_config())
    requests = [{"prompt_ids": ids, **_image_inputs(ids, [model.vision.encode(p).flatten(0, 1) for p in px], job)}
                for ids, px in job["requests"]]
    return {"feats": feats, "tokens": _generate(eng, requests)}


def _run_leader_follower(model: InternVLModel, job: dict, tp: TPGroup) -> dict:
    """As the server: rank 0 runs the Engine (image rows given, as from the visual server) and sends
    each batch; the other ranks only `follow`."""
    cfg = _engine_config()
    if tp.rank > 0:
        kv, table = allocate_kv(model.llm, cfg)
        return {"steps": follow(model.llm, kv.buffer, table.table, tp)}
    leader = TPLeader(model.llm, tp)
    requests = [{"prompt_ids": ids, **_image_inputs(ids, [emb] if emb is not None else [], job)}
                for (ids, _), emb in zip(job["requests"], job["embeds"])]
    try:
        cfg.overlap_schedule = True  # as on a GPU: the followers get the device-filled input ids
        return {"tokens": _generate(Engine(leader, cfg), requests)}
    finally:
        leader.stop()


def _run_sessions(model: InternVLModel, job: dict, tp: TPGroup) -> dict:
    """Multi-turn sessions through the prefix cache, as the server runs them: rank 0's Engine
    reuses cached prefixes, so the followers must get those rows of the token table too."""
    from test_prefix_cache import run_sessions

    cfg = EngineConfig(**job["config"])
    if tp.rank > 0:
        kv, table = allocate_kv(model.llm, cfg)
        return {"steps": follow(model.llm, kv.buffer, table.table, tp)}
    leader = TPLeader(model.llm, tp)
    try:
        eng = Engine(leader, cfg)
        out = run_sessions(eng, job["sessions"])
        return {"results": out, "hit": eng.prefix_cache.hit_tokens, "evicted": eng.prefix_cache.evicted_tokens}
    finally:
        leader.stop()


def _worker(rank: int, world: int, init_file: str, phases: list[tuple[int, str, list[dict]]], out: str) -> None:
    """Run each (tp size, mode, jobs) phase on ranks 0..size-1 (a subgroup); rank 0 saves the results."""
    torch.set_num_threads(1)  # ranks share the machine's cores
    tp = init_tp(rank, world, f"file://{init_file}", backend="gloo")
    # Every rank creates every subgroup, in the same order (a torch.distributed rule).
    groups = {size: dist.new_group(list(range(size))) if size < world else tp.group for size, _, _ in phases}
    run = {"replicated": lambda model, job, sub: _run_job(model, job), "leader": _run_leader_follower,
           "sessions": _run_sessions}
    results = []
    try:
        for size, mode, jobs in phases:
            if rank < size:  # the other ranks wait in their next phase's first collective
                sub = TPGroup(rank, size, groups[size])
                results.append([run[mode](InternVLModel.load(job["ckpt"], progress=False, tp=sub), job, sub)
                                for job in jobs])
        if rank == 0:
            torch.save(results, out)
    finally:
        destroy_tp(tp)


def _spawn(world: int, tmp_path: Path, phases: list[tuple[int, str, list[dict]]]) -> list[list[dict]]:
    """One process per rank (spawned, as the server does); starting processes is most of the cost,
    so one spawn runs every phase."""
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(world, str(tmp_path / "tp_init"), phases, str(out)), nprocs=world, join=True)
    return torch.load(out)


def _job(ckpt: Path, seed: int) -> tuple[dict, dict]:
    """A job for `_run_job` plus its single-process result."""
    pipe = Pipeline(ckpt, device="cpu", dtype="float32", engine_config=EngineConfig(max_total_tokens=16),
                    progress=False)  # its own engine is unused: a tiny KV pool
    image = random_image(640, 480, seed)
    requests = [pipe.prepare("<image>\nWhat is in the picture?", [image], 2),
                pipe.prepare("A text-only question.", []),
                pipe.prepare("<image>\nAnd this one?", [random_image(448, 448, seed + 1)], 1)]
    embeds = [pipe.model.vision.encode(torch.cat(px)).flatten(0, 1) if px else None for _, px in requests]
    job = {"ckpt": str(ckpt), "tiles": preprocess_image(image, max_num=2), "requests": requests,
           "image_token_id": pipe.family.special.img_context, "embeds": embeds}
    return job, _run_job(pipe.model, job)


@pytest.fixture(scope="module")
def jobs(checkpoints):
    return {name: _job(checkpoints(*args, **kw), seed) for seed, (name, args, kw) in enumerate([
        ("qwen2", ("original", "qwen2"), {}),
        ("qwen2_vit6b", ("original", "qwen2"), {"vit": "6b"}),
        ("internlm2", ("original", "internlm2"), {}),
    ])}


def _check(got: dict, expected: dict) -> None:
    torch.testing.assert_close(got["feats"], expected["feats"], atol=1e-5, rtol=0)
    assert got["tokens"] == expected["tokens"]
    assert all(len(t) == N_NEW for t in got["tokens"])


def test_tp_matches_single_process(jobs, tmp_path):
    """tp=2: qwen2 (4 q / 2 kv heads), the 6B-style ViT (q/k RMSNorm over the full width), InternLM2;
    tp=2 driven as the server would (rank 0's Engine, rank 1 following its batches);
    tp=4 with 2 KV heads: ranks 0, 1 both hold KV head 0 and ranks 2, 3 KV head 1."""
    names = list(jobs)
    job, expected = jobs["qwen2"]
    # a smaller tp=4 job keeps 4 ranks on 2 cores quick: one tile, the text and the one-tile request
    tp4_job = {**job, "tiles": job["tiles"][:1], "requests": job["requests"][1:], "embeds": job["embeds"][1:]}
    tp4_expected = {"feats": expected["feats"][:1], "tokens": expected["tokens"][1:]}
    tp2, leader, tp4 = _spawn(4, tmp_path, [(2, "replicated", [jobs[n][0] for n in names]),
                                            (2, "leader", [jobs["internlm2"][0]]),
                                            (4, "replicated", [tp4_job])])
    for name, got in zip(names, tp2):
        _check(got, jobs[name][1])
    assert leader[0]["tokens"] == jobs["internlm2"][1]["tokens"]
    _check(tp4[0], tp4_expected)


def test_tp_prefix_cache_matches_single_process(ckpt, pipe, tmp_path):
    """tp=2 as the server runs it (rank 0's Engine, rank 1 following), multi-turn sessions with
    images through the prefix cache, a pool that forces evictions, chunked prefill and the
    overlap schedule: the same tokens as one process without the cache."""
    from test_prefix_cache import make_sessions, run_sessions

    sessions = make_sessions(pipe, n_sessions=4, turns=3, seed=8)
    config = {"max_req_len": 1024, "max_requests": 8, "batch_max_tokens": 160, "overlap_schedule": True}
    expected = run_sessions(Engine(pipe.model.llm, EngineConfig(max_total_tokens=8192, disable_dynamic_prompt_cache=True,
                                                                **config)), sessions)
    biggest = max(len(r["prompt"]) + len(r["tokens"]) for r in expected.values())
    job = {"ckpt": str(ckpt), "sessions": sessions, "config": {**config, "max_total_tokens": biggest + 1200}}
    [[got]] = _spawn(2, tmp_path, [(2, "sessions", [job])])
    assert got["hit"] > 500 and got["evicted"] > 0
    assert {k: r["tokens"] for k, r in got["results"].items()} == {k: r["tokens"] for k, r in expected.items()}


# ---------------------------------------------------------------------------------------
# Shard shapes and contents (no processes)


def _llm(heads: int, kv: int, **kw) -> LLMConfig:
    return LLMConfig(model_type="qwen2", hidden_size=64, num_layers=1, num_heads=heads, num_kv_heads=kv,
                     intermediate_size=128, vocab_size=10, head_dim=8, **kw)


def _llm_weights(c: LLMConfig) -> dict[str, torch.Tensor]:
    rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    g = torch.Generator().manual_seed(0)
    return {"llm.embed.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g),
            "llm.layers.0.qkv.weight": torch.randn(rows, c.hidden_size, generator=g),
            "llm.layers.0.qkv.bias": torch.randn(rows, generator=g),
            "llm.layers.0.o.weight": torch.randn(c.hidden_size, c.num_heads * c.head_dim, generator=g),
            "llm.layers.0.gate_up.weight": torch.randn(2 * c.intermediate_size, c.hidden_size, generator=g),
            "llm.layers.0.down.weight": torch.randn(c.hidden_size, c.intermediate_size, generator=g),
            "llm.layers.0.norm1.weight": torch.randn(c.hidden_size, generator=g)}


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(-1, d, *t.shape[1:])


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (8, 8, 4), (4, 2, 4), (8, 1, 2), (8, 2, 8)])
def test_llm_shard_shapes_and_kv_replication(heads, kv, tp):
    c = _llm(heads, kv)
    d, w = c.head_dim, _llm_weights(c)
    q_full, k_full, v_full = w["llm.layers.0.qkv.weight"].split([heads * d, kv * d, kv * d])
    hl, kvl, group = heads // tp, local_kv_heads(heads, kv, tp), heads // kv
    assert kvl == max(kv // tp, 1)
    gates, ups = [], []
    for r in range(tp):
        s = shard_llm_weights(w, c, r, tp)
        qkv = s["llm.layers.0.qkv.weight"]
        assert qkv.shape == ((hl + 2 * kvl) * d, c.hidden_size)
        assert s["llm.layers.0.qkv.bias"].shape == (qkv.shape[0],)
        assert s["llm.layers.0.o.weight"].shape == (c.hidden_size, hl * d)
        assert s["llm.layers.0.gate_up.weight"].shape == (2 * c.intermediate_size // tp, c.hidden_size)
        assert s["llm.layers.0.down.weight"].shape == (c.hidden_size, c.intermediate_size // tp)
        assert s["llm.embed.weight"] is w["llm.embed.weight"]  # replicated, not copied
        q, k, v = qkv.split([hl * d, kvl * d, kvl * d])
        torch.testing.assert_close(q, q_full[r * hl * d:(r + 1) * hl * d], rtol=0, atol=0)
        # every local q head's KV head (by the global GQA map) is the local KV head at the local map
        for j in range(hl):
            kv_global = (r * hl + j) // group
            kv_local = j // (hl // kvl)
            torch.testing.assert_close(_heads(k, d)[kv_local], _heads(k_full, d)[kv_global], rtol=0, atol=0)
            torch.testing.assert_close(_heads(v, d)[kv_local], _heads(v_full, d)[kv_global], rtol=0, atol=0)
        gate, up = s["llm.layers.0.gate_up.weight"].chunk(2)
        gates.append(gate)
        ups.append(up)
    full_gate, full_up = w["llm.layers.0.gate_up.weight"].chunk(2)
    torch.testing.assert_close(torch.cat(gates), full_gate, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(ups), full_up, rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv,tp,match", [(4, 2, 3, "num_heads % tp"), (6, 4, 3, "num_kv_heads % tp == 0 or"),
                                               (12, 4, 6, "num_kv_heads % tp == 0 or")])
def test_llm_shard_rejects_bad_head_counts(heads, kv, tp, match):
    c = _llm(heads, kv)
    with pytest.raises(ValueError, match=match):
        shard_llm_weights(_llm_weights(c), c, 0, tp)


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_vision_shard_shapes(checkpoints, vit):
    ckpt = checkpoints("original", "qwen2", vit=vit)
    cfg = load_config(ckpt)
    v = cfg.vision
    w = load_weights(ckpt, cfg, progress=False)
    c, cl, il = v.hidden_size, v.hidden_size // 2, v.intermediate_size // 2
    shards = [shard_vision_weights(w, cfg, r, 2) for r in range(2)]
    p = "vit.layers.0."
    for r, s in enumerate(shards):
        assert s[p + "qkv.weight"].shape == (3 * cl, c)
        if v.qkv_bias:
            assert s[p + "qkv.bias"].shape == (3 * cl,)
        if v.qk_norm:
            assert s[p + "q_norm.weight"].shape == s[p + "k_norm.weight"].shape == (cl,)
        assert s[p + "proj.weight"].shape == (c, cl) and s[p + "proj.bias"].shape == (c,)
        assert s[p + "fc1.weight"].shape == (il, c) and s[p + "fc1.bias"].shape == (il,)
        assert s[p + "fc2.weight"].shape == (c, il) and s[p + "fc2.bias"].shape == (c,)
        assert s["mlp1.fc1.weight"] is w["mlp1.fc1.weight"]
        # q, k and v blocks are each split by heads
        for block in range(3):
            torch.testing.assert_close(s[p + "qkv.weight"][block * cl:(block + 1) * cl],
                                       w[p + "qkv.weight"][block * c + r * cl:block * c + (r + 1) * cl])
    with pytest.raises(ValueError, match="ViT's num_heads % tp"):
        shard_vision_weights(w, cfg, 0, 3)
    # the combined entry point shards both halves; tp=1 is the identity
    both = shard_weights(w, cfg, 1, 2)
    assert both[p + "fc1.weight"].shape == (il, c)
    assert both["llm.layers.0.o.weight"].shape[1] == cfg.llm.num_heads // 2 * cfg.llm.head_dim
    assert all(t is w[k] for k, t in shard_weights(w, cfg, 0, 1).items())


def test_load_sharded_components(checkpoints):
    """The router / visual processes load one component each; sharding needs no process group."""
    ckpt = checkpoints("original", "qwen2")
    cfg = load_config(ckpt)
    w = load_sharded_weights(ckpt, cfg, tp=TPGroup(1, 2, None), components=("llm",), progress=False)
    assert not any(k.startswith(("vit.", "mlp1.")) for k in w)
    heads = cfg.llm.num_heads + 2 * cfg.llm.num_kv_heads
    assert w["llm.layers.0.qkv.weight"].shape[0] == heads // 2 * cfg.llm.head_dim
    w = load_sharded_weights(ckpt, cfg, tp=TPGroup(1, 2, None), components=("vision",), progress=False)
    assert not any(k.startswith("llm.") for k in w)
    assert w["vit.layers.0.fc1.weight"].shape[0] == cfg.vision.intermediate_size // 2
