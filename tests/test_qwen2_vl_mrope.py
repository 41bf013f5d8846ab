"""M-RoPE in the shared decoder (rope_positions [3, T] with the checkpoint's mrope_section) on
every engine path: staggered joins, the overlap schedule, prefill chunks that cut an image,
(emulated) CUDA graphs, and tensor parallelism of the LLM and the ViT. The reference is the
plain eager engine, itself checked against transformers in test_qwen2_vl.py."""

from __future__ import annotations

import pytest
import torch

from conftest import random_image
from mmserver import pipeline

MAX_PIXELS = 28 * 28 * 256


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qdir(request, qwen_checkpoints):
    return qwen_checkpoints(request.param, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def pipe(qdir):
    return pipeline(qdir, device="cpu", dtype="float32", max_total_tokens=8192, max_req_len=4096)


# --------------------------------------------------------------------------- engine paths and TP


def _engine_requests(pipe) -> list[dict]:
    """Requests in the form test_cuda_graphs._generate takes: ids, image rows, M-RoPE keywords."""
    from mmserver.pipeline import ImageInput

    out = []
    specs = [("<image>What is this?", [(230, 150, 21)]), ("Just text, no image at all.", []),
             ("<image> and <image>: compare.", [(120, 310, 22), (300, 250, 23)]), ("<image>", [(60, 60, 24)])]
    for i, (text, sizes) in enumerate(specs):
        prompt = pipe.family.render_chat([{"role": "user", "content": text}])
        p = pipe._prepare(prompt, [ImageInput(random_image(*s)) for s in sizes], {})
        rows = pipe._encode_all(p.visuals)
        out.append({"prompt_ids": p.ids, "images": pipe.image_inputs(p.ids, rows, p.spans),
                    "rope": pipe.family.rope_inputs(p.ids, p.spans, [v.input.grid for v in p.visuals]),
                    "max_new_tokens": 6 + i})
    return out


@pytest.mark.parametrize("emulate,overlap,batch_max_tokens", [(True, True, 8192), (False, True, 29),
                                                             (True, False, 50)])
def test_mrope_on_every_engine_path(pipe, emulate, overlap, batch_max_tokens):
    """Staggered joins, the overlap schedule, prefill chunks starting inside an image and
    (emulated) CUDA graphs: the tokens are those of the plain eager engine."""
    from test_cuda_graphs import _assert_same, _engine, _generate

    requests = _engine_requests(pipe)
    joins = {0: 0, 1: 1, 2: 1, 3: 3}
    expected = _generate(_engine(pipe, cuda_graphs=False), requests, joins)
    assert all(len(expected[i][0]) == r["max_new_tokens"] for i, r in enumerate(requests))
    eng = _engine(pipe, emulate=emulate, overlap_schedule=overlap, batch_max_tokens=batch_max_tokens)
    _assert_same(_generate(eng, requests, joins), expected)
    assert eng.kv.used == 0


def test_mrope_decode_batches_replay_graphs(pipe):
    """Past its prompt an M-RoPE request's three rows agree (p + rope_delta): decode batches of
    image requests take one row of positions and replay the (emulated) graphs, with the tokens
    of the eager engine, which the oracle tests check against transformers."""
    from test_cuda_graphs import _assert_same, _engine, _generate

    requests = [r for r in _engine_requests(pipe) if r["images"]]
    expected = _generate(_engine(pipe, cuda_graphs=False), requests)
    eng = _engine(pipe, emulate=True)
    _assert_same(_generate(eng, requests), expected)
    assert eng.graphs.replays == max(r["max_new_tokens"] for r in requests) - 1  # every decode step


def _tp_worker(rank: int, world: int, init_file: str, ckpt: str, requests: list[dict], out: str) -> None:
    from test_cuda_graphs import _generate

    from mmserver.engine.engine import Engine, EngineConfig
    from mmserver.engine.kv_pool import allocate_kv
    from mmserver.engine.tp import TPLeader, follow
    from mmserver.models.parallel import destroy_tp, init_tp
    from mmserver.models.registry import load_family

    torch.set_num_threads(1)
    tp = init_tp(rank, world, f"file://{init_file}", backend="gloo")
    try:
        model = load_family(ckpt).load_model(progress=False, tp=tp)
        images = [random_image(230, 150, 31), random_image(300, 250, 32)]
        family = model.family
        feats = model.vision.encode_images([family.preprocess(im, family.image_options({}, {})) for im in images])
        cfg = EngineConfig(max_total_tokens=4096, max_requests=8, max_req_len=1024, batch_max_tokens=40,
                           overlap_schedule=True)
        if rank > 0:
            kv, table = allocate_kv(model.llm, cfg)
            follow(model.llm, kv.buffer, table.table, tp)
            return
        leader = TPLeader(model.llm, tp)
        try:
            torch.save({"result": _generate(Engine(leader, cfg), requests), "feats": feats}, out)
        finally:
            leader.stop()
    finally:
        destroy_tp(tp)


def test_tensor_parallel_llm_and_vision(pipe, qdir, tmp_path):
    """--tp 2 and --visual_tp 2 at the model level: the sharded ViT gives the same rows and the
    sharded LLM (a follower rank) the same M-RoPE tokens."""
    import torch.multiprocessing as mp

    from test_cuda_graphs import _generate, _engine

    requests = _engine_requests(pipe)
    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(qdir), requests, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    family = pipe.family
    images = [random_image(230, 150, 31), random_image(300, 250, 32)]
    feats = pipe.model.vision.encode_images([family.preprocess(im, family.image_options({}, {})) for im in images])
    for a, b in zip(got["feats"], feats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    expected = _generate(_engine(pipe, cuda_graphs=False), requests)
    assert {i: t for i, (t, _) in got["result"].items()} == {i: t for i, (t, _) in expected.items()}
