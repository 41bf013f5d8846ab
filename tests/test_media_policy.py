"""The media URL policy: the address classifier, the host rules, and the fetcher (one DNS
lookup per hop, the connection to the checked address, every redirect hop checked).
Loopback servers only; a test classifier or lookup stands in for public addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from aiohttp import web

from mmserver.frontend.errors import BadRequest
from mmserver.frontend.images import MediaFetcher
from mmserver.frontend.media_policy import MediaPolicy, MediaURLRefused, PolicyResolver, special_kind

REFUSED = {
    "10.1.2.3": "private", "172.16.0.1": "private", "172.31.255.254": "private", "192.168.1.1": "private",
    "169.254.169.254": "link-local", "100.64.0.1": "shared (100.64.0.0/10)", "100.127.255.254": "shared (100.64.0.0/10)",
    "0.0.0.0": "unspecified", "127.0.0.1": "loopback", "127.8.9.10": "loopback", "224.0.0.1": "multicast",
    "240.0.0.1": "reserved", "::": "unspecified", "::1": "loopback", "fe80::1": "link-local", "fc00::1": "private",
    "fd12:3456::1": "private", "ff02::1": "multicast", "::ffff:127.0.0.1": "loopback", "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "link-local", "2002:7f00:1::": "loopback",  # 6to4 around 127.0.0.1
    "2001:db8::1": "private",  # documentation
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("addr", list(REFUSED))
def test_special_addresses_are_refused(addr):
    assert special_kind(ipaddress.ip_address(addr)) == REFUSED[addr]


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_pass(addr):
    assert special_kind(ipaddress.ip_address(addr)) is None


def test_host_rules():
    policy = MediaPolicy.from_args(["Images.Example.com", "cdn.example.org."], allow_private=False)
    policy.check_host("images.example.COM")  # exact host, case-insensitive, trailing dot ignored
    policy.check_host("cdn.example.org.")
    for host in ("example.com", "evil.images.example.com", "images.example.com.evil.net"):
        with pytest.raises(MediaURLRefused, match=f"URL host {host} is not in --allowed_media_domains; refused"):
            policy.check_host(host)
    with pytest.raises(MediaURLRefused, match=r"URL host 127\.0\.0\.1 resolves to a loopback address; refused "
                                              r"\(see --allow_private_media_urls\)"):
        MediaPolicy().check_host("127.0.0.1")
    with pytest.raises(MediaURLRefused, match="link-local"):
        MediaPolicy().check_host("fe80::1%eth0")
    MediaPolicy(allow_private=True).check_host("127.0.0.1")
    MediaPolicy().check_host("8.8.8.8")
    MediaPolicy().check_host("example.com")  # a name: its addresses are checked when resolved


def lookup_table(table: dict[str, list[str]], calls: list[str]):
    async def lookup(host: str, port: int, family: int) -> list[tuple[int, str]]:
        calls.append(host)
        answers = table[host]
        addr = answers[min(len(calls), len(answers)) - 1]  # a later call may get another answer
        return [(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)]
    return lookup


def test_resolver_refuses_a_host_with_any_bad_address():
    async def lookup(host, port, family):
        return [(socket.AF_INET, "93.184.216.34"), (socket.AF_INET, "10.0.0.7")]

    with pytest.raises(MediaURLRefused, match=r"URL host mixed\.test resolves to a private address \(10\.0\.0\.7\)"):
        asyncio.run(PolicyResolver(MediaPolicy(), lookup).resolve("mixed.test", 80))
    got = asyncio.run(PolicyResolver(MediaPolicy(allow_private=True), lookup).resolve("mixed.test", 80))
    assert [r["host"] for r in got] == ["93.184.216.34", "10.0.0.7"]


# ---------------------------------------------------------------------------------------
# The fetcher against a loopback server

PNG = b"\x89PNG fake image bytes"


def only_127_0_0_1_is_public(ip) -> str | None:
    """A test classifier: the loopback test server plays a public host."""
    return None if str(ip) == "127.0.0.1" else special_kind(ip)


async def _serve(fn):
    """Run `fn(base_url, seen_hosts)` against a local server: /img, /to?url=… (302), /loop."""
    seen: list[str] = []

    async def img(request):
        seen.append(request.headers["Host"])
        return web.Response(body=PNG)

    async def to(request):
        raise web.HTTPFound(request.query["url"])

    async def loop(request):
        raise web.HTTPFound("/loop")

    app = web.Application()
    app.router.add_get("/img", img)
    app.router.add_get("/to", to)
    app.router.add_get("/loop", loop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(port, seen)
    finally:
        await runner.cleanup()


def fetch_with(policy: MediaPolicy, url_of, lookup=None, check=None):
    async def run(port, seen):
        fetcher = MediaFetcher(policy, lookup) if lookup else MediaFetcher(policy)
        try:
            got = await fetcher.fetch(url_of(port), 0, timeout=5, max_bytes=1 << 20)
        finally:
            await fetcher.close()
        if check:
            check(port, seen)
        return got
    return asyncio.run(_serve(run))


def refused(policy: MediaPolicy, url_of, lookup=None) -> str:
    with pytest.raises(BadRequest) as e:
        fetch_with(policy, url_of, lookup)
    return e.value.message


@pytest.mark.parametrize("host,kind", [("127.0.0.1", "loopback"), ("localhost", "loopback"),
                                       ("[::1]", "loopback"), ("[::ffff:127.0.0.1]", "loopback"),
                                       ("0.0.0.0", "unspecified")])
def test_loopback_refused_by_default(host, kind):
    msg = refused(MediaPolicy(), lambda port: f"http://{host}:{port}/img")
    assert msg.startswith("image 0: URL host ") and f"resolves to a {kind} address" in msg  # (yarl writes
    assert msg.endswith("refused (see --allow_private_media_urls)")  # ::ffff:127.0.0.1 as ::ffff:7f00:1)
    if host == "127.0.0.1":
        assert msg == ("image 0: URL host 127.0.0.1 resolves to a loopback address; refused "
                       "(see --allow_private_media_urls)")


def test_loopback_fetched_with_allow_private():
    assert fetch_with(MediaPolicy(allow_private=True), lambda port: f"http://127.0.0.1:{port}/img") == PNG
    assert fetch_with(MediaPolicy(allow_private=True), lambda port: f"http://localhost:{port}/img") == PNG


def test_one_lookup_and_the_checked_address_is_used():
    """DNS rebinding: the first answer is checked and connected to; a second lookup (which
    would answer with the metadata address) never happens. The Host header keeps the name."""
    calls: list[str] = []
    lookup = lookup_table({"media.test": ["127.0.0.1", "169.254.169.254"]}, calls)

    def check(port, seen):
        assert calls == ["media.test"] and seen == [f"media.test:{port}"]

    got = fetch_with(MediaPolicy(classify=only_127_0_0_1_is_public), lambda port: f"http://media.test:{port}/img",
                     lookup, check)
    assert got == PNG


def test_every_redirect_hop_is_checked():
    policy = MediaPolicy(classify=only_127_0_0_1_is_public)
    calls: list[str] = []
    lookup = lookup_table({"internal.test": ["10.0.0.5"]}, calls)
    msg = refused(policy, lambda port: f"http://127.0.0.1:{port}/to?url=http://internal.test:{port}/img", lookup)
    assert "redirect 1 to http://internal.test:" in msg
    assert "URL host internal.test resolves to a private address (10.0.0.5); refused" in msg
    msg = refused(policy, lambda port: f"http://127.0.0.1:{port}/to?url=http://127.0.0.2:{port}/img")
    assert "redirect 1 to http://127.0.0.2:" in msg and "URL host 127.0.0.2 resolves to a loopback address" in msg
    # a redirect that stays allowed is followed
    assert fetch_with(policy, lambda port: f"http://127.0.0.1:{port}/to?url=/img") == PNG


def test_redirect_off_the_allow_list_is_refused():
    policy = MediaPolicy.from_args(["127.0.0.1"], allow_private=True)
    msg = refused(policy, lambda port: f"http://127.0.0.1:{port}/to?url=http://localhost:{port}/img")
    assert "redirect 1 to http://localhost:" in msg and "URL host localhost is not in --allowed_media_domains" in msg
    assert fetch_with(policy, lambda port: f"http://127.0.0.1:{port}/img") == PNG
    msg = refused(policy, lambda port: f"http://localhost:{port}/img")
    assert msg == "image 0: URL host localhost is not in --allowed_media_domains; refused"


def test_redirects_are_capped():
    msg = refused(MediaPolicy(allow_private=True), lambda port: f"http://127.0.0.1:{port}/loop")
    assert msg == "image 0: more than 3 redirects"
