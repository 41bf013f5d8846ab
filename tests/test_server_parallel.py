"""The same outputs with tensor-parallel model workers and data/tensor-parallel ViT workers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import gen_body, start_server, stop_server

N = 5


@pytest.fixture(scope="module")
def requests_and_expected(ckpt):
    pipe = pipeline(ckpt, device="cpu", dtype="float32")
    cases = [("Hello there, tell me a story.", []),
             ("<image>\nWhat is this?", [random_image(448, 448, 51)]),
             ("<image>\nDescribe.", [random_image(1000, 600, 52)]),
             ("Image-1: <image>\nImage-2: <image>\nCompare.", [random_image(300, 800, 53), random_image(640, 480, 54)])]
    cfg = GenerationConfig(max_new_tokens=N, ignore_eos=True)
    return [(gen_body(p, imgs, max_new_tokens=N, ignore_eos=True, return_details=True),
             pipe.generate(p, images=imgs, gen_config=cfg).token_ids) for p, imgs in cases]


@pytest.mark.parametrize("flags", [["--tp", "2"], ["--visual_dp", "2"], ["--visual_tp", "2"]],
                         ids=["tp2", "visual_dp2", "visual_tp2"])
def test_parallel_workers_match_pipeline(ckpt, tmp_path, requests_and_expected, flags):
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "16384", "--visual_infer_batch_size", "2",
                       *flags, log_dir=tmp_path)
    try:
        work = requests_and_expected * 2  # concurrent, so both ViT groups get batches
        with ThreadPoolExecutor(len(work)) as pool:
            results = list(pool.map(lambda item: srv.post("/generate", item[0]), work))
        for (status, body), (_, want) in zip(results, work):
            assert status == 200, body
            assert [t["id"] for t in body["tokens"]] == want
    finally:
        assert stop_server(srv) == 0
