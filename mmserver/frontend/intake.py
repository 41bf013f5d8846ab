"""Request intake: images and videos → bytes, md5 and token counts (a video's from its header:
frame count and rate, no frame decoded here); prompt → token ids with the placeholders
expanded; then cache references and shared-memory image bytes. What an image
becomes, and how a prompt is expanded, is the model family's (`models/family.py`).

Precomputed embeddings (`{"type": "embeds"}`, see `embeds.py`) skip the cache and the ViT:
each goes into a fresh segment that this process owns and unlinks when the request ends."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import aiohttp
import torch

from ..embed_cache import shm
from ..embed_cache.service import CacheClient
from ..ipc import ImageRef
from ..models.errors import ImageError, MediaTooLarge, OptionError, PromptError
from ..models.family import ImagePlan, ModelFamily, Span, VideoLimits
from . import embeds as embeds_io
from . import images as image_io
from .coalesce import Coalescer
from .errors import BadParam, BadRequest, Overloaded, TooLarge


@dataclass
class IntakeLimits:
    max_image_bytes: int
    fetch_timeout: float
    allowed_local_dir: str | None
    max_req_len: int
    cache_wait_s: float
    video: VideoLimits = VideoLimits()
    max_video_bytes: int = 256 << 20


@dataclass
class PreparedImage:
    loaded: image_io.LoadedImage
    plan: ImagePlan
    options: str  # the family's option key
    label: str = ""  # "image 0", "video 1": how errors name it

    @property
    def n_tokens(self) -> int:
        return self.plan.n_tokens

    @property
    def cache_key(self) -> str:
        # Everything that changes the embedding: the bytes and the family's options.
        return f"{self.loaded.md5}:{self.options}"


@dataclass
class PreparedEmbeds:
    tensor: torch.Tensor  # [n_tokens, hidden], validated, in the model's dtype
    digest: str = ""  # sha256 of the tensor (embeds.digest)
    grid: tuple[int, ...] = ()  # the family's grid for the positions (Qwen2-VL: the given grid_thw)

    @property
    def n_tokens(self) -> int:
        return self.tensor.shape[0]

    @property
    def cache_key(self) -> str:
        # The KV prefix cache's key for these rows (they never enter the embedding cache);
        # a grid changes the positions, hence the KV.
        return f"embeds:{self.digest}" + (f":{list(self.grid)}" if self.grid else "")


Prepared = Union[PreparedImage, PreparedEmbeds]


@dataclass
class MediaLayout:
    """A prompt expanded with its images and videos."""

    ids: list[int]
    spans: list[Span]  # in prompt order
    media: list[Prepared]  # each input once, in the order of its first span (its rows' order)
    keys: list[str]  # per span: its input's identity for the KV prefix cache


@dataclass
class EmbedsInput:
    """What the HTTP process needs to accept precomputed embeddings."""

    shm_prefix: str  # the server's segment prefix, so a shutdown sweep also removes ours
    dtype: torch.dtype  # the model's dtype: the router reads the rows as they are


class Intake:
    def __init__(self, family: ModelFamily, limits: IntakeLimits, cache: CacheClient | None,
                 session: aiohttp.ClientSession, embeds: EmbedsInput | None = None):
        self.family = family
        self.limits = limits
        self.cache = cache
        self.session = session
        self.embeds = embeds
        self._embeds_ids = itertools.count(1)
        self._decode_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-decode")
        self._cache_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-client")
        # Concurrent requests' allocs (and releases) share one cache round trip.
        self._allocs: Coalescer[list, tuple | None] = Coalescer(self._cache_pool, self._alloc_many,
                                                                on_orphan=self._release_orphan)
        self._releases: Coalescer[list, None] = Coalescer(self._cache_pool, self._release_many)
        self._orphan_releases: set[asyncio.Future] = set()

    def image_options(self, specs: Sequence, request_options: Mapping[str, Any]) -> list[str]:
        """Each image's option key (the family validates; the request's options are checked
        even without images). Errors name the option as the client wrote it."""
        keys = []
        for spec in [None, *specs]:
            given = spec.options if spec is not None else {}
            try:
                keys.append(self.family.image_options(request_options, given))
            except OptionError as e:
                raise _bad_option(e, spec) from None
        return keys[1:]

    async def load_images(self, specs: Sequence, request_options: Mapping[str, Any]) -> list[Prepared]:
        """Each image's bytes and header, and what it becomes (`specs`: the HTTP layer's
        ImageSpecs; `request_options`: the request's image parameters, for the family)."""
        l = self.limits
        option_keys = self.image_options(specs, request_options)

        async def one(i: int, spec) -> Prepared:
            loop = asyncio.get_running_loop()
            if spec.type == "embeds":
                return await loop.run_in_executor(self._decode_pool, self._load_embeds, spec, i)
            if image_io.is_inline(spec.type, spec.data):
                loaded = await loop.run_in_executor(self._decode_pool, image_io.inspect_base64, spec.data, i,
                                                    l.max_image_bytes)
            else:
                raw = await image_io.load(spec.type, spec.data, i, session=self.session, timeout=l.fetch_timeout,
                                          max_bytes=l.max_image_bytes, allowed_dir=l.allowed_local_dir)
                loaded = await loop.run_in_executor(self._decode_pool, image_io.inspect, raw, i)
            options = option_keys[i]
            return PreparedImage(loaded, self.family.plan_image(loaded.width, loaded.height, options), options,
                                 f"image {i}")

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))

    def video_options(self, specs: Sequence, request_options: Mapping[str, Any]) -> list[str]:
        """Each video's option key (the family validates against the server's caps). Errors name
        the option as the client wrote it."""
        keys = []
        for spec in specs:
            try:
                keys.append(self.family.video_options(request_options, spec.options, self.limits.video))
            except OptionError as e:
                raise _bad_option(e, spec) from None
        return keys

    async def load_videos(self, specs: Sequence, request_options: Mapping[str, Any]) -> list[PreparedImage]:
        """Each video's bytes, header and what it becomes. Only the header is read here (in a
        thread); the visual worker decodes the sampled frames."""
        if specs and not self.family.supports_video:
            raise BadRequest(f"videos were sent but {self.family.name} models do not take videos")
        l = self.limits
        option_keys = self.video_options(specs, request_options)

        async def one(i: int, spec) -> PreparedImage:
            loop = asyncio.get_running_loop()
            if image_io.is_inline(spec.type, spec.data):
                loaded = await loop.run_in_executor(self._decode_pool, image_io.inspect_video_base64, spec.data, i,
                                                    l.max_video_bytes)
            else:
                raw = await image_io.load(spec.type, spec.data, i, session=self.session, timeout=l.fetch_timeout,
                                          max_bytes=l.max_video_bytes, allowed_dir=l.allowed_local_dir, kind="video")
                loaded = await loop.run_in_executor(self._decode_pool, image_io.inspect_video, raw, i)
            try:
                plan = self.family.plan_video(loaded.meta, option_keys[i], i)
            except MediaTooLarge as e:
                raise TooLarge(str(e)) from None
            except ImageError as e:
                raise BadRequest(str(e)) from None
            return PreparedImage(loaded, plan, option_keys[i], f"video {i}")

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))

    def _load_embeds(self, spec, index: int) -> PreparedEmbeds:
        """base64 → safetensors → one validated tensor, and the grid the family needs with it
        (`grid_thw` given with the image). Runs in a thread."""
        if self.embeds is None:
            raise BadRequest(f"image {index}: precomputed embeddings are not accepted by this server")
        try:
            raw = embeds_io.b64decode(spec.data, index)
            if len(raw) > self.limits.max_image_bytes:
                raise TooLarge(f"embeds {index}: {len(raw)} bytes exceeds the {self.limits.max_image_bytes}-byte limit")
            t = embeds_io.check(embeds_io.from_safetensors(raw, index), index, self.family.embeds_row_multiple,
                                self.family.config.llm.hidden_size, self.embeds.dtype)
        except embeds_io.EmbedsError as e:
            raise BadRequest(str(e)) from None
        try:
            grid = self.family.embeds_grid(t.shape[0], spec.options.get("grid_thw"))
        except OptionError as e:
            where = f"{spec.where}.{e.name}" if spec.where else f"image {index}: {e.name}"
            raise BadParam(f"{where} {e.detail}", where if spec.where else e.name) from None
        return PreparedEmbeds(t, embeds_io.digest(t), grid)

    def tokenize(self, prompt: str, images: list[Prepared], videos: Sequence[PreparedImage] = ()) -> MediaLayout:
        """The prompt's ids with each image's and video's positions, where their rows go, and
        the inputs in the order of their rows."""
        plans = [im.plan if isinstance(im, PreparedImage) else ImagePlan(im.n_tokens, im.grid) for im in images]
        try:
            exp = self.family.expand_media(prompt, plans, [v.plan for v in videos])
        except PromptError as e:
            raise BadRequest(str(e)) from None
        media, keys = exp.arrange(images, videos, lambda im: im.cache_key)
        return MediaLayout(exp.ids, exp.spans, media, keys)

    def check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        total = n_prompt + max_new_tokens
        if total > self.limits.max_req_len:
            raise BadRequest(f"prompt ({n_prompt} tokens, images included) + max_new_tokens ({max_new_tokens}) "
                             f"= {total} exceeds max_req_total_len {self.limits.max_req_len}")

    async def take_cache_refs(self, images: list[Prepared]) -> list[ImageRef]:
        """One ImageRef per image, in order: a cache record per image (see `_cache_refs`) and
        an owned segment per embeddings input. `release` gives all of them back."""
        cache_refs = await self._cache_refs([im for im in images if isinstance(im, PreparedImage)])
        try:
            # Synchronous on purpose: no await between creating the segments and returning
            # their refs, so a cancelled request cannot leave one behind.
            own_refs = self._write_embeds([im for im in images if isinstance(im, PreparedEmbeds)])
        except BaseException:
            await self.release(cache_refs)
            raise
        cached, own = iter(cache_refs), iter(own_refs)
        return [next(own) if isinstance(im, PreparedEmbeds) else next(cached) for im in images]

    async def _cache_refs(self, images: list[PreparedImage]) -> list[ImageRef]:
        """Reference a cache record per image (waiting a bounded time for room), and put the
        bytes of images the cache lacks into shared memory for the ViT."""
        if not images:
            return []
        loop = asyncio.get_running_loop()
        items = [(im.cache_key, im.n_tokens, len(im.loaded.data)) for im in images]
        deadline = loop.time() + self.limits.cache_wait_s
        while True:
            got = await self._alloc(items)
            if got is not None:
                break
            if loop.time() >= deadline:
                raise Overloaded(f"image-embedding cache is full of images in use; retried for "
                                 f"{self.limits.cache_wait_s:g}s")
            await asyncio.sleep(0.05)
        refs = [ImageRef(rid, emb, img, n_tok, len(im.loaded.data), not has_emb, im.options, im.plan.grid,
                         label=im.label)
                for (rid, emb, img, has_emb), im, (_, n_tok, _) in zip(got, images, items)]
        try:
            await loop.run_in_executor(self._decode_pool, _write_image_bytes, refs, images)
        except BaseException:
            await self.release(refs)
            raise
        return refs

    async def _alloc(self, items: list[tuple[str, int, int]]):
        """cache.alloc, merged with other requests' into one call. If the request is cancelled
        meanwhile, the references taken for it are given back when the call completes."""
        return await self._allocs(items)

    def _alloc_many(self, batches: list[list[tuple[str, int, int]]]) -> list:
        return self.cache.alloc_many(batches)

    def _release_many(self, batches: list[list[int]]) -> list[None]:
        self.cache.release([i for ids in batches for i in ids])
        return [None] * len(batches)

    def _release_orphan(self, got) -> None:
        """Runs in the event loop when a cancelled request's alloc completes."""
        if got:
            task = asyncio.ensure_future(self._releases([rec[0] for rec in got]))
            self._orphan_releases.add(task)  # a task nobody references may be collected mid-way
            task.add_done_callback(self._orphan_releases.discard)

    def _write_embeds(self, items: list[PreparedEmbeds]) -> list[ImageRef]:
        refs: list[ImageRef] = []
        try:
            for item in items:
                name = f"{self.embeds.shm_prefix}emb-in-{next(self._embeds_ids)}"
                t = item.tensor
                seg = shm.create(name, t.numel() * t.element_size())
                refs.append(ImageRef(record_id=0, emb_name=name, img_name="", n_tokens=t.shape[0], img_bytes=0,
                                     needs_vit=False, options="", grid=item.grid, precomputed=True))
                try:
                    shm.tensor_view(seg, tuple(t.shape), t.dtype).copy_(t)
                finally:
                    seg.close()
        except BaseException:
            _unlink_owned(refs)
            raise
        return refs

    async def release(self, refs: list[ImageRef]) -> None:
        _unlink_owned(refs)
        record_ids = [r.record_id for r in refs if not r.precomputed]
        if record_ids:
            await self._releases(record_ids)

    async def cache_call(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cache_pool, fn, *args)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._cache_pool.shutdown(wait=False, cancel_futures=True)


