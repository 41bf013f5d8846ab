"""POST /v1/completions with the official `openai` client against the real server on CPU,
compared with /generate on the same token ids."""

from __future__ import annotations

import json

import openai
import pytest

from server_util import start_server, stop_server

MAX_LEN = 2048


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    # Text only (no --enable_multimodal): completions take no images, and this is the text-only server's test
    srv = start_server(ckpt, "--max_total_token_num", "16384",
                       "--max_req_total_len", str(MAX_LEN), log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from mmserver.models.tokenizer import load_tokenizer

    return load_tokenizer(str(ckpt))


def complete(client, prompt, max_tokens: int = 5, **kw):
    return client.completions.create(model="any", prompt=prompt, max_tokens=max_tokens,
                                     extra_body={"ignore_eos": True, **kw.pop("extra_body", {})}, **kw)


def generate(server, prompt: str, n: int = 5, **params) -> dict:
    status, body = server.post("/generate", {"inputs": prompt, "parameters": {
        "max_new_tokens": n, "ignore_eos": True, "return_details": True, **params}})
    assert status == 200, body
    return body


PROMPT = "The quick brown fox"


def test_string_prompt_equals_generate(server, client):
    r = complete(client, PROMPT)
    want = generate(server, PROMPT)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0]
    assert r.choices[0].text == want["generated_text"][0] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == want["prompt_tokens"] and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == want["prompt_tokens"] + 5


def test_token_id_prompts(client, tokenizer):
    ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    by_text = complete(client, PROMPT)
    by_ids = complete(client, ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    other = tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    both = complete(client, [ids, other])
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.choices[1].text == complete(client, "Hello there").choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(other) and both.usage.completion_tokens == 10


def test_list_of_strings_and_n(client):
    """choice index = prompt_index * n + sample_index; seeded samples reproducible."""
    r = complete(client, [PROMPT, "Hello there"], n=2, seed=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = complete(client, [PROMPT, "Hello there"], n=2, seed=3, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert r.choices[1].text == complete(client, PROMPT, seed=4, temperature=1.0).choices[0].text
    assert r.choices[2].text == complete(client, "Hello there", seed=3, temperature=1.0).choices[0].text
    single = complete(client, [PROMPT, "Hello there"])
    assert r.usage.prompt_tokens == single.usage.prompt_tokens and r.usage.completion_tokens == 4 * 5


def test_n_seeded_reproducible(client):
    r = complete(client, PROMPT, n=3, seed=11, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1
    assert [c.text for c in complete(client, PROMPT, n=3, seed=11, temperature=1.0).choices] == texts


def test_echo(client, tokenizer):
    plain = complete(client, PROMPT)
    echoed = complete(client, PROMPT, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    by_ids = complete(client, ids, echo=True)
    assert by_ids.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True) + plain.choices[0].text


def test_stream_equals_non_stream(client):
    whole = complete(client, [PROMPT, "Hello there"], n=2, seed=9, temperature=1.0, echo=True)
    texts, reasons, usage = [""] * 4, [None] * 4, None
    for chunk in complete(client, [PROMPT, "Hello there"], n=2, seed=9, temperature=1.0, echo=True, stream=True,
                          stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
            continue
        c = chunk.choices[0]
        texts[c.index] += c.text
        reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in whole.choices]
    assert reasons == ["length"] * 4
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_raw_ends_with_done(server):
    import http.client

    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [line[6:] for line in resp.read().decode().split("\n") if line.startswith("data: ")]
    conn.close()
    assert resp.status == 200 and events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_logprobs(server, client):
    r = complete(client, PROMPT, logprobs=1)
    lp = r.choices[0].logprobs
    want = generate(server, PROMPT)
    assert lp.token_logprobs == pytest.approx([t["logprob"] for t in want["tokens"]])
    assert lp.tokens == [t["text"] for t in want["tokens"]]
    assert [list(d.items()) for d in lp.top_logprobs] == [[(t, p)] for t, p in zip(lp.tokens, lp.token_logprobs)]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert complete(client, PROMPT).choices[0].logprobs is None
    streamed = []
    for chunk in complete(client, PROMPT, logprobs=0, stream=True):
        if chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs)


BAD = {
    "missing_prompt": ({}, "'prompt' is required", "prompt"),
    "bad_prompt": ({"prompt": [1, "a"]}, "'prompt' must be a string", "prompt"),
    "empty_prompt_list": ({"prompt": []}, "'prompt' must be a string", "prompt"),
    "token_out_of_vocab": ({"prompt": [1, 10**9]}, "prompt[0][1]: token id 1000000000 is outside the vocabulary",
                           "prompt"),
    "negative_token": ({"prompt": [[5], [-1]]}, "prompt[1][0]: token id -1 is outside", "prompt"),
    "image_token": ({"prompt": "<IMG_CONTEXT> hi"}, "prompt[0] contains the model's reserved image token", "prompt"),
    "empty_string": ({"prompt": ""}, "prompt[0] is empty (0 tokens)", "prompt"),
    "n_over_max": ({"prompt": "hi", "n": 9}, "'n' must be an integer in [1, 8] (--max_n), got 9", "n"),
    "best_of": ({"prompt": "hi", "best_of": 3}, "'best_of' other than n is not supported", "best_of"),
    "suffix": ({"prompt": "hi", "suffix": "end"}, "unsupported parameter(s): suffix", "suffix"),
    "logit_bias": ({"prompt": "hi", "logit_bias": {"5": 10}}, "unsupported parameter(s): logit_bias", "logit_bias"),
    "logprobs_type": ({"prompt": "hi", "logprobs": True}, "'logprobs' must be an integer in [0, 20]", "logprobs"),
    "logprobs_echo": ({"prompt": "hi", "logprobs": 1, "echo": True}, "needs prompt log-probabilities", "logprobs"),
    "echo_type": ({"prompt": "hi", "echo": "yes"}, "'echo' must be a boolean", "echo"),
    "bad_temperature": ({"prompt": "hi", "temperature": -1}, "'temperature' must be", "temperature"),
    "bad_stop": ({"prompt": "hi", "stop": [1]}, "'stop'", "stop"),
    "too_long": ({"prompt": "x " * 3000}, f"exceeds max_req_total_len {MAX_LEN}", None),
    "images_not_here": ({"prompt": "hi", "multimodal_params": {"images": []}}, "unsupported parameter(s)",
                        "multimodal_params"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_requests(server, name):
    body, message, param = BAD[name]
    status, got = server.post("/v1/completions", {"max_tokens": 2, **body})
    assert status == 400, got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == "invalid_request_error" and message in got["error"]["message"], got
    assert got["error"]["param"] == param
    ok_status, ok = server.post("/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert ok_status == 200 and ok["usage"]["completion_tokens"] <= 2


def test_harmless_fields_ignored(client):
    r = client.completions.create(model="any", prompt=PROMPT, max_tokens=2, user="me", logit_bias={}, best_of=1,
                                  suffix=None, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model="any", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_text_only_server_is_healthy(server):
    """Without --enable_multimodal there is no visual process; the router must not take the
    unused visual pipe's EOF for a dead server (it exited, and /health said so)."""
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
