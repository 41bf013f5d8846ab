"""The visual processes' entries: the visual server, and ViT worker group ranks in processes
of their own; loading the encoder, warming it up and joining a group's process group."""

from __future__ import annotations

from multiprocessing.connection import Connection

from ..embed_cache.service import CacheClient
from .server import VisualServer, serve_forever
from .workers import LocalWorker, RemoteWorker, VitRunner, tp_encode, tp_follow


def _load_encoder(args, tp=None):
    from ..models.internvl.config import load_config
    from ..models.internvl.model import load_sharded_weights
    from ..models.internvl.vision import VisionEncoder
    import torch

    device = args.resolved_device
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    cfg = load_config(args.model_dir)
    dtype = args.compute_dtype(cfg.torch_dtype)
    weights = load_sharded_weights(args.model_dir, cfg, device, dtype, tp, components=("vision",), progress=False)
    encoder = VisionEncoder(cfg, weights, tp=tp)
    if encoder.device.type == "cuda":
        # Compile the triton kernels and set up cuBLAS now (every tp rank alike), not in the
        # first requests' batches: two batches in flight must not race through a first compile.
        size = cfg.vision.image_size
        encoder.encode(torch.zeros((1, size, size, 3), dtype=torch.uint8))
        torch.cuda.synchronize(encoder.device)
    return cfg, encoder


def _runner(cfg, encoder, tp=None) -> VitRunner:
    encode = tp_encode(encoder, tp) if tp is not None and tp.size > 1 else encoder.encode
    return VitRunner(encode, cfg.image_tokens_per_tile, cfg.min_dynamic_patch, cfg.use_thumbnail)


def _join_group(args, dp_rank: int, tp_rank: int, init_method: str):
    """Pick this rank's GPU (group-major) and join the group's tensor-parallel process group."""
    import torch

    from ..models.parallel import init_tp

    if args.resolved_device == "cuda":
        torch.cuda.set_device((dp_rank * args.visual_tp + tp_rank) % torch.cuda.device_count())
    tp = init_tp(tp_rank, args.visual_tp, init_method)
    if args.resolved_device == "cuda":  # init_tp picks rank % devices; groups after the first sit further on
        torch.cuda.set_device((dp_rank * args.visual_tp + tp_rank) % torch.cuda.device_count())
    return tp


def run_vit_leader(ready, args, dp_rank: int, init_method: str, jobs: Connection, results: Connection) -> None:
    """A worker group's rank 0 in its own process: batches in, BatchResults out."""
    tp = _join_group(args, dp_rank, 0, init_method)
    cfg, encoder = _load_encoder(args, tp)
    runner = _runner(cfg, encoder, tp)
    ready()
    try:
        while True:
            try:
                refs = jobs.recv()
            except EOFError:
                return
            results.send(runner.process(refs))
    finally:
        if tp.size > 1:
            import torch

            tp.broadcast(torch.tensor([-1], dtype=torch.int64, device=encoder.device))


def run_vit_follower(ready, args, dp_rank: int, tp_rank: int, init_method: str) -> None:
    tp = _join_group(args, dp_rank, tp_rank, init_method)
    cfg, encoder = _load_encoder(args, tp)
    ready()
    tp_follow(encoder, tp, cfg.vision.image_size)


def run_visual(ready, args, from_http: Connection, to_router: Connection, to_http: Connection, cache_socket: str,
               remote: list[tuple[Connection, Connection]]) -> None:
    """The visual server. With `remote` worker pipes it only schedules; otherwise it runs the ViT itself."""
    if remote:
        workers = [RemoteWorker(to_w, from_w) for to_w, from_w in remote]
    else:
        cfg, encoder = _load_encoder(args)
        workers = [LocalWorker(_runner(cfg, encoder))]
    server = VisualServer(workers, CacheClient(cache_socket), to_router, to_http, args.visual_infer_batch_size)
    ready()
    serve_forever(server, from_http)
