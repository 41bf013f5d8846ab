"""A server that is safe to expose: the API key, and (with the default media policy) image
URLs that point into the server's own network refused. The real server on CPU."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from mmserver.args import ArgError, parse_args
from server_util import start_server, stop_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    # the key from the environment, the way the README recommends (not in the process list)
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "8192",
                       "--image_fetch_timeout", "2", log_dir=tmp_path_factory.mktemp("logs"),
                       env={"MMSERVER_API_KEY": KEY})
    yield srv
    stop_server(srv)


def call(server, path: str, body=None, key: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers); a GET without a body."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GEN = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", KEY[:-1]])
def test_missing_or_wrong_key_is_401(server, key):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
        status, got, headers = call(server, path, body, key)
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        assert set(got["error"]) == {"message", "type", "param", "code"}
        assert got["error"]["type"] == "authentication_error" and "API key" in got["error"]["message"]
    for path, body in (("/generate", GEN), ("/generate_stream", GEN), ("/tokens", {"inputs": "hi"})):
        status, got, _ = call(server, path, body, key)
        assert status == 401 and set(got) == {"message"} and "API key" in got["message"]
    assert call(server, "/generate", GEN, KEY)[0] == 200  # and the server keeps serving


def test_right_key(server):
    status, got, _ = call(server, "/generate", GEN, KEY)
    assert status == 200 and got["count_output_tokens"] >= 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model="any", messages=CHAT["messages"], max_tokens=2)
    assert r.choices[0].message.content is not None
    assert [m.id for m in client.models.list().data]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="any", messages=CHAT["messages"], max_tokens=2)


def test_probes_need_no_key(server):
    assert server.get("/health") == (200, '{"status": "ok"}')
    status, text = server.get("/metrics")
    assert status == 200 and "mmserver_requests_total" in text


# ---------------------------------------------------------------------------------------
# Media URLs, default policy: nothing that resolves into the server's own networks


@pytest.mark.parametrize("host,shown", [("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("[::1]", "::1"),
                                        ("169.254.169.254", "169.254.169.254")])
def test_private_media_urls_refused_by_default(server, host, shown):
    url = f"http://{host}:9/x.png"  # nothing listens: a refusal is the policy's, not a failed connection
    status, got, _ = call(server, "/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}, KEY)
    assert status == 400, got
    message = got["error"]["message"]
    assert message.startswith(f"image 0: URL host {shown} resolves to a ") and "address" in message
    assert message.endswith("; refused (see --allow_private_media_urls)")
    status, got, _ = call(server, "/generate", {"inputs": "<image>", "multimodal_params": {"images": [
        {"type": "url", "data": url}]}}, KEY)
    assert status == 400 and got["message"] == message
    assert call(server, "/generate", GEN, KEY)[0] == 200


def test_private_media_message_names_the_rule(server):
    status, got, _ = call(server, "/generate", {"inputs": "<image>", "multimodal_params": {"images": [
        {"type": "url", "data": "http://127.0.0.1:9/x.png"}]}}, KEY)
    assert status == 400 and got["message"] == ("image 0: URL host 127.0.0.1 resolves to a loopback address; "
                                                 "refused (see --allow_private_media_urls)")


def test_media_flags(tmp_path):
    args = parse_args(["--model_dir", str(tmp_path), "--allowed_media_domains", "A.com, b.org.", "--allow_private_media_urls"])
    assert args.allowed_media_domains == ["a.com", "b.org"] and args.allow_private_media_urls
    defaults = parse_args(["--model_dir", str(tmp_path)])
    assert defaults.allowed_media_domains is None and not defaults.allow_private_media_urls


def test_api_key_flag_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MMSERVER_API_KEY", raising=False)
    assert parse_args(["--model_dir", str(tmp_path)]).api_key is None
    assert parse_args(["--model_dir", str(tmp_path), "--api_key", "a"]).api_key == "a"
    monkeypatch.setenv("MMSERVER_API_KEY", "b")
    assert parse_args(["--model_dir", str(tmp_path)]).api_key == "b"
    assert parse_args(["--model_dir", str(tmp_path), "--api_key", "a"]).api_key == "a"  # the flag wins
    with pytest.raises(ArgError, match="--api_key"):
        parse_args(["--model_dir", str(tmp_path), "--api_key", " "])
