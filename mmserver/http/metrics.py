"""/metrics in Prometheus text format."""

from __future__ import annotations

from ..frontend.streams import Counters


def _line(name: str, value: float, help_text: str, kind: str = "gauge", labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]


def _ttft_stages(counters: Counters, router: dict, visual: dict) -> list[str]:
    """Where time to first token goes, as sums and counts per stage (mean = seconds / requests):
    http_intake (body upload and parse, image intake, tokenization, cache references), visual
    (waiting for and running the ViT), router (admission, prefill, first sampled token), total
    (handler start to the first token in the HTTP process: the rest is delivery between them)."""
    stages = {name: tuple(v) for name, v in counters.stages.items()}
    stages["visual"] = (visual.get("ttft_visual_s", 0.0), visual.get("ttft_visual_n", 0))
    stages["router"] = (router.get("ttft_router_s", 0.0), router.get("ttft_router_n", 0))
    lines = ["# HELP mmserver_ttft_stage_seconds_total Seconds requests spent in each stage before their first token",
             "# TYPE mmserver_ttft_stage_seconds_total counter"]
    order = ("http_intake", "visual", "router", "total")
    lines += [f'mmserver_ttft_stage_seconds_total{{stage="{n}"}} {round(stages.get(n, (0.0, 0))[0], 6)}' for n in order]
    lines += ["# HELP mmserver_ttft_stage_requests_total Requests counted in each stage's seconds",
              "# TYPE mmserver_ttft_stage_requests_total counter"]
    lines += [f'mmserver_ttft_stage_requests_total{{stage="{n}"}} {stages.get(n, (0.0, 0))[1]}' for n in order]
    return lines


def render_metrics(counters: Counters, router: dict, visual: dict, cache: dict, in_flight: int) -> str:
    lines = ["# HELP mmserver_requests_total Finished HTTP generation requests by outcome",
             "# TYPE mmserver_requests_total counter"]
    for outcome in ("ok", "rejected", "overloaded", "failed"):
        lines.append(f'mmserver_requests_total{{outcome="{outcome}"}} {counters.requests.get(outcome, 0)}')
    lines += _line("mmserver_prompt_tokens_total", counters.prompt_tokens, "Prompt tokens submitted", "counter")
    lines += _line("mmserver_generated_tokens_total", counters.generated_tokens, "Tokens generated", "counter")
    lines += _line("mmserver_requests_in_flight", in_flight, "Requests submitted and not finished")
    lines += _line("mmserver_queue_length", router.get("waiting", 0), "Requests waiting for admission")
    lines += _line("mmserver_running_requests", router.get("running", 0), "Requests in the running batch")
    lines += _line("mmserver_kv_slots_used", router.get("kv_used", 0), "KV cache slots (tokens) in use")
    lines += _line("mmserver_kv_slots_total", router.get("kv_total", 0), "KV cache slots (tokens) in the pool")
    lines += _line("mmserver_embed_cache_hits_total", cache.get("hits", 0), "Image embedding cache hits", "counter")
    lines += _line("mmserver_embed_cache_misses_total", cache.get("misses", 0), "Image embedding cache misses",
                   "counter")
    lines += _line("mmserver_embed_cache_evictions_total", cache.get("evictions", 0), "Cache evictions", "counter")
    lines += _line("mmserver_embed_cache_bytes", cache.get("bytes", 0), "Bytes held by the embedding cache")
    lines += _line("mmserver_embed_cache_records", cache.get("records", 0), "Images in the embedding cache")
    lines += _line("mmserver_embed_cache_in_use", cache.get("in_use", 0), "Cached images referenced by requests")
    lines += _line("mmserver_vit_images_total", visual.get("vit_images", 0), "Images encoded by the ViT", "counter")
    lines += _line("mmserver_vit_tiles_total", visual.get("vit_tiles", 0), "Tiles encoded by the ViT", "counter")
    lines += _line("mmserver_vit_seconds_total", round(visual.get("vit_seconds", 0.0), 6),
                   "Seconds spent in ViT batches", "counter")
    lines += _line("mmserver_vit_preprocess_seconds_total", round(visual.get("vit_preprocess_seconds", 0.0), 6),
                   "Seconds spent decoding and tiling images", "counter")
    lines += _line("mmserver_vit_encode_seconds_total", round(visual.get("vit_encode_seconds", 0.0), 6),
                   "Seconds spent in the ViT forward (device time included)", "counter")
    lines += _ttft_stages(counters, router, visual)
    lines += ["# HELP mmserver_vit_batches_total ViT batches by size (images)", "# TYPE mmserver_vit_batches_total counter"]
    for size, n in sorted(visual.get("vit_batch_sizes", {}).items()):
        lines.append(f'mmserver_vit_batches_total{{size="{size}"}} {n}')
    return "\n".join(lines) + "\n"