def _bad_option(e: OptionError, spec) -> BadParam:
    """The 400 for a bad image / video option, named as the client wrote it: the item's own key
    (`multimodal_params.images[1].max_pixels`) or the request's parameter."""
    if spec is not None and e.name in spec.options:
        where = f"{spec.where}.{e.name}"
        return BadParam(f"{where} {e.detail}", where)
    return BadParam(f"parameter '{e.name}' {e.detail}", e.name)


def _unlink_owned(refs: list[ImageRef]) -> None:
    for r in refs:
        if r.precomputed:
            shm.unlink(r.emb_name)


def _write_image_bytes(refs: list[ImageRef], images: list[PreparedImage]) -> None:
    """Fill the image-bytes segment of every record that has no embedding yet.

    Several requests for one new image each write its (identical) bytes. The cache unlinks a
    record's image segment only once the embedding is written (or when the record is dropped,
    which our reference prevents), so a segment that vanished since `alloc` means another
    request's image was just encoded: this request needs no ViT for it."""
    for ref, im in zip(refs, images):
        if not ref.needs_vit:
            continue
        try:
            seg = shm.attach(ref.img_name)
        except FileNotFoundError:
            ref.needs_vit = False
            continue
        try:
            seg.buf[:ref.img_bytes] = im.loaded.data
        finally:
            seg.close()
