"""`pipeline(..., backend_config=TurbomindEngineConfig(tp=N))`: tensor parallelism behind the Pipeline API.

The pipeline's own process is rank 0: it loads its shard of the LLM, wraps it in
`engine.tp.TPLeader` and runs the Engine as with tp=1 (the vision encoder stays unsharded
there). Ranks 1..N-1 are spawned daemon processes that join through a `file://` rendezvous in a
temp dir, load their shard, allocate the same KV pool and `follow()` rank 0's batches until
`TPRanks.close()` (from `Pipeline.close()`, garbage collection or interpreter exit) stops them.
torch.distributed has one default group per process, so one tp > 1 pipeline per process at a time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_JOIN_S = 30.0


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str) -> str:
    if device.startswith("cuda"):  # init_tp(nccl) picked this rank's GPU
        return f"cuda:{torch.cuda.current_device()}"
    return device


def load_rank(model_dir, tp, device: str, dtype: torch.dtype, backend_config, engine_config, workers: int = 1):
    """This rank's LLM shard and its EngineConfig (the same on every rank)."""
    import torch.distributed as dist

    from .models.registry import load_family
    from .pipeline import _engine_config

    device = _rank_device(device)
    family = load_family(model_dir)
    weights = family.load_weights(device, dtype, tp, components=("llm",), progress=False, workers=workers)
    llm = family.build_llm(weights, tp=tp)
    del weights
    cfg = _engine_config(backend_config, engine_config, llm, device)
    # every rank's pool must have the same slots (CUDA sizes them from its free memory): the smallest
    slots = torch.tensor([cfg.max_total_tokens], dtype=torch.int64, device=llm.device)
    dist.all_reduce(slots, op=dist.ReduceOp.MIN, group=tp.group)
    cfg.max_total_tokens = int(slots.item())
    cfg.max_req_len = min(cfg.max_req_len, cfg.max_total_tokens)
    return family, llm, cfg


def _follower(rank: int, world: int, init_method: str, model_dir, device: str, dtype: torch.dtype,
              backend_config, engine_config, workers: int) -> None:
    """Process entry (ranks > 0): load this shard, then run rank 0's batches until it stops."""
    from .engine.kv_pool import allocate_kv
    from .engine.tp import follow
    from .models.parallel import destroy_tp, init_tp

    tp = init_tp(rank, world, init_method, backend=_backend(device))
    try:
        _, llm, cfg = load_rank(model_dir, tp, device, dtype, backend_config, engine_config, workers)
        kv, table = allocate_kv(llm, cfg)  # rank 0's shapes, as its Engine allocates them
        follow(llm, kv.buffer, table.table, tp)
    finally:
        destroy_tp(tp)


class TPRanks:
    """The follower processes and the group of one tp > 1 pipeline; `close()` is idempotent."""

    def __init__(self, model_dir, world: int, device: str, dtype: torch.dtype, backend_config, engine_config,
                 workers: int = 1):
        import torch.multiprocessing as mp

        self.world = world
        self.tmp = tempfile.mkdtemp(prefix="mmserver_tp_")
        init_method = f"file://{Path(self.tmp) / 'init'}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_follower, daemon=True, name=f"mmserver-tp{rank}",
                                  args=(rank, world, init_method, model_dir, device, dtype, backend_config,
                                        engine_config, workers))
                      for rank in range(1, world)]
        self.leader = None
        self.tp = None
        self._state: list = [None, None]  # [leader, tp], filled as they come (the finalizer must not hold self)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.tmp, self._state)
        try:
            for p in self.procs:
                p.start()
            from .engine.tp import TPLeader
            from .models.parallel import init_tp

            tp = self._state[1] = init_tp(0, world, init_method, backend=_backend(device))
            family, llm, cfg = load_rank(model_dir, tp, device, dtype, backend_config, engine_config, workers)
            self.leader = TPLeader(llm, tp)
            self._state[0] = self.leader
            self.family, self.llm, self.tp, self.engine_config = family, llm, tp, cfg
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _shutdown(procs, tmp: str, state: list) -> None:
    """Stop the followers (TPLeader.stop ends their loop), leave the group, reap every child."""
    from .models.parallel import destroy_tp

    leader, tp = state
    if leader is not None and all(p.is_alive() for p in procs):
        try:
            leader.stop()
        except Exception:  # a follower died: it is terminated below
            log.exception("stopping the tensor-parallel followers")
    for p in procs:
        if p.pid is None:
            continue
        p.join(_JOIN_S if leader is not None else 0)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()
    try:
        destroy_tp(tp)
    except Exception:
        log.exception("leaving the tensor-parallel group")
    shutil.rmtree(tmp, ignore_errors=True)
