"""Which media URLs the server may fetch (server-side request forgery guard).

By default a URL may name any host, but every address its host resolves to must be public:
loopback, private, link-local (cloud metadata at 169.254.169.254), multicast, unspecified,
reserved, shared (100.64/10) and other non-global addresses are refused, IPv4 and IPv6,
including IPv4 addresses inside IPv6 (::ffff:a.b.c.d, 6to4). `--allowed_media_domains` narrows
the hosts; `--allow_private_media_urls` lifts the address rule.

The address check sits in the connection's resolver (`PolicyResolver`): the host is looked up
once, every address checked, and the connection goes to those addresses, never to the answer
of a second lookup (DNS rebinding). The Host header and TLS SNI keep the URL's host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not private, not global

# host, port, family → [(family, address)]
Lookup = Callable[[str, int, int], Awaitable[list[tuple[int, str]]]]


class MediaURLRefused(Exception):
    """A URL the policy refuses; the message names the rule (without the image index)."""


def special_kind(ip: IPAddress) -> str | None:
    """What makes `ip` unfit for fetching ("loopback", "private", …), or None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return special_kind(embedded)
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
              ("multicast", ip.is_multicast), ("reserved", ip.is_reserved), ("private", ip.is_private))
    for kind, hit in checks:
        if hit:
            return kind
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (100.64.0.0/10)"
    if not ip.is_global:
        return "non-global"
    return None


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str] | None = None  # lower-case host names; None: any host
    allow_private: bool = False
    classify: Callable[[IPAddress], str | None] = special_kind  # injectable for tests

    @classmethod
    def from_args(cls, allowed_domains: list[str] | None, allow_private: bool) -> "MediaPolicy":
        domains = None if allowed_domains is None else frozenset(_norm(d) for d in allowed_domains)
        return cls(domains, allow_private)

    def check_host(self, host: str) -> None:
        """The host-name rules, before any connection: the allow-list, and the address rule
        for an IP literal (the connector does not resolve those)."""
        if self.allowed_domains is not None and _norm(host) not in self.allowed_domains:
            raise MediaURLRefused(f"URL host {host} is not in --allowed_media_domains; refused")
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: checked address by address when it is resolved
        self.check_address(host, ip)

    def check_address(self, host: str, ip: IPAddress) -> None:
        if self.allow_private:
            return
        kind = self.classify(ip)
        if kind is not None:
            shown = "" if str(ip) == host else f" ({ip})"
            raise MediaURLRefused(f"URL host {host} resolves to a {kind} address{shown}; refused "
                                  f"(see --allow_private_media_urls)")


def _norm(host: str) -> str:
    return host.strip().lower().rstrip(".")


async def system_lookup(host: str, port: int, family: int) -> list[tuple[int, str]]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [(fam, sockaddr[0]) for fam, _, _, _, sockaddr in infos]


class PolicyResolver(AbstractResolver):
    """aiohttp resolver: one lookup, every address checked, the connection made to them."""

    def __init__(self, policy: MediaPolicy, lookup: Lookup = system_lookup):
        self.policy = policy
        self.lookup = lookup

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        found = await self.lookup(host, port, family)
        if not found:
            raise OSError(f"no address for {host}")
        out: list[ResolveResult] = []
        for fam, addr in dict.fromkeys(found):
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            self.policy.check_address(host, ip)  # any refused address refuses the host
            out.append(ResolveResult(hostname=host, host=addr, port=port, family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return out

    async def close(self) -> None:
        pass
