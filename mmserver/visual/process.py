"""The visual processes' entries: the visual server, and ViT worker group ranks in processes
of their own; loading the encoder, warming it up and joining a group's process group."""

from __future__ import annotations

from multiprocessing.connection import Connection

from ..embed_cache.service import CacheClient
from .server import VisualServer, serve_forever
from .workers import LocalWorker, RemoteWorker, VitRunner, tp_encode, tp_follow


def _load_encoder(args, tp=None):
    """The checkpoint's family and its vision encoder (this rank's shard), warmed up on CUDA."""
    import torch

    from ..models.registry import load_family

    device = args.resolved_device
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    family = load_family(args.model_dir)
    dtype = args.compute_dtype(family.config.torch_dtype)
    weights = family.load_weights(device, dtype, tp, components=("vision",), progress=False,
                                  workers=args.load_workers)
    encoder = family.build_encoder(weights, tp)
    if encoder.device.type == "cuda":
        # Compile the triton kernels and set up cuBLAS now (every tp rank alike), not in the
        # first requests' batches: two batches in flight must not race through a first compile.
        encoder.encode_images([family.warmup_input()])
        torch.cuda.synchronize(encoder.device)
    return family, encoder


def _runner(family, encoder, tp=None) -> VitRunner:
    encode = tp_encode(encoder, tp) if tp is not None and tp.size > 1 else encoder.encode_images
    return VitRunner(encode, family)


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
    family, encoder = _load_encoder(args, tp)
    runner = _runner(family, encoder, tp)
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
    _, encoder = _load_encoder(args, tp)
    ready()
    tp_follow(encoder, tp)


def run_visual(ready, args, from_http: Connection, to_router: Connection, to_http: Connection, cache_socket: str,
               remote: list[tuple[Connection, Connection]]) -> None:
    """The visual server. With `remote` worker pipes (or --visual_remote encoders) it only
    schedules; otherwise it runs the ViT itself."""
    if args.visual_remote:
        from ..models.registry import load_family
        from .remote import RemoteEncoders

        cfg = load_family(args.model_dir).config
        workers = [RemoteEncoders(args.visual_remote, cfg.llm.hidden_size, args.compute_dtype(cfg.torch_dtype),
                                  args.api_key, args.visual_remote_timeout)]
    elif remote:
        workers = [RemoteWorker(to_w, from_w) for to_w, from_w in remote]
    else:
        family, encoder = _load_encoder(args)
        workers = [LocalWorker(_runner(family, encoder))]
    server = VisualServer(workers, CacheClient(cache_socket), to_router, to_http, args.visual_infer_batch_size)
    ready()
    serve_forever(server, from_http)
