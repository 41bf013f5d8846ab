"""LMDeploy-style pipeline options on a tiny LLaVA-1.5 checkpoint: the engine, chat-template and
vision configs (TurbomindEngineConfig / PytorchEngineConfig aliases), unknown names refused by
name, session_len enforced, a named template, `mmserver.vl`, and the server's --chat_template."""

from __future__ import annotations

import os

import pytest

from conftest import random_image
from mmserver import (ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, VisionConfig,
                      pipeline)


@pytest.fixture(scope="module")
def ldir(llava_checkpoints):
    return llava_checkpoints("llava", "vicuna")


@pytest.fixture(scope="module")
def opipe(ldir):
    return pipeline(ldir, device="cpu", dtype="float32",
                    backend_config=TurbomindEngineConfig(session_len=2048, max_batch_size=4,
                                                         cache_max_entry_count=4096),
                    chat_template_config=ChatTemplateConfig(model_name="llava-v1", system="Be brief."),
                    vision_config=VisionConfig(max_batch_size=1))


def _gen(n=6):
    return GenerationConfig(max_new_tokens=n, ignore_eos=True)


def test_aliases_and_unknown_names(ldir):
    assert TurbomindEngineConfig is PytorchEngineConfig
    with pytest.raises(TypeError, match="quant_polcy"):
        TurbomindEngineConfig(tp=1, quant_polcy=4)
    with pytest.raises(TypeError, match="sytem"):
        ChatTemplateConfig(model_name="llava-v1", sytem="x")
    with pytest.raises(TypeError, match="max_batchsize"):
        pipeline(ldir, device="cpu", max_batchsize=3)
    with pytest.raises(ValueError, match="session_len"):
        TurbomindEngineConfig(session_len=0)


def test_engine_knobs(opipe):
    cfg = opipe.engine.config
    assert (cfg.max_req_len, cfg.max_requests, cfg.max_total_tokens) == (2048, 4, 4096)


def test_session_len_enforced(opipe):
    with pytest.raises(ValueError, match="exceeds session_len 2048"):
        opipe(("Describe.", random_image(100, 100, 1)), _gen(1500))
    assert opipe.engine.kv.used == 0


def test_named_template_and_system(opipe):
    prompt = opipe.family.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert prompt == "Be brief. USER: <image>\nHi ASSISTANT: "
    img = random_image(300, 200, 2)
    got = opipe(("Hi", img), _gen())
    assert got.token_ids == opipe.generate(prompt, images=[img], gen_config=_gen()).token_ids


def test_vision_batches_give_the_same_rows(opipe, ldir):
    imgs = [random_image(300, 200, 3), random_image(200, 300, 4)]
    plain = pipeline(ldir, device="cpu", dtype="float32")
    prompt = "USER: <image>\n<image>\ncompare ASSISTANT:"
    assert opipe.generate(prompt, images=imgs, gen_config=_gen()).token_ids == \
        plain.generate(prompt, images=imgs, gen_config=_gen()).token_ids


@pytest.mark.parametrize("which", ["llava", "internvl"])
def test_tp2_matches_tp1_and_leaves_no_child(which, ldir, ckpt):
    """tp=2: this process is rank 0 and one spawned follower (gloo) runs the other shard; greedy
    tokens equal tp=1's for a text and an image prompt, and close() reaps the follower."""
    import multiprocessing

    model = ldir if which == "llava" else ckpt
    opts = dict(session_len=4096, max_batch_size=2, cache_max_entry_count=8192)
    one = pipeline(model, device="cpu", dtype="float32", backend_config=TurbomindEngineConfig(tp=1, **opts))
    two = pipeline(model, device="cpu", dtype="float32", backend_config=PytorchEngineConfig(tp=2, **opts))
    try:
        pids = [p.pid for p in two._tp.procs]
        assert len(pids) == 1 and two._tp.procs[0].is_alive()
        assert two.engine.config.max_total_tokens == one.engine.config.max_total_tokens
        img = random_image(300, 200, 5)
        for inputs in ("Tell me a story", ("Describe this", img)):
            assert two(inputs, _gen(8)).token_ids == one(inputs, _gen(8)).token_ids
        batch = two(["Hi", ("What is it?", img)], _gen(5))
        assert [r.token_ids for r in batch] == [r.token_ids for r in one(["Hi", ("What is it?", img)], _gen(5))]
    finally:
        two.close()
    two.close()  # idempotent
    assert multiprocessing.active_children() == []
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_vl_names(tmp_path):
    from mmserver.vl import load_image
    from mmserver.vl.constants import IMAGE_TOKEN

    assert IMAGE_TOKEN == "<image>"
    path = tmp_path / "x.png"
    random_image(20, 10, 5).save(path)
    im = load_image(str(path))
    assert im.size == (20, 10) and im.mode == "RGB"


def test_chat_template_flag(ldir, tmp_path, monkeypatch):
    from mmserver.args import ArgError, parse_args
    from mmserver.models.chat_templates import ENV
    from mmserver.models.registry import load_family

    # parse_args exports the template for the server's children: undo that for the tests after this one
    monkeypatch.setenv(ENV, "")
    monkeypatch.delenv(ENV)
    with pytest.raises(ArgError, match="--chat_template"):
        parse_args(["--model_dir", str(ldir), "--device", "cpu", "--chat_template", "no-such-template"])
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}"
                   "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}"
                   "{% if add_generation_prompt %}<bot>{% endif %}")
    parse_args(["--model_dir", str(ldir), "--device", "cpu", "--chat_template", str(tpl)])
    assert os.environ[ENV] == str(tpl)
    fam = load_family(ldir)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "hi"}]}]
    assert fam.render_chat(msgs) == "<user><image>hi<bot>"
    monkeypatch.setenv(ENV, "vicuna")
    assert load_family(ldir).render_chat(msgs).endswith("USER: <image>\nhi ASSISTANT: ")
    monkeypatch.delenv(ENV)
    assert load_family(ldir).render_chat(msgs) == "USER: <image>\nhi ASSISTANT:"
