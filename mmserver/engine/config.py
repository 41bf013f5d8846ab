"""The engine's knobs, in one dataclass every part of the engine reads (and nothing else).

`MMSERVER_CUDA_GRAPHS=0` is read here, once, when a config is built: the server's
(`router/sizing.py`), the offline pipeline's and a test's config all pass through
`__post_init__`, so no code path reads the environment when it decides to capture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CUDA_GRAPHS_ENV = "MMSERVER_CUDA_GRAPHS"  # "0" turns CUDA graphs off


@dataclass
class EngineConfig:
    max_total_tokens: int = 16384  # KV slots (the pool holds one more, the CUDA-graph scratch slot)
    max_requests: int = 64  # --running_max_req_size
    max_req_len: int = 8192  # --max_req_total_len: prompt + new tokens
    batch_max_tokens: int = 8192  # prompt tokens prefilled per step (chunk size)
    # Replay decode steps from CUDA graphs (CUDA devices only). MMSERVER_CUDA_GRAPHS=0 in the
    # environment when the config is built turns this off, whatever was asked.
    cuda_graphs: bool = True
    # Build step N+1 while the device runs step N (see `engine.engine`). None: on for CUDA devices.
    overlap_schedule: bool | None = None
    # Keep finished requests' KV in a prefix cache and reuse it for later prompts that start
    # the same way (`engine.prefix_cache`); --disable_dynamic_prompt_cache (LightLLM's flag) sets this.
    disable_dynamic_prompt_cache: bool = False

    def __post_init__(self) -> None:
        if self.cuda_graphs and os.environ.get(CUDA_GRAPHS_ENV, "1") == "0":
            self.cuda_graphs = False
