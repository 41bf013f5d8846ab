"""Every server flag and environment variable, with defaults and checks, in one place.

Flag names follow LightLLM so its users can switch without relearning.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerArgs:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    mem_fraction: float = 0.9
    max_total_token_num: int | None = None
    max_req_total_len: int | None = None
    batch_max_tokens: int | None = None
    running_max_req_size: int = 256
    trust_remote_code: bool = False
    enable_multimodal: bool = False
    visual_infer_batch_size: int = 8
    cache_capacity: int = 200
    cache_max_bytes: int = 4 << 30
    cache_wait_s: float = 10.0
    visual_dp: int = 1
    visual_tp: int = 1
    data_type: str | None = None
    device: str = "auto"
    max_images_per_request: int = 16
    max_image_bytes: int = 32 << 20
    max_videos_per_request: int = 4
    max_video_bytes: int = 256 << 20
    max_video_frames: int = 768  # qwen-vl-utils' FPS_MAX_FRAMES
    max_video_pixels: int = 90_316_800  # qwen-vl-utils' VIDEO_TOTAL_PIXELS (see VideoLimits)
    max_request_bytes: int = 256 << 20
    image_fetch_timeout: float = 10.0
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None  # None: any host (the address rule still applies)
    allow_private_media_urls: bool = False
    max_waiting_requests: int = 4096
    max_n: int = 8
    api_key: str | None = None  # --api_key, else MMSERVER_API_KEY
    overlap_schedule: str = "auto"
    disable_dynamic_prompt_cache: bool = False
    log_level: str = "info"
    run_mode: str = "normal"  # "visual_only": an encoder-only server (the vision side, serving POST /encode)
    visual_remote: list[str] | None = None  # encoder-only servers (HOST:PORT) that encode this server's images
    visual_remote_timeout: float = 30.0
    nnodes: int = 1  # tensor parallelism across nodes: --tp ranks spread over --nnodes machines
    node_rank: int = 0
    nccl_host: str = "127.0.0.1"  # node 0's address: the ranks' rendezvous (and the node watchdog on nccl_port + 1)
    nccl_port: int = 28765
    min_pixels: int | None = None  # Qwen2-VL's image pixel range (MIN_PIXELS / MAX_PIXELS for the family)
    max_pixels: int | None = None
    chat_template: str | None = None  # a template name or jinja file over the model's own (every process)
    # From the environment (LightLLM's name), checked here so a bad value stops the start with
    # its name; the loaders pass it to the weight reader. A model family reads its own
    # variables when it is built (models/<family>/family.py).
    load_workers: int = 1  # LOADWORKER

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def limit_cpu_threads(self) -> None:
        """With the model on a GPU, torch's CPU ops here are small copies: one thread each.

        Otherwise every process brings an OpenMP team as wide as the machine, and their
        spinning threads take the cores the image decoding threads need (vLLM does the same).
        OMP_NUM_THREADS, when set, is respected."""
        if self.resolved_device == "cuda" and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(1)

    def compute_dtype(self, checkpoint_dtype: str):
        """The dtype every process runs the model in: --data_type, else the checkpoint's on
        GPU and float32 on CPU. One definition, so the router, the ViT workers, the cache and
        the HTTP process agree on the bytes of an embedding."""
        from .pipeline import resolve_dtype

        return resolve_dtype(self.data_type or "auto", self.resolved_device, checkpoint_dtype)


class ArgError(ValueError):
    """A bad flag or environment value; the message names it."""


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import env_help, supported

    p = argparse.ArgumentParser(
        prog="python -m mmserver.api_server",
        description="Serve a vision-language checkpoint over HTTP (LightLLM-compatible /generate, "
                    f"OpenAI-compatible /v1). Supported: {supported()}.",
        epilog="Environment: MMSERVER_API_KEY (the API key when --api_key is not given), LOADWORKER (threads "
               f"reading weight shards); {env_help()}.")
    a = p.add_argument
    a("--model_dir", required=True,
      help="checkpoint directory; its config.json picks the model family")
    a("--host", default="127.0.0.1", help="address to listen on")
    a("--port", type=int, default=8000, help="HTTP port")
    a("--tp", type=int, default=1, help="tensor-parallel ranks of the language model")
    a("--mem_fraction", type=float, default=0.9,
      help="fraction of device memory the server may use; the KV pool gets what the weights leave")
    a("--max_total_token_num", type=int, default=None, help="KV slots (tokens) in the pool; default: sized from memory")
    a("--max_req_total_len", type=int, default=None,
      help="max prompt + generated tokens of one request (default: min(16384, the model's max positions))")
    a("--batch_max_tokens", type=int, default=None,
      help="max prompt tokens prefilled in one step; longer prompts are prefilled in chunks (default 8192)")
    a("--chunked_prefill_size", type=int, default=None, help="alias of --batch_max_tokens")
    a("--running_max_req_size", type=int, default=256, help="max requests running at once")
    a("--trust_remote_code", action="store_true", help="allow tokenizer code shipped with the checkpoint")
    a("--enable_multimodal", action="store_true", help="accept images (runs the vision encoder)")
    a("--visual_infer_batch_size", type=int, default=8, help="images per vision-encoder batch")
    a("--cache_capacity", type=int, default=200, help="image embeddings kept in the shared-memory cache")
    a("--cache_max_bytes", type=int, default=4 << 30, help="byte cap of the embedding cache")
    a("--cache_wait_s", type=float, default=10.0,
      help="how long a request waits for cache room (all records in use) before a 503")
    a("--visual_dp", type=int, default=1, help="data-parallel vision-encoder groups")
    a("--visual_tp", type=int, default=1, help="tensor-parallel ranks per vision-encoder group")
    a("--data_type", choices=["float32", "float16", "bfloat16"], default=None,
      help="compute dtype (default: the checkpoint's on GPU, float32 on CPU)")
    a("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where the models run")
    a("--max_images_per_request", type=int, default=16, help="more images than this is a 400")
    a("--max_image_bytes", type=int, default=32 << 20, help="larger images are refused with 413")
    a("--max_videos_per_request", type=int, default=4, help="more videos than this is a 400")
    a("--max_video_bytes", type=int, default=256 << 20, help="larger video files are refused with 413")
    a("--max_video_frames", type=int, default=768,
      help="most frames sampled from one video: fps sampling stops there; a larger num_frames is a 400")
    a("--max_video_pixels", type=int, default=90_316_800,
      help="pixel budget of one video (InternVL: every sampled frame's 448x448 tile; Qwen2-VL: one frame per "
           "temporal patch, frames shrunk to fit by qwen-vl-utils' VIDEO_TOTAL_PIXELS rule); over it is a 413")
    a("--max_request_bytes", type=int, default=256 << 20, help="larger request bodies are refused with 413")
    a("--image_fetch_timeout", type=float, default=10.0, help="seconds to fetch an image URL")
    a("--allowed_local_media_path", default=None,
      help="directory from which {'type': 'file'} images may be read (off by default)")
    a("--allowed_media_domains", type=_domain_list, default=None,
      help="comma-separated hosts image URLs may name (exact, case-insensitive); default: any host")
    a("--allow_private_media_urls", action="store_true",
      help="let image URLs reach loopback, private, link-local and other non-public addresses (refused by default)")
    a("--max_waiting_requests", type=int, default=4096, help="requests in flight beyond this get 503")
    a("--max_n", type=int, default=8, help="most samples ('n') one OpenAI request may ask for; more is a 400")
    a("--api_key", default=None,
      help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
           "(default: the MMSERVER_API_KEY environment variable, which keeps the key out of the process list)")
    a("--overlap_schedule", choices=["auto", "on", "off"], default="auto",
      help="build step N+1 on the host while the device runs step N (auto: on with CUDA)")
    a("--disable_dynamic_prompt_cache", action="store_true",
      help="do not keep finished requests' KV to reuse for prompts that start the same way (the prefix "
           "cache, keyed by token ids and image content; on by default)")
    a("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    a("--run_mode", choices=["normal", "visual_only"], default="normal",
      help="visual_only: an encoder-only server: loads only the vision encoder (--visual_dp × --visual_tp "
           "workers, batching, its own embedding cache) and serves POST /encode to LLM servers started with "
           "--visual_remote")
    a("--visual_remote", type=_address_list, default=None,
      help="comma-separated HOST:PORT of encoder-only servers: images are encoded there (least outstanding "
           "work first) instead of by local ViT workers; implies --enable_multimodal")
    a("--nnodes", type=int, default=1, help="machines the --tp ranks span (each holds --tp / --nnodes ranks)")
    a("--node_rank", type=int, default=0,
      help="this machine's index: 0 runs HTTP, the router and its ranks; the others run only model ranks")
    a("--nccl_host", default="127.0.0.1",
      help="node 0's address, reachable from every node: torch.distributed rendezvous on --nccl_port, node "
           "watchdog on --nccl_port + 1")
    a("--nccl_port", type=int, default=28765, help="rendezvous port on --nccl_host (the watchdog uses the next one)")
    a("--visual_remote_timeout", type=float, default=30.0,
      help="seconds a remote encoder has to answer one batch; past it the batch's requests get 503 and the "
           "encoder leaves the rotation until its /health answers again")
    a("--min_pixels", type=int, default=None,
      help="Qwen2-VL: the server's image pixel range, low end (default: preprocessor_config.json); requests may "
           "only narrow the range")
    a("--max_pixels", type=int, default=None,
      help="Qwen2-VL: the range's high end (default: preprocessor_config.json, 16384 tokens on the hub: cap it)")
    a("--chat_template", default=None, metavar="NAME|FILE",
      help="chat template over the model's own: llava-v1, vicuna, mistral, chatml, base (LMDeploy's names) "
           "or a jinja template file")
    return p


def _domain_list(raw: str) -> list[str]:
    hosts = [h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of host names")
    return hosts


def _address_list(raw: str) -> list[str]:
    from .visual.remote import parse_addresses

    try:
        return parse_addresses(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def env_int(name: str, minimum: int = 1) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ArgError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ArgError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    ns = build_parser().parse_args(argv)
    batch_max = ns.batch_max_tokens if ns.batch_max_tokens is not None else ns.chunked_prefill_size
    args = ServerArgs(**{k: v for k, v in vars(ns).items() if k not in ("chunked_prefill_size", "batch_max_tokens")},
                      batch_max_tokens=batch_max)
    args.load_workers = env_int("LOADWORKER") or 1
    for name, value in (("MIN_PIXELS", args.min_pixels), ("MAX_PIXELS", args.max_pixels)):
        if value is not None:
            if value < 1:
                raise ArgError(f"--{name.lower()} must be >= 1, got {value}")
            os.environ[name] = str(value)  # the family reads it when built, in every process
    if args.chat_template is not None:
        from .models.chat_templates import ENV, ChatOverride
        from .models.errors import ConfigError

        name = args.chat_template
        if os.path.isfile(name):
            name = os.path.abspath(name)
        try:
            ChatOverride(name)
        except ConfigError as e:
            raise ArgError(f"--chat_template: {e}") from None
        args.chat_template = name
        os.environ[ENV] = name  # the family reads it when built, in every process
    if args.api_key is None:
        args.api_key = os.environ.get("MMSERVER_API_KEY") or None
    if args.visual_remote:
        args.enable_multimodal = True
    check_args(args)
    return args


def check_args(a: ServerArgs) -> None:
    if not Path(a.model_dir).is_dir():
        raise ArgError(f"--model_dir {a.model_dir!r} is not a directory")
    positive = {"--tp": a.tp, "--running_max_req_size": a.running_max_req_size,
                "--visual_infer_batch_size": a.visual_infer_batch_size, "--cache_capacity": a.cache_capacity,
                "--visual_dp": a.visual_dp, "--visual_tp": a.visual_tp, "--port": a.port,
                "--max_images_per_request": a.max_images_per_request, "--max_image_bytes": a.max_image_bytes,
                "--max_videos_per_request": a.max_videos_per_request, "--max_video_bytes": a.max_video_bytes,
                "--max_video_frames": a.max_video_frames, "--max_video_pixels": a.max_video_pixels,
                "--max_waiting_requests": a.max_waiting_requests, "--cache_max_bytes": a.cache_max_bytes,
                "--max_n": a.max_n}
    for name, value in positive.items():
        if value < 1:
            raise ArgError(f"{name} must be >= 1, got {value}")
    for name, value in {"--max_total_token_num": a.max_total_token_num, "--max_req_total_len": a.max_req_total_len,
                        "--batch_max_tokens": a.batch_max_tokens}.items():
        if value is not None and value < 1:
            raise ArgError(f"{name} must be >= 1, got {value}")
    if not 0.0 < a.mem_fraction <= 1.0:
        raise ArgError(f"--mem_fraction must be in (0, 1], got {a.mem_fraction}")
    if a.run_mode == "visual_only" and a.visual_remote:
        raise ArgError("--run_mode visual_only and --visual_remote exclude each other (an encoder encodes itself)")
    if a.visual_remote and (a.visual_dp > 1 or a.visual_tp > 1):
        raise ArgError("--visual_dp / --visual_tp apply to the encoder-only servers, not with --visual_remote")
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        raise ArgError(f"--node_rank must be in [0, --nnodes), got --node_rank {a.node_rank} --nnodes {a.nnodes}")
    if a.tp % a.nnodes:
        raise ArgError(f"--tp {a.tp} must be a multiple of --nnodes {a.nnodes}")
    if a.nnodes > 1 and not 0 < a.nccl_port < 65535:
        raise ArgError(f"--nccl_port must be in (0, 65535), got {a.nccl_port}")
    if a.nnodes > 1 and a.run_mode == "visual_only":
        raise ArgError("--run_mode visual_only runs no language model: --nnodes does not apply")
    if a.visual_remote_timeout <= 0:
        raise ArgError(f"--visual_remote_timeout must be > 0, got {a.visual_remote_timeout}")
    if a.image_fetch_timeout <= 0 or a.cache_wait_s < 0:
        raise ArgError("--image_fetch_timeout must be > 0 and --cache_wait_s >= 0")
    if a.api_key is not None and (not a.api_key.strip() or a.api_key != a.api_key.strip()):
        raise ArgError("--api_key (or MMSERVER_API_KEY) must be non-empty, without surrounding spaces")
    if a.allowed_local_media_path is not None and not Path(a.allowed_local_media_path).is_dir():
        raise ArgError(f"--allowed_local_media_path {a.allowed_local_media_path!r} is not a directory")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgError("--device cuda was given but no CUDA device is available")
    if a.resolved_device == "cuda":
        import torch

        n = torch.cuda.device_count()
        per_node = a.tp // max(a.nnodes, 1)
        if per_node > n and a.run_mode != "visual_only":
            raise ArgError(f"--tp {a.tp} over {a.nnodes} node(s) needs {per_node} GPUs here, {n} visible")
        if a.visual_dp * a.visual_tp > n:
            raise ArgError(f"--visual_dp × --visual_tp = {a.visual_dp * a.visual_tp} exceeds the {n} visible GPUs")
