"""`python -m mmserver.api_server --model_dir DIR --enable_multimodal`: start the server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

from .args import ArgError, ServerArgs, parse_args
from .launcher import Cluster, StartupError, configure_logging, fail, new_cluster, pipe
from .nodes import NodeWatch, link_port, local_ranks, run_node, tp_init_method

log = logging.getLogger("mmserver")

SHUTDOWN_GRACE_S = 3.0  # in-flight requests get this long to end after SIGTERM


def _start_vit_workers(args: ServerArgs, cluster: Cluster) -> list:
    """visual_dp groups of visual_tp ranks, each rank a process; returns the leaders' pipes.

    With one group of one rank there is nothing to start: the visual server runs the ViT."""
    from .visual.process import run_vit_follower, run_vit_leader

    if args.visual_dp == 1 and args.visual_tp == 1:
        return []
    remote = []
    for g in range(args.visual_dp):
        init = f"file://{cluster.workdir}/vit{g}.init"
        jobs_r, jobs_w = pipe()
        res_r, res_w = pipe()
        cluster.spawn(f"vit{g}-0", run_vit_leader, args.log_level, args=args, dp_rank=g, init_method=init,
                      jobs=jobs_r, results=res_w)
        for r in range(1, args.visual_tp):
            cluster.spawn(f"vit{g}-{r}", run_vit_follower, args.log_level, args=args, dp_rank=g, tp_rank=r,
                          init_method=init)
        remote.append((jobs_w, res_r))
    for g in range(args.visual_dp):
        for r in range(args.visual_tp):
            cluster.wait_ready(f"vit{g}-{r}")
    return remote


def start_workers(args: ServerArgs, cluster: Cluster, cfg) -> dict:
    """Start the child processes in order; returns the HTTP process's pipe ends and facts."""
    from .embed_cache.process import run_cache
    from .router.process import run_model_worker, run_router
    from .visual.process import run_visual

    http_to_router_r, http_to_router_w = pipe()
    router_to_http_r, router_to_http_w = pipe()
    visual_to_router_r, visual_to_router_w = pipe()
    ends = {"to_router": http_to_router_w, "from_router": router_to_http_r, "to_visual": None, "from_visual": None,
            "cache_socket": None}
    if args.enable_multimodal:
        socket_path = os.path.join(cluster.workdir, "cache.sock")
        cluster.start("embed_cache", run_cache, args.log_level, prefix=cluster.prefix, socket_path=socket_path,
                      hidden_size=cfg.llm.hidden_size, itemsize=args.compute_dtype(cfg.torch_dtype).itemsize,
                      capacity=args.cache_capacity, max_bytes=args.cache_max_bytes)
        remote = _start_vit_workers(args, cluster)
        http_to_visual_r, http_to_visual_w = pipe()
        visual_to_http_r, visual_to_http_w = pipe()
        cluster.start("visual", run_visual, args.log_level, args=args, from_http=http_to_visual_r,
                      to_router=visual_to_router_w, to_http=visual_to_http_w, cache_socket=socket_path,
                      remote=remote)
        ends.update(to_visual=http_to_visual_w, from_visual=visual_to_http_r, cache_socket=socket_path)
    init = tp_init_method(args, cluster.workdir)
    cluster.spawn("router", run_router, args.log_level, args=args, from_http=http_to_router_r,
                  from_visual=visual_to_router_r if args.enable_multimodal else None, to_http=router_to_http_w,
                  init_method=init)
    followers = local_ranks(args)[1:]  # node 0's other ranks; the other nodes start their own
    for r in followers:
        cluster.spawn(f"model{r}", run_model_worker, args.log_level, args=args, tp_rank=r, init_method=init)
    ends["router_info"] = cluster.wait_ready("router")
    for r in followers:
        cluster.wait_ready(f"model{r}")
    return ends


def start_encoder_workers(args: ServerArgs, cluster: Cluster, cfg) -> dict:
    """An encoder-only server (--run_mode visual_only): embed cache → ViT workers → visual
    process, whose "to router" messages (an image encoded) come back to the HTTP process."""
    from .embed_cache.process import run_cache
    from .visual.process import run_visual

    socket_path = os.path.join(cluster.workdir, "cache.sock")
    cluster.start("embed_cache", run_cache, args.log_level, prefix=cluster.prefix, socket_path=socket_path,
                  hidden_size=cfg.llm.hidden_size, itemsize=args.compute_dtype(cfg.torch_dtype).itemsize,
                  capacity=args.cache_capacity, max_bytes=args.cache_max_bytes)
    remote = _start_vit_workers(args, cluster)
    http_to_visual_r, http_to_visual_w = pipe()
    visual_to_http_r, visual_to_http_w = pipe()
    cluster.start("visual", run_visual, args.log_level, args=args, from_http=http_to_visual_r,
                  to_router=visual_to_http_w, to_http=visual_to_http_w, cache_socket=socket_path, remote=remote)
    return {"to_visual": http_to_visual_w, "from_visual": visual_to_http_r, "cache_socket": socket_path}


