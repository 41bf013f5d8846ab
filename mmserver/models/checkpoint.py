"""Reading a checkpoint's safetensors files: helpers every family's weight loader shares."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file that must hold an object; anything else is a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{path.name} is not a JSON object")
    return out


class WeightError(ValueError):
    """A checkpoint whose tensors are missing, mis-shaped or unreadable."""


def list_shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in files if not (model_dir / n).is_file()]
        if missing:
            raise WeightError(f"weight shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return [model_dir / n for n in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{model_dir} has no *.safetensors weight files")
    return files


class _NullBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="shard", leave=False)


MapKey = Callable[[str], "tuple[str, int, Callable[[torch.Tensor], torch.Tensor]] | None"]


def _read_mapped(path: Path, map_key: MapKey, device: str, prefixes: tuple[str, ...]) -> dict[str, list]:
    from safetensors import safe_open

    parts: dict[str, list] = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for key in f.keys():
                target = map_key(key)
                if target is None or not target[0].startswith(prefixes):
                    continue
                name, part, transform = target
                parts.setdefault(name, []).append((part, key, transform(f.get_tensor(key))))
    except WeightError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise WeightError(f"cannot read weight file {path.name}: {e} (truncated or corrupt?)") from None
    return parts


def load_mapped(model_dir: str | os.PathLike, map_key: MapKey, expected: dict[str, tuple[int, ...]],
                prefixes: tuple[str, ...], device: str = "cpu", dtype: torch.dtype = torch.float32,
                progress: bool = True, workers: int = 1, tied: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `expected` (canonical name → shape) whose name starts with one of
    `prefixes`: source keys mapped by `map_key` to (canonical name, part, transform), parts
    concatenated along dim 0 in part order, shapes checked. `tied`: a missing
    `llm.lm_head.weight` is the embedding."""
    model_dir = Path(model_dir)
    shards = list_shards(model_dir)
    collected: dict[str, list] = {}
    bar = progress_bar(len(shards), "loading weights", progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for parts in pool.map(lambda p: _read_mapped(p, map_key, device, prefixes), shards):
            for name, items in parts.items():
                collected.setdefault(name, []).extend(items)
            bar.update(1)
    bar.close()
    if "llm.lm_head.weight" not in collected and tied and "llm.embed.weight" in collected:
        collected["llm.lm_head.weight"] = collected["llm.embed.weight"]
    expected = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(collected))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    weights: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        items = sorted(collected[name], key=lambda x: x[0])
        tensor = items[0][2] if len(items) == 1 else torch.cat([t for _, _, t in items], dim=0)
        if tuple(tensor.shape) != shape:
            sources = ", ".join(k for _, k, _ in items)
            raise WeightError(f"tensor {sources} has shape {tuple(tensor.shape)}, expected {shape}")
        weights[name] = tensor.to(dtype=dtype).contiguous()
    return weights
