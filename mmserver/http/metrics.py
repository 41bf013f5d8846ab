"""/metrics through prometheus_client, in a registry of this server's own (not the global one).

Two kinds of series:
- snapshots of state kept elsewhere (the HTTP counters, the router's and the visual
  server's stats, the cache's), turned into counter and gauge families at scrape time by
  `_SnapshotCollector`: names and labels are the ones /metrics has always had;
- per-request histograms observed here as requests run (`RequestTimer`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..frontend.streams import Counters, TokenEvent

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Buckets (vLLM's where it has them, so dashboards carry over).
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
         40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
         1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LATENCY = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKENS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))  # 1 … 500000


@dataclass
class Snapshot:
    """State gathered by the /metrics handler just before rendering."""

    counters: Counters
    router: dict = field(default_factory=dict)
    visual: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    in_flight: int = 0


class ServerMetrics:
    """The registry of one server: request histograms plus the snapshot families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram("mmserver_time_to_first_token_seconds",
                              "Seconds from the HTTP handler's start to the first generated token", buckets=_TTFT,
                              registry=r)
        self.tpot = Histogram("mmserver_time_per_output_token_seconds",
                              "Mean seconds between output tokens after the first, per request (2+ tokens)",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("mmserver_e2e_request_latency_seconds",
                             "Seconds from the HTTP handler's start to the last token, per finished request",
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("mmserver_request_queue_time_seconds",
                               "Seconds from the hand-off to the engine processes to the first token: waiting for "
                               "the ViT and for admission, plus the prefill", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Histogram("mmserver_request_prompt_tokens",
                                       "Prompt tokens (images included) per finished request", buckets=_TOKENS,
                                       registry=r)
        self.generation_tokens = Histogram("mmserver_request_generation_tokens",
                                           "Generated tokens per finished request", buckets=_TOKENS, registry=r)
        self._snapshot = Snapshot(Counters())
        r.register(_SnapshotCollector(self))

    def render(self, snapshot: Snapshot) -> bytes:
        self._snapshot = snapshot  # read by _SnapshotCollector.collect during generate_latest
        return generate_latest(self.registry)

    def timer(self, t_arrival: float, n_prompt: int) -> "RequestTimer":
        return RequestTimer(self, t_arrival, n_prompt)


class RequestTimer:
    """Observes one generation (one engine request) as its token events go by."""

    def __init__(self, metrics: ServerMetrics, t_arrival: float, n_prompt: int):
        self.m = metrics
        self.t_arrival = t_arrival
        self.n_prompt = n_prompt
        self.t_first: float | None = None

    def token(self, ev: TokenEvent, t_sent: float) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
            self.m.ttft.observe(now - self.t_arrival)
            self.m.queue.observe(max(0.0, now - t_sent))
        if ev.finished:
            self.m.e2e.observe(now - self.t_arrival)
            self.m.prompt_tokens.observe(self.n_prompt)
            self.m.generation_tokens.observe(ev.count)
            if ev.count > 1:
                self.m.tpot.observe((now - self.t_first) / (ev.count - 1))


class _SnapshotCollector:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics._snapshot
        c, router, visual, cache = s.counters, s.router, s.visual, s.cache
        requests = CounterMetricFamily("mmserver_requests_total", "Finished HTTP generation requests by outcome",
                                       labels=["outcome"])
        for outcome in ("ok", "rejected", "overloaded", "failed"):
            requests.add_metric([outcome], c.requests.get(outcome, 0))
        yield requests
        yield _counter("mmserver_prompt_tokens_total", "Prompt tokens submitted", c.prompt_tokens)
        yield _counter("mmserver_generated_tokens_total", "Tokens generated", c.generated_tokens)
        yield _gauge("mmserver_requests_in_flight", "Requests submitted and not finished", s.in_flight)
        yield _gauge("mmserver_queue_length", "Requests waiting for admission", router.get("waiting", 0))
        yield _gauge("mmserver_running_requests", "Requests in the running batch", router.get("running", 0))
        yield _gauge("mmserver_kv_slots_used", "KV cache slots (tokens) in use", router.get("kv_used", 0))
        yield _gauge("mmserver_kv_slots_total", "KV cache slots (tokens) in the pool", router.get("kv_total", 0))
        yield _counter("mmserver_prompt_cache_hit_tokens_total", "Prompt tokens served from the KV prefix cache",
                       router.get("prompt_cache_hit_tokens", 0))
        yield _gauge("mmserver_prompt_cache_tokens", "KV slots (tokens) the prefix cache holds",
                     router.get("prompt_cache_tokens", 0))
        yield _counter("mmserver_prompt_cache_evicted_tokens_total", "Tokens evicted from the KV prefix cache",
                       router.get("prompt_cache_evicted_tokens", 0))
        yield _counter("mmserver_embed_cache_hits_total", "Image embedding cache hits", cache.get("hits", 0))
        yield _counter("mmserver_embed_cache_misses_total", "Image embedding cache misses", cache.get("misses", 0))
        yield _counter("mmserver_embed_cache_evictions_total", "Cache evictions", cache.get("evictions", 0))
        yield _gauge("mmserver_embed_cache_bytes", "Bytes held by the embedding cache", cache.get("bytes", 0))
        yield _gauge("mmserver_embed_cache_records", "Images in the embedding cache", cache.get("records", 0))
        yield _gauge("mmserver_embed_cache_in_use", "Cached images referenced by requests", cache.get("in_use", 0))
        yield _counter("mmserver_vit_images_total", "Images encoded by the ViT", visual.get("vit_images", 0))
        yield _counter("mmserver_vit_tiles_total", "Tiles encoded by the ViT", visual.get("vit_tiles", 0))
        yield _counter("mmserver_vit_seconds_total", "Seconds spent in ViT batches", visual.get("vit_seconds", 0.0))
        yield _counter("mmserver_vit_preprocess_seconds_total", "Seconds spent decoding and preparing images and videos",
                       visual.get("vit_preprocess_seconds", 0.0))
        yield _counter("mmserver_vit_encode_seconds_total", "Seconds spent in the ViT forward (device time included)",
                       visual.get("vit_encode_seconds", 0.0))
        yield from _ttft_stages(c, router, visual)
        if remote := visual.get("remote_encoders"):
            up = GaugeMetricFamily("mmserver_remote_encoder_up",
                                   "1 when a --visual_remote encoder is in rotation, 0 while it is out (retried)",
                                   labels=["address"])
            for address, state in sorted(remote.items()):
                up.add_metric([address], state)
            yield up
        batches = CounterMetricFamily("mmserver_vit_batches_total", "ViT batches by size (images)", labels=["size"])
        for size, n in sorted(visual.get("vit_batch_sizes", {}).items()):
            batches.add_metric([str(size)], n)
        yield batches


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _ttft_stages(counters: Counters, router: dict, visual: dict):
    """Where time to first token goes, as sums and counts per stage (mean = seconds / requests):
    http_intake (body upload and parse, image intake, tokenization, cache references), visual
    (waiting for and running the ViT), router (admission, prefill, first sampled token), total
    (handler start to the first token in the HTTP process: the rest is delivery between them)."""
    stages = {name: tuple(v) for name, v in counters.stages.items()}
    stages["visual"] = (visual.get("ttft_visual_s", 0.0), visual.get("ttft_visual_n", 0))
    stages["router"] = (router.get("ttft_router_s", 0.0), router.get("ttft_router_n", 0))
    seconds = CounterMetricFamily("mmserver_ttft_stage_seconds_total",
                                  "Seconds requests spent in each stage before their first token", labels=["stage"])
    requests = CounterMetricFamily("mmserver_ttft_stage_requests_total", "Requests counted in each stage's seconds",
                                   labels=["stage"])
    for name in ("http_intake", "visual", "router", "total"):
        total, n = stages.get(name, (0.0, 0))
        seconds.add_metric([name], total)
        requests.add_metric([name], n)
    yield seconds
    yield requests
