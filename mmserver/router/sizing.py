"""How big the KV pool and the token table are, from flags and free memory."""

from __future__ import annotations

import os

import torch

from ..args import ServerArgs
from ..engine.engine import EngineConfig
from ..models.llm.decoder import DecoderLM

DEFAULT_MAX_REQ_LEN = 16384
DEFAULT_BATCH_MAX_TOKENS = 8192
CPU_KV_FRACTION = 0.25  # of available RAM, when no --max_total_token_num is given on CPU
CPU_MAX_SLOTS = 131072  # CPU serving is for tests and demos; keep the default pool modest


def kv_bytes_per_token(llm: DecoderLM) -> int:
    layers, _, heads2, head_dim = llm.kv_shape(1)
    return layers * heads2 * head_dim * torch.tensor([], dtype=llm.dtype).element_size()


def kv_slots_from_memory(args: ServerArgs, llm: DecoderLM) -> int:
    per_token = kv_bytes_per_token(llm)
    if llm.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(llm.device)
        budget = free - (1.0 - args.mem_fraction) * total
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = avail * CPU_KV_FRACTION * args.mem_fraction
    slots = int(budget // per_token)
    if llm.device.type != "cuda":
        slots = min(slots, CPU_MAX_SLOTS)
    if slots < 1:
        raise RuntimeError(f"no memory left for the KV cache (--mem_fraction {args.mem_fraction}); "
                           "raise it or set --max_total_token_num")
    return slots


def engine_config_for(args: ServerArgs, llm: DecoderLM) -> EngineConfig:
    max_len = args.max_req_total_len or min(DEFAULT_MAX_REQ_LEN, llm.cfg.max_position_embeddings)
    if max_len > llm.cfg.max_position_embeddings:
        raise ValueError(f"--max_req_total_len {max_len} exceeds the model's max_position_embeddings "
                         f"{llm.cfg.max_position_embeddings}")
    slots = args.max_total_token_num or kv_slots_from_memory(args, llm)
    return EngineConfig(max_total_tokens=slots, max_requests=args.running_max_req_size,
                        max_req_len=min(max_len, slots),
                        batch_max_tokens=args.batch_max_tokens or DEFAULT_BATCH_MAX_TOKENS,
                        overlap_schedule={"on": True, "off": False}.get(args.overlap_schedule),
                        disable_dynamic_prompt_cache=args.disable_dynamic_prompt_cache)
