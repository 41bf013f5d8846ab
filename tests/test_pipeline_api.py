"""The offline pipeline's LMDeploy-style API: chat tuples, batches, OpenAI-format messages,
sessions, IMAGE_TOKEN placement, streaming, embeddings inputs, URLs and checkpoint defaults.
(Equality with the server's chat completions is in test_openai.py, which has a server.)"""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch

from conftest import random_image
from server_util import serve_directory
from mmserver import IMAGE_TOKEN, GenerationConfig, Session, pipeline
from mmserver.models.internvl.preprocess import preprocess_image

N = 5
CFG = GenerationConfig(max_new_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def img():
    return random_image(448, 448, 51)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def raw(pipe, content: str, images) -> list[int]:
    """Token ids of a raw prompt built from one user turn with the model's template."""
    prompt = pipe.family.render_chat([{"role": "user", "content": content}])
    return pipe.generate(prompt, images=list(images), gen_config=CFG).token_ids


def test_tuple_inputs_apply_template(pipe, img):
    second = random_image(200, 300, 52)
    assert pipe(("What is it?", img), CFG).token_ids == raw(pipe, "<image>\nWhat is it?", [img])
    two = pipe(("Compare.", [img, second]), CFG)
    assert two.token_ids == raw(pipe, "Image-1: <image>\nImage-2: <image>\nCompare.", [img, second])


def test_image_token_places_the_image(pipe, img):
    text = f"First read this: {IMAGE_TOKEN}\nthen answer."
    # The image goes where the text puts it, and nowhere else (two placeholders would be an error).
    assert pipe((text, img), CFG).token_ids == raw(pipe, text, [img])


def test_batch_with_progress_bar(pipe, img, capsys):
    items = [("What is it?", img), "A text question.", ("Describe.", [img])]
    batch = pipe(items, CFG)
    err = capsys.readouterr().err
    assert "generating" in err  # tqdm's bar, cleared at the end (leave=False)
    assert [r.token_ids for r in batch] == [pipe(x, CFG).token_ids for x in items]
    assert [r.index for r in batch] == [0, 1, 2]
    assert "generating" not in capsys.readouterr().err  # single inputs: no bar


def test_openai_format_messages(pipe, img):
    conversation = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                 {"type": "text", "text": "What is it?"}]}]
    one = pipe(conversation, CFG)
    assert one.token_ids == pipe(("What is it?", img), CFG).token_ids
    both = pipe([conversation, [{"role": "user", "content": "A text question."}]], CFG)
    assert [r.token_ids for r in both] == [one.token_ids, pipe("A text question.", CFG).token_ids]
    wide = random_image(896, 448, 53)  # 2 tiles + a thumbnail; 1 tile when capped at 1
    capped = pipe([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(wide), "max_dynamic_patch": 1}},
        {"type": "text", "text": "hi"}]}], CFG)
    assert capped.token_ids == pipe(("hi", wide), GenerationConfig(max_new_tokens=N, ignore_eos=True,
                                                                   image_max_patch_num=1)).token_ids
    assert capped.prompt_tokens == pipe(("hi", wide), CFG).prompt_tokens - 2 * 256


def test_chat_session_equals_whole_history(pipe, img):
    sess = pipe.chat(("Describe this.", img), gen_config=CFG)
    assert isinstance(sess, Session) and sess.response.token_ids == pipe(("Describe this.", img), CFG).token_ids
    first = sess.response.text
    sess = pipe.chat("And the colors?", session=sess, gen_config=CFG)
    whole = pipe([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                     {"type": "text", "text": "Describe this."}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And the colors?"},
    ], CFG)
    assert sess.response.token_ids == whole.token_ids and sess.response.text == whole.text
    assert [m.role for m in sess.messages] == ["user", "assistant", "user", "assistant"]
    assert len(sess.messages[0].images) == 1


def test_stream_infer_reassembles(pipe, img):
    inputs = [("What is it?", img), "Tell me a story."]
    steps = list(pipe.stream_infer(inputs, CFG))
    whole = pipe(inputs, CFG)
    for i, want in enumerate(whole):
        mine = [s for s in steps if s.index == i]
        assert "".join(s.text for s in mine) == want.text
        assert [t for s in mine for t in s.token_ids] == want.token_ids
        assert [s.finish_reason for s in mine] == [None] * (N - 1) + ["length"]
        assert [s.generated_tokens for s in mine] == list(range(1, N + 1))
    stop = whole[1].text[2:4]
    cut = list(pipe.stream_infer("Tell me a story.", GenerationConfig(max_new_tokens=N, ignore_eos=True,
                                                                      stop_sequences=[stop])))
    assert "".join(s.text for s in cut) == whole[1].text[:whole[1].text.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_stream_infer_stopped_early_frees_the_engine(pipe):
    stream = pipe.stream_infer("A long answer.", GenerationConfig(max_new_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert pipe.engine.kv.used == 0 and not pipe.engine.has_work()


def test_embeddings_in_place_of_an_image(pipe, img):
    rows = pipe.model.vision.encode(preprocess_image(img)).reshape(-1, pipe.cfg.llm.hidden_size)
    by_image = pipe(("What is it?", img), CFG)
    assert pipe(("What is it?", rows), CFG).token_ids == by_image.token_ids
    assert pipe(("What is it?", rows.numpy()), CFG).token_ids == by_image.token_ids  # via DLPack
    other = random_image(600, 300, 54)
    mixed = pipe(("Compare.", [img, rows]), CFG)
    assert mixed.token_ids == pipe(("Compare.", [img, img]), CFG).token_ids
    with pytest.raises(ValueError, match=r"embeds 0: shape \(300, 64\) is not \[k·256, 64\]"):
        pipe(("x", torch.zeros(300, 64)), CFG)
    with pytest.raises(ValueError, match="embeds 1: dtype torch.int64 is not a float type"):
        pipe(("x", [other, torch.zeros(256, 64, dtype=torch.int64)]), CFG)


@pytest.fixture
def image_url_server(img, tmp_path):
    """A local HTTP server that serves `img` as /img.png."""
    img.save(tmp_path / "img.png")
    with serve_directory(tmp_path) as url:
        yield url


def test_image_urls(pipe, img, image_url_server):
    want = pipe(("What is it?", img), CFG).token_ids
    assert pipe(("What is it?", image_url_server + "/img.png"), CFG).token_ids == want
    assert pipe(("What is it?", data_url(img)), CFG).token_ids == want
    with pytest.raises(ValueError, match="image 0: cannot read"):
        pipe(("What is it?", image_url_server + "/missing.png"), CFG)


def test_generation_config_json_defaults(ckpt, pipe, tmp_path):
    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    gen_path = local / "generation_config.json"
    gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), "max_new_tokens": 4,
                                    "repetition_penalty": 1.5, "top_k": 20}))
    custom = pipeline(local, device="cpu", dtype="float32")
    d = custom.default_gen_config
    assert (d.max_new_tokens, d.repetition_penalty, d.top_k, d.do_sample) == (4, 1.5, 20, False)
    got = custom("Tell me a story.")
    assert got.token_ids == pipe("Tell me a story.", GenerationConfig(max_new_tokens=4, repetition_penalty=1.5,
                                                                      top_k=20)).token_ids
    explicit = GenerationConfig(max_new_tokens=6, ignore_eos=True)  # wins entirely: no penalty from the file
    assert custom("Tell me a story.", explicit).token_ids == pipe("Tell me a story.", explicit).token_ids
    assert pipe.default_gen_config == GenerationConfig()  # the tiny checkpoint sets no sampling fields
