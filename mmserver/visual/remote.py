"""Vision encoders on other hosts (`--visual_remote H1:P1,H2:P2`).

`RemoteEncoders` is a worker group as the visual server sees it (beside LocalWorker and
RemoteWorker in workers.py): each batch of image records goes, as the images' file bytes and
the family's option strings, to one encoder-only server (`--run_mode visual_only`, served by
`http/encoder_api.py`): the one with the least outstanding images among those up. The
returned embeddings are checked (rows = the tokens the prompt reserved, the model's hidden
size and dtype) and written into this server's own cache segments, so cache hits, refcounts
and LRU work as with local workers.

An encoder that fails a call (connection refused or reset, no answer within
`--visual_remote_timeout`, a 5xx) fails only the images of that call, as "unavailable" (503),
and is taken out of rotation; a background probe of every encoder's /health puts it back.
With no encoder up, batches fail at once with 503: text-only requests never come here.

Wire format of POST /encode, both ways: a 4-byte big-endian length, that many bytes of JSON
metadata, then the payloads one after the other (their sizes are in the metadata).
  request:  {"images": [{"options": str, "bytes": int}, ...]} + image file bytes
  response: {"dtype": "float32", "hidden": H, "images": [{"status": "ok", "n_tokens": N} |
             {"status": "invalid" | "error" | "unavailable", "message": str}, ...]}
            + the ok images' [N, H] embeddings, row-major in dtype
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing import Pipe

import torch

from ..embed_cache import shm
from ..ipc import ImageRef
from .workers import BatchResult

log = logging.getLogger("mmserver.visual.remote")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------------
# Wire format


def pack(meta: dict, payloads: list[bytes]) -> bytes:
    head = json.dumps(meta).encode()
    return b"".join([struct.pack(">I", len(head)), head, *payloads])


def unpack(body: bytes) -> tuple[dict, memoryview]:
    """(metadata, the payloads' bytes); raises ValueError on a malformed body."""
    if len(body) < 4:
        raise ValueError("body too short")
    (n,) = struct.unpack(">I", body[:4])
    if 4 + n > len(body):
        raise ValueError("metadata length exceeds the body")
    meta = json.loads(body[4:4 + n])
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta, memoryview(body)[4 + n:]


def parse_addresses(raw: str) -> list[str]:
    """'h1:p1,h2:p2' → ['h1:p1', 'h2:p2']; raises ValueError naming a bad entry."""
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not HOST:PORT")
        out.append(part)
    if not out:
        raise ValueError("no address given")
    if len(set(out)) != len(out):
        raise ValueError("an address is listed twice")
    return out


# ---------------------------------------------------------------------------------------
# The LLM server's side


@dataclass
class Encoder:
    address: str
    up: bool = True
    outstanding: int = 0  # images sent and not answered (changed on the visual server's thread only)
    batches: int = 0
    last_error: str = ""


class EncoderCallError(Exception):
    """The call failed because of the encoder (unreachable, too slow, 5xx): it leaves the rotation."""


class RemoteEncoders:
    """All remote encoders as one worker group; up to `depth` batches in flight per encoder (each
    encoder server batches across calls itself)."""

    def __init__(self, addresses: list[str], hidden: int, dtype: torch.dtype, api_key: str | None = None,
                 timeout_s: float = 30.0, depth: int = 4, probe_interval_s: float = PROBE_INTERVAL_S):
        self.encoders = [Encoder(a) for a in addresses]
        self.hidden = hidden
        self.dtype = dtype
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.depth = depth
        self.probe_interval_s = probe_interval_s
        self.conn, self._wake = Pipe(duplex=False)
        self._results: queue.SimpleQueue[tuple[Encoder | None, int, BatchResult]] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._session = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(started,), name="remote-encoders", daemon=True)
        self._thread.start()
        started.wait()
        asyncio.run_coroutine_threadsafe(self._probe_all(), self._loop).result(PROBE_TIMEOUT_S + 5)

    # -- the Worker protocol (visual server's thread) --------------------------------------

    @property
    def busy(self) -> bool:
        up = [e for e in self.encoders if e.up]
        return bool(up) and all(e.batches >= self.depth for e in up)

    def prefetch(self, ref: ImageRef) -> None:
        """Nothing to prepare here: the encoder decodes and tiles."""

    def forget(self, record_id: int) -> None:
        """Nothing was prepared (see prefetch)."""

    def dispatch(self, refs: list[ImageRef]) -> None:
        up = [e for e in self.encoders if e.up and e.batches < self.depth]
        if not up:
            down = ", ".join(f"{e.address} ({e.last_error or 'down'})" for e in self.encoders)
            self._put(None, 0, BatchResult(failed=[(r.record_id, "unavailable",
                                                    f"no remote vision encoder is reachable: {down}")
                                                   for r in refs]))
            return
        enc = min(up, key=lambda e: (e.outstanding, e.batches))
        enc.outstanding += len(refs)
        enc.batches += 1
        asyncio.run_coroutine_threadsafe(self._encode(enc, refs), self._loop)

    def poll(self) -> BatchResult | None:
        if not self.conn.poll():
            return None
        self.conn.recv_bytes()
        enc, n, result = self._results.get()
        if enc is not None:
            enc.outstanding -= n
            enc.batches -= 1
        return result

    def states(self) -> dict[str, int]:
        """address → 1 (in rotation) or 0 (out, being retried), for /health and /metrics."""
        return {e.address: int(e.up) for e in self.encoders}

    def close(self) -> None:
        """Stop the probe and any call in flight, close the HTTP session, end the I/O thread."""
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(PROBE_TIMEOUT_S + 5)
        except Exception:  # noqa: BLE001 — closing must not raise; the loop stops below regardless
            log.exception("closing the remote encoders' session")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    # -- the I/O thread ------------------------------------------------------------------

    def _put(self, enc: Encoder | None, n: int, result: BatchResult) -> None:
        self._results.put((enc, n, result))
        self._wake.send_bytes(b"1")

    def _run_loop(self, started: threading.Event) -> None:
        import aiohttp

        asyncio.set_event_loop(self._loop)

        async def setup():
            self._session = aiohttp.ClientSession()
            self._loop.create_task(self._probe_forever())

        self._loop.run_until_complete(setup())
        started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self._probe_all()

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in self.encoders))

    async def _probe(self, enc: Encoder) -> None:
        import aiohttp

        try:
            async with self._session.get(f"http://{enc.address}/health",
                                         timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
                ok = resp.status == 200
                reason = "" if ok else f"/health answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, reason = False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if ok and not enc.up:
            log.warning("remote vision encoder %s is back", enc.address)
        elif not ok and enc.up:
            log.warning("remote vision encoder %s is down: %s", enc.address, reason)
        enc.up = ok
        if not ok:
            enc.last_error = reason

    async def _encode(self, enc: Encoder, refs: list[ImageRef]) -> None:
        try:
            result = await self._call(enc, refs)
        except EncoderCallError as e:
            if enc.up:
                log.warning("remote vision encoder %s taken out of rotation: %s", enc.address, e)
            enc.up, enc.last_error = False, str(e)
            result = BatchResult(failed=[(r.record_id, "unavailable", f"remote vision encoder {enc.address}: {e}")
                                         for r in refs])
        except Exception as e:  # a bug here must not lose the batch
            log.exception("remote encode")
            result = BatchResult(failed=[(r.record_id, "error", f"remote encode failed: {type(e).__name__}: {e}")
                                         for r in refs])
        self._put(enc, len(refs), result)

    async def _call(self, enc: Encoder, refs: list[ImageRef]) -> BatchResult:
        import aiohttp

        res = BatchResult()
        sent, payloads = [], []
        for ref in refs:
            try:
                payloads.append(_read_image(ref))
                sent.append(ref)
            except FileNotFoundError:
                res.failed.append((ref.record_id, "error", "its image bytes are gone"))
        if not sent:
            return res
        body = pack({"images": [{"options": r.options, "bytes": len(p)} for r, p in zip(sent, payloads)]}, payloads)
        t0 = time.perf_counter()
        try:
            async with self._session.post(f"http://{enc.address}/encode", data=body, headers=self.headers,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                data = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise EncoderCallError(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise EncoderCallError(f"{type(e).__name__}: {e}") from None
        res.encode_s = time.perf_counter() - t0
        if status != 200:
            message = _error_message(data, status)
            if status >= 500:
                raise EncoderCallError(message)
            res.failed += [(r.record_id, "error", f"remote vision encoder {enc.address}: {message}") for r in sent]
            return res
        try:
            meta, blob = unpack(data)
            self._write_all(meta, blob, sent, res)
        except (ValueError, KeyError, TypeError) as e:
            done = set(res.done)
            res.failed += [(r.record_id, "error", f"remote vision encoder {enc.address}: bad answer: {e}")
                           for r in sent if r.record_id not in done]
        return res

    def _write_all(self, meta: dict, blob: memoryview, sent: list[ImageRef], res: BatchResult) -> None:
        dtype = DTYPES.get(meta["dtype"])
        if dtype != self.dtype or meta["hidden"] != self.hidden:
            raise ValueError(f"embeddings of dtype {meta['dtype']} and hidden size {meta['hidden']}, this "
                             f"server's model needs {DTYPE_NAMES.get(self.dtype)} and {self.hidden}")
        items = meta["images"]
        if len(items) != len(sent):
            raise ValueError(f"{len(items)} results for {len(sent)} images")
        row_bytes = self.hidden * dtype.itemsize
        offset = 0
        for ref, item in zip(sent, items):
            if item["status"] != "ok":
                kind = item["status"] if item["status"] in ("invalid", "unavailable") else "error"
                res.failed.append((ref.record_id, kind, str(item.get("message", ""))))
                continue
            n = int(item["n_tokens"])
            size = n * row_bytes
            if offset + size > len(blob):
                raise ValueError("embeddings shorter than announced")
            chunk, offset = blob[offset:offset + size], offset + size
            if n != ref.n_tokens:
                res.failed.append((ref.record_id, "error", f"the remote encoder gave {n} embedding rows, the prompt "
                                                           f"reserved {ref.n_tokens}"))
                continue
            if _write_embedding(ref, chunk):
                res.done.append(ref.record_id)
            else:
                res.failed.append((ref.record_id, "error", "its cache record was evicted before the embedding "
                                                           "was written"))
        if offset != len(blob):
            raise ValueError("embeddings longer than announced")


def _error_message(data: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(data)['message']}"
    except Exception:
        return f"HTTP {status}"


def _read_image(ref: ImageRef) -> bytes:
    seg = shm.attach(ref.img_name)
    try:
        return bytes(seg.buf[:ref.img_bytes])
    finally:
        seg.close()


def _write_embedding(ref: ImageRef, chunk: memoryview) -> bool:
    try:
        seg = shm.attach(ref.emb_name)
    except FileNotFoundError:
        return False
    try:
        seg.buf[:len(chunk)] = chunk
    finally:
        seg.close()
    return True
