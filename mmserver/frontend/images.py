"""Image intake for the HTTP server: bytes from base64, http(s) URLs (under the server's
`MediaPolicy`) or allowed local files, checked, hashed and measured without blocking the
event loop.

Only the header is read here (size, format): the pixels are decoded once, by the ViT worker,
which reports a corrupt or truncated body as a 400 for the request too (see visual/server.py)."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import aiohttp
import yarl
from PIL import Image

from .b64 import b64decode_strict
from .errors import BadRequest, TooLarge
from .media_policy import Lookup, MediaPolicy, MediaURLRefused, PolicyResolver, system_lookup


@dataclass
class LoadedImage:
    data: bytes  # the file bytes, as sent
    md5: str
    width: int
    height: int
    meta: Any = None  # a video's header (video_io.VideoMeta)


def _decode_base64(data: str, index: int, kind: str = "image") -> bytes:
    if data.startswith("data:"):  # tolerate data URLs in the base64 field
        _, _, data = data.partition(",")
    try:
        return b64decode_strict(data)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{kind} {index}: invalid base64 data ({e})") from None


_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3


class MediaFetcher:
    """Fetches image URLs under a `MediaPolicy`: the host rules before each request, the
    address rule in the connection's resolver, and redirects followed by hand (at most
    `MAX_REDIRECTS`) so every hop passes both."""

    def __init__(self, policy: MediaPolicy, lookup: Lookup = system_lookup):
        self.policy = policy
        # trust_env=False (the default): no proxy from the environment, whose address the policy would not see
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=PolicyResolver(policy, lookup)))

    async def fetch(self, url: str, index: int, timeout: float, max_bytes: int, kind: str = "image") -> bytes:
        try:  # one deadline for every hop
            return await asyncio.wait_for(self._fetch(url, index, max_bytes, kind), timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"{kind} {index}: fetching {url[:200]} timed out after {timeout:g}s") from None
        except aiohttp.ClientError as e:
            refused = _refusal(e)
            if refused is not None:
                raise BadRequest(f"{kind} {index}: {refused}") from None
            raise BadRequest(f"{kind} {index}: cannot fetch {url[:200]} ({type(e).__name__}: {e})") from None

    async def _fetch(self, url: str, index: int, max_bytes: int, kind: str) -> bytes:
        where = ""  # names the hop in errors after a redirect
        for hop in range(MAX_REDIRECTS + 1):
            try:
                target = yarl.URL(url)
            except ValueError as e:
                raise BadRequest(f"{kind} {index}: {where}invalid URL {url[:64]!r} ({e})") from None
            if target.scheme not in ("http", "https") or not target.raw_host:
                raise BadRequest(f"{kind} {index}: {where}URL must be http(s), got {url[:64]!r}")
            try:
                self.policy.check_host(target.raw_host)
                async with self.session.get(target, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and hop < MAX_REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise BadRequest(f"{kind} {index}: {where}HTTP {resp.status} without a Location header")
                        url = _join(target, location)
                        where = f"redirect {hop + 1} to {url[:200]}: "
                        continue
                    if resp.status in _REDIRECTS:
                        raise BadRequest(f"{kind} {index}: more than {MAX_REDIRECTS} redirects")
                    if resp.status != 200:
                        raise BadRequest(f"{kind} {index}: {where}fetching {url[:200]} returned HTTP {resp.status}")
                    return await _read_body(resp, index, max_bytes, kind)
            except MediaURLRefused as e:
                raise BadRequest(f"{kind} {index}: {where}{e}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.session.close()


def _join(base: yarl.URL, location: str) -> str:
    try:
        return str(base.join(yarl.URL(location)))
    except ValueError:
        return location  # refused as an invalid URL by the next hop


def _refusal(e: BaseException) -> str | None:
    """The policy's message, if the resolver refused the host inside aiohttp's connector."""
    while e is not None:
        if isinstance(e, MediaURLRefused):
            return str(e)
        e = e.__cause__ or e.__context__
    return None


async def _read_body(resp: aiohttp.ClientResponse, index: int, max_bytes: int, kind: str) -> bytes:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise TooLarge(f"{kind} {index}: {resp.content_length} bytes exceeds the {max_bytes}-byte limit")
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"{kind} {index}: more than the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def read_local(path: str, index: int, allowed_dir: str | None, max_bytes: int, kind: str = "image") -> bytes:
    if allowed_dir is None:
        raise BadRequest(f"{kind} {index}: local files are disabled (start with --allowed_local_media_path)")
    root = Path(allowed_dir).resolve()
    p = Path(path).resolve()
    if root != p and root not in p.parents:
        raise BadRequest(f"{kind} {index}: {path!r} is outside the allowed directory")
    if not p.is_file():
        raise BadRequest(f"{kind} {index}: no such file {path!r}")
    if p.stat().st_size > max_bytes:
        raise TooLarge(f"{kind} {index}: {p.stat().st_size} bytes exceeds the {max_bytes}-byte limit")
    return p.read_bytes()


def inspect(data: bytes, index: int) -> LoadedImage:
    """Read the header (format and size, which fix what the image becomes) and hash. Runs in a thread."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise TooLarge(f"image {index}: too many pixels ({e})") from None
    except Exception as e:
        raise BadRequest(f"image {index}: cannot decode as an image ({type(e).__name__}: {e})") from None
    if width < 1 or height < 1:
        raise BadRequest(f"image {index}: empty image")
    limit = Image.MAX_IMAGE_PIXELS  # PIL only warns between 1x and 2x this: refuse the whole band
    if limit and width * height > limit:
        raise TooLarge(f"image {index}: too many pixels ({width}x{height} = {width * height}, limit {limit})")
    return LoadedImage(data, hashlib.md5(data).hexdigest(), width, height)


