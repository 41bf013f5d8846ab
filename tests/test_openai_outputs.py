"""Log-probabilities (top_logprobs) and structured outputs over HTTP: the official `openai`
client and /generate against the real text-only server on CPU, overlap schedule forced on."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from server_util import start_server, stop_server


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = start_server(ckpt, "--max_total_token_num", "16384", "--max_req_total_len", "2048",
                       "--overlap_schedule", "on",  # grammar rows resolve first; others keep the overlap
                       # Repeated prompts compare logprobs exactly: a prefix-cache hit prefills only the
                       # rest, which rounds ~1e-6 differently on CPU (test_prefix_cache covers the cache).
                       "--disable_dynamic_prompt_cache",
                       log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def family(ckpt):
    from mmserver.models.registry import load_family

    return load_family(ckpt)


HELLO = [{"role": "user", "content": "Say hello."}]


def generate(server, inputs: str, **params) -> dict:
    status, body = server.post("/generate", {"inputs": inputs, "parameters": {
        "max_new_tokens": 6, "ignore_eos": True, "return_details": True, **params}})
    assert status == 200, body
    return body


# ---------------------------------------------------------------------------------------
# Log-probabilities


def test_chat_logprobs_stream_equals_non_stream_and_generate(server, client, family):
    kw = dict(model="any", messages=HELLO, max_tokens=6, logprobs=True, top_logprobs=5,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6 == whole.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 5
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)  # greedy: first
        assert e.top_logprobs[0].bytes == e.bytes and bytes(e.bytes).decode(errors="replace") == e.token
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(x <= 0 for x in lps)
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    # the chosen logprob is /generate's for the same prompt ids
    want = generate(server, family.render_chat(HELLO))
    assert want["prompt_tokens"] == whole.usage.prompt_tokens
    assert [e.logprob for e in content] == pytest.approx([t["logprob"] for t in want["tokens"]], abs=1e-6)
    plain = client.chat.completions.create(model="any", messages=HELLO, max_tokens=6, extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content
    bare = client.chat.completions.create(model="any", messages=HELLO, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_generate_top_logprobs(server, family):
    prompt = family.render_chat(HELLO)
    body = generate(server, prompt, top_logprobs=3)
    for t in body["tokens"]:
        assert len(t["top_logprobs"]) == 3 and set(t["top_logprobs"][0]) == {"id", "text", "logprob"}
        assert (t["top_logprobs"][0]["id"], t["top_logprobs"][0]["logprob"]) == (t["id"], t["logprob"])
    assert "top_logprobs" not in generate(server, prompt)["tokens"][0]
    status, events = server.stream({"inputs": prompt, "parameters": {"max_new_tokens": 6, "ignore_eos": True,
                                                                     "top_logprobs": 3}})
    assert status == 200 and len(events) == 6
    assert [e["token"]["top_logprobs"] for e in events] == [t["top_logprobs"] for t in body["tokens"]]
    status, err = server.post("/generate", {"inputs": "hi", "parameters": {"top_logprobs": 21}})
    assert status == 400 and "top_logprobs" in err["message"]


def test_completions_logprobs_alternatives(client):
    r = client.completions.create(model="any", prompt="The quick brown fox", max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 5
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and list(top.items())[0] == (tok, chosen)
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_logprobs_field_errors(server):
    for body, param in [({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_logprobs": 2}, "top_logprobs")]:
        status, got = server.post("/v1/chat/completions", {"messages": HELLO, **body})
        assert status == 400 and got["error"]["param"] == param, got


# ---------------------------------------------------------------------------------------
# Structured outputs

SCHEMA = {"type": "object", "properties": {
    "color": {"type": "string", "enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 1, "maximum": 50}}, "required": ["color", "count"]}


def chat_text(client, max_tokens: int = 60, content: str = "Describe a thing.", **kw):
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": content}],
                                       max_tokens=max_tokens, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_json_schema(client):
    text, reason = chat_text(client, response_format={"type": "json_schema", "json_schema": {
        "name": "thing", "schema": SCHEMA, "strict": True}})
    assert reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"color", "count"} and value["color"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and 1 <= value["count"] <= 50
    # vLLM's names, in chat and in completions
    assert json.loads(chat_text(client, extra_body={"structured_outputs": {"json": SCHEMA}})[0]) == value
    assert json.loads(chat_text(client, extra_body={"guided_json": SCHEMA})[0]) == value
    r = client.completions.create(model="any", prompt="A thing:", max_tokens=60, extra_body={"guided_json": SCHEMA})
    assert set(json.loads(r.choices[0].text)) == {"color", "count"}


def test_regex_choice_and_json_object(client, server):
    text, reason = chat_text(client, extra_body={"structured_outputs": {"regex": "[a-d]{3,6}-[0-9]{2}"}})
    assert reason == "stop" and re.fullmatch("[a-d]{3,6}-[0-9]{2}", text), text
    text, reason = chat_text(client, extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert reason == "stop" and text in ("alpha", "beta", "gamma")
    # any JSON object: a random-weight model fills strings with anything, so this prompt is one
    # whose (deterministic) object ends early
    text, reason = chat_text(client, max_tokens=100, content="Give me JSON.", response_format={"type": "json_object"})
    assert reason == "stop" and len(json.loads(text)) == 1, text
    assert chat_text(client, max_tokens=3, response_format={"type": "text"}) == chat_text(client, max_tokens=3)
    body = generate(server, "Pick one:", max_new_tokens=20, ignore_eos=False,
                    structured_outputs={"choice": ["up", "down"]})
    assert body["generated_text"][0] in ("up", "down") and body["finish_reason"] == "stop"
    body = generate(server, "Pick one:", max_new_tokens=20, ignore_eos=False,
                    response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert set(json.loads(body["generated_text"][0])) == {"color", "count"}


BAD = {
    "schema": ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
               "response_format", "invalid JSON schema"),
    "regex": ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "invalid regex"),
    "choice": ({"guided_choice": []}, "guided_choice", "choice must be a non-empty list"),
    "format_type": ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
    "two": ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "exactly one"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_invalid_constraint_is_400(server, name):
    body, param, message = BAD[name]
    status, got = server.post("/v1/chat/completions", {"messages": HELLO, "max_tokens": 4, **body})
    assert status == 400 and got["error"]["param"] == param and message in got["error"]["message"], got
    status, got = server.post("/generate", {"inputs": "hi", "parameters": {"structured_outputs": {"regex": "("}}})
    assert status == 400 and "parameter 'structured_outputs' is invalid: invalid regex" in got["message"], got
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
            model="any", prompt="x", extra_body={"guided_json": {"type": "nonsense"}})


def test_plain_request_beside_a_grammar_request(client):
    """With the overlap schedule on, a grammar request in the batch does not change a plain one."""
    plain = dict(content="Tell me a story.", max_tokens=40, extra_body={"ignore_eos": True})
    alone = chat_text(client, **plain)
    pattern = "[a-z ]{30,60}"
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(chat_text, client, max_tokens=70, extra_body={"structured_outputs": {
            "regex": pattern}}) for _ in range(2)]
        together = [pool.submit(chat_text, client, **plain) for _ in range(2)]
        assert [f.result() for f in together] == [alone] * 2
        for f in constrained:
            text, reason = f.result()
            assert reason == "stop" and re.fullmatch(pattern, text), text