async def serve_http(args: ServerArgs, cluster: Cluster, family, stop_ids, ends: dict,
                     nodes: NodeWatch | None = None) -> None:
    from aiohttp import web

    from .embed_cache.service import CacheClient
    from .frontend.images import MediaFetcher
    from .frontend.intake import EmbedsInput, Intake, IntakeLimits
    from .models.family import VideoLimits
    from .frontend.media_policy import MediaPolicy
    from .frontend.streams import Streams
    from .http.app import build_app, serve_until_signal
    from .http.common import AppState
    from .ipc import Failure, Outputs, RouterStats, VisualStats
    loop = asyncio.get_running_loop()
    session = MediaFetcher(MediaPolicy.from_args(args.allowed_media_domains, args.allow_private_media_urls))
    cache = CacheClient(ends["cache_socket"]) if ends["cache_socket"] else None
    max_req_len = ends["router_info"]["max_req_len"]
    model_dtype = args.compute_dtype(family.config.torch_dtype)
    intake = Intake(family, IntakeLimits(args.max_image_bytes, args.image_fetch_timeout, args.allowed_local_media_path,
                                         max_req_len, args.cache_wait_s,
                                         VideoLimits(args.max_video_frames, args.max_video_pixels),
                                         args.max_video_bytes), cache, session,
                    EmbedsInput(cluster.prefix, model_dtype))
    streams = Streams(family.tokenizer, ends["to_router"], ends["to_visual"], intake.release)
    stats: dict[str, dict] = {}

    def dead() -> str | None:
        return cluster.dead() or (nodes.lost if nodes is not None else None)

    def health() -> str | None:
        return streams.failure or dead()

    def health_details() -> dict:
        states = stats.get("visual", {}).get("remote_encoders")
        return {"remote_encoders": {a: "up" if up else "down" for a, up in states.items()}} if states else {}

    def drain(conn, source: str) -> None:
        try:
            while conn.poll():
                match conn.recv():
                    case Outputs() as outs:
                        streams.dispatch(outs)
                    case Failure() as failure:
                        streams.fail(failure)
                    case RouterStats() | VisualStats() as s:
                        stats[source] = dataclasses.asdict(s)
                    case msg:
                        raise TypeError(f"from the {source}: unexpected message {msg!r}")
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            streams.fail_all(f"{source} process is gone")

    loop.add_reader(ends["from_router"].fileno(), drain, ends["from_router"], "router")
    if ends["from_visual"] is not None:
        loop.add_reader(ends["from_visual"].fileno(), drain, ends["from_visual"], "visual")

    state = AppState(intake=intake, streams=streams, stop_token_ids=stop_ids,
                     max_images=args.max_images_per_request, max_videos=args.max_videos_per_request,
                     max_waiting=args.max_waiting_requests,
                     model_name=os.path.basename(os.path.normpath(args.model_dir)), multimodal=args.enable_multimodal,
                     health=health, health_details=health_details, stats=stats, max_n=args.max_n, api_key=args.api_key)
    app = build_app(state, args.max_request_bytes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    print(f"mmserver ready on http://{args.host}:{args.port} "
          f"(kv slots {ends['router_info']['kv_slots']}, max_req_total_len {max_req_len})", flush=True)

    try:
        await serve_until_signal(dead, lambda: streams.failure is not None, streams.fail_all, log)
    finally:
        await runner.cleanup()
        await session.close()
        intake.close()
        if cache is not None:
            cache.close()


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except ArgError as e:
        fail(str(e))
    configure_logging(args)
    args.limit_cpu_threads()
    from .models.errors import ConfigError, PromptError
    from .models.registry import load_family

    try:
        family = load_family(args.model_dir, trust_remote_code=args.trust_remote_code)
        family.tokenizer  # loaded and checked now: a bad tokenizer stops the start, not a request
    except (ConfigError, PromptError, OSError, ValueError) as e:
        fail(f"cannot load {args.model_dir}: {e}")
    stop_ids = family.stop_token_ids()
    if args.node_rank > 0:  # model ranks only, until node 0 goes away
        sys.exit(run_node(args))
    nodes = None
    if args.nnodes > 1:
        try:
            nodes = NodeWatch(args.nccl_host, link_port(args), args.nnodes)
        except OSError as e:
            fail(f"node watchdog on port {link_port(args)}: {e}")
    cluster = new_cluster()
    visual_only = args.run_mode == "visual_only"
    try:
        ends = (start_encoder_workers if visual_only else start_workers)(args, cluster, family.config)
    except StartupError as e:
        cluster.shutdown()
        fail(str(e))
    except BaseException:
        cluster.shutdown()
        raise
    try:
        import uvloop

        if visual_only:
            from .http.encoder_api import serve_encoder

            uvloop.run(serve_encoder(args, cluster, family, ends))
        else:
            uvloop.run(serve_http(args, cluster, family, stop_ids, ends, nodes))
    except OSError as e:  # e.g. the port is taken
        fail(f"HTTP server: {e}")
    finally:
        cluster.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