def inspect_base64(data: str, index: int, max_bytes: int) -> LoadedImage:
    """base64 → bytes → `inspect`, all in the calling thread (decoding a large body is not free)."""
    return inspect(check_size(_decode_base64(data, index), index, max_bytes), index)


def inspect_video(data: bytes, index: int) -> LoadedImage:
    """A video's header (frame count, rate, size: `probe`, no frame decoded) and hash, as
    `inspect` for images, plus its meta. Runs in a thread."""
    from ..models import video_frames
    from ..models.errors import ImageError, MediaTooLarge

    try:
        meta = video_frames.probe(data, index)
    except MediaTooLarge as e:  # frames over PIL's decompression-bomb limit
        raise TooLarge(str(e)) from None
    except ImageError as e:
        raise BadRequest(str(e)) from None
    return LoadedImage(data, hashlib.md5(data).hexdigest(), meta.width, meta.height, meta)


def inspect_video_base64(data: str, index: int, max_bytes: int) -> LoadedImage:
    return inspect_video(check_size(_decode_base64(data, index, "video"), index, max_bytes, "video"), index)


def check_size(raw: bytes, index: int, max_bytes: int, kind: str = "image") -> bytes:
    if len(raw) > max_bytes:
        raise TooLarge(f"{kind} {index}: {len(raw)} bytes exceeds the {max_bytes}-byte limit")
    if not raw:
        raise BadRequest(f"{kind} {index}: empty data")
    return raw


def is_inline(spec_type: str, data: str) -> bool:
    """The bytes are in the request (base64, or a data: URL): `inspect_base64` takes them;
    anything else is fetched first with `load`."""
    return spec_type == "base64" or (spec_type == "url" and data.startswith("data:"))


async def load(spec_type: str, data: str, index: int, *, session: MediaFetcher, timeout: float,
               max_bytes: int, allowed_dir: str | None, kind: str = "image") -> bytes:
    """The bytes of an image that is not inline: an http(s) URL (fetched by `session`, the
    server's MediaFetcher) or an allowed local file."""
    if spec_type == "url":
        raw = await session.fetch(data, index, timeout, max_bytes, kind)
    elif spec_type == "file":
        raw = await asyncio.to_thread(read_local, data, index, allowed_dir, max_bytes, kind)
    else:
        raise BadRequest(f"{kind} {index}: type {spec_type!r} is not supported here")
    return check_size(raw, index, max_bytes, kind)
