"""Bad checkpoints and bad requests fail with an error that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mmserver import GenerationConfig, pipeline
from mmserver.models.internvl.config import ConfigError, load_config
from mmserver.models.internvl.preprocess import ImageError
from mmserver.models.internvl.prompt import PromptError
from mmserver.models.internvl.weights import WeightError
from mmserver.models.registry import load_model


@pytest.fixture
def broken_ckpt(checkpoints, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("original", "qwen2"), dst)
    return dst


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _shard_with(d: Path, key: str) -> Path:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"][key]


def _rewrite_shard(d: Path, key: str, fn) -> None:
    path = _shard_with(d, key)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(broken_ckpt):
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    _rewrite_shard(broken_ckpt, key, lambda t: t.pop(key))
    with pytest.raises(WeightError, match=r"missing .*llm\.layers\.1\.down\.weight"):
        load_model(broken_ckpt)


def test_misshaped_tensor_is_named(broken_ckpt):
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    _rewrite_shard(broken_ckpt, key, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(WeightError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight has shape"):
        load_model(broken_ckpt)


def test_truncated_weight_file(broken_ckpt):
    path = _shard_with(broken_ckpt, "language_model.lm_head.weight")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=rf"cannot read weight file {path.name}"):
        load_model(broken_ckpt)


def test_missing_shard_file(broken_ckpt):
    path = _shard_with(broken_ckpt, "language_model.lm_head.weight")
    path.unlink()
    with pytest.raises(WeightError, match=rf"missing: {path.name}"):
        load_model(broken_ckpt)


def test_unknown_llm_model_type(broken_ckpt):
    _edit_config(broken_ckpt, lambda c: c["llm_config"].__setitem__("model_type", "mamba"))
    with pytest.raises(ConfigError, match=r"llm_config\.model_type 'mamba' is not supported"):
        load_config(broken_ckpt)


def test_pixel_shuffle_v1_refused(broken_ckpt):
    _edit_config(broken_ckpt, lambda c: c.__setitem__("ps_version", "v1"))
    with pytest.raises(ConfigError, match=r"ps_version 'v1' is not supported"):
        load_config(broken_ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)


def test_wrong_image_length_env(broken_ckpt, monkeypatch):
    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "128")
    with pytest.raises(ConfigError, match="INTERNVL_IMAGE_LENGTH=128 disagrees"):
        load_model(broken_ckpt)


def test_more_placeholders_than_images(pipe, image_factory):
    with pytest.raises(PromptError, match=r"2 image placeholder\(s\) .* but 1 image\(s\)"):
        pipe.generate("<image> and <image>", images=[image_factory(64, 64)])


def test_more_images_than_placeholders(pipe, image_factory):
    with pytest.raises(PromptError, match=r"0 image placeholder\(s\) .* but 1 image\(s\)"):
        pipe.generate("no placeholder here", images=[image_factory(64, 64)])


def test_reserved_context_token_refused(pipe):
    with pytest.raises(PromptError, match="IMG_CONTEXT"):
        pipe.generate("<IMG_CONTEXT> sneaky")


def test_unreadable_image(pipe):
    with pytest.raises(ImageError, match="image 0"):
        pipe.generate("<image>", images=[b"definitely not an image"])


def test_bad_generation_parameter(pipe):
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate("hi", gen_config=GenerationConfig(top_p=0.0))


def test_errors_leave_the_engine_usable(pipe):
    with pytest.raises(PromptError):
        pipe.generate(["fine", "<image>"], images=[[], []])
    assert pipe.engine.kv.used == 0 and not pipe.engine.has_work()
    r = pipe.generate("still works", gen_config=GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert len(r.token_ids) == 3


def test_prompt_over_max_length(checkpoints):
    p = pipeline(checkpoints("original", "qwen2"), device="cpu", dtype="float32", max_req_len=64,
                 max_total_tokens=256)
    with pytest.raises(ValueError, match="exceeds max_req_total_len 64"):
        p.generate("word " * 80, gen_config=GenerationConfig(max_new_tokens=4))
