"""scripts/make_tiny_checkpoint.py: one generator for every family. The Qwen2-VL / Qwen2.5-VL
checkpoints are hub-style (sparse vision_config, legacy or v5 weight names, real token ids)
and load in transformers; InternVL goes through the old generator unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _load_all_families_generator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gen = _load_all_families_generator()
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
            "<tool_call>": 151657, "<|file_sep|>": 151664}


def _keys(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_files_config_and_tokens(qwen_checkpoints, family):
    d = qwen_checkpoints(family)
    for name in ("config.json", "preprocessor_config.json", "generation_config.json", "chat_template.json",
                 "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json", "README.md"):
        assert (d / name).is_file(), name
    assert len(set(_keys(d).values())) >= 2  # sharded
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["tie_word_embeddings"] is True
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert "text_config" not in cfg and "patch_size" not in cfg["vision_config"]  # flat and sparse
    keys = _keys(d)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("visual.blocks.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    assert "<IMG_CONTEXT>" not in tok.get_vocab() and tok.convert_ids_to_tokens(151665) != "<img>"
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")


def test_v5_names_and_untied(qwen_checkpoints):
    legacy = _keys(qwen_checkpoints("qwen2_5_vl", tie_word_embeddings=False))
    v5 = _keys(qwen_checkpoints("qwen2_5_vl", "v5", tie_word_embeddings=False))
    assert "lm_head.weight" in legacy and "lm_head.weight" in v5
    assert {gen.v5_key(k) for k in legacy} == set(v5)
    assert any(k.startswith("model.visual.blocks.") for k in v5)
    assert any(k.startswith("model.language_model.layers.") for k in v5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_loads_in_transformers_with_both_namings(qwen_checkpoints, family):
    from transformers import AutoModelForImageTextToText

    outs = []
    for style in ("legacy", "v5"):
        model = AutoModelForImageTextToText.from_pretrained(str(qwen_checkpoints(family, style)), dtype=torch.float32)
        assert type(model).__name__ == gen.ARCHITECTURES[family]
        ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
        outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert outs[0].std() > 0.3  # clear margins: logits of std ~1


@pytest.mark.parametrize(("family", "size"), [("qwen2_vl", "2b"), ("qwen2_vl", "7b"), ("qwen2_5_vl", "3b"),
                                              ("qwen2_5_vl", "7b")])
def test_real_sizes_match_transformers(tmp_path, family, size):
    """Real configs instantiate on the meta device with exactly our (v5) names and shapes."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = gen.qwen_dims(family, size)
    (tmp_path / "config.json").write_text(json.dumps(gen.config(d, "bfloat16")))
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    ours = {o.name: tuple(o.shape) for o in gen.layout(gen.canonical_tensors(d), "v5")}
    theirs = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    if d.tied:
        theirs.pop("lm_head.weight")
    assert theirs == ours


def test_cli_families(tmp_path):
    script = ROOT / "scripts" / "make_tiny_checkpoint.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, cwd=ROOT)
    p = run("--family", "qwen2_5_vl", "--out", str(tmp_path / "q"), "--max-pixels", "200704", "--key-style", "v5")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "q" / "preprocessor_config.json").read_text())["max_pixels"] == 200704
    p = run("--out", str(tmp_path / "i"), "--layout", "hf")  # the default family: InternVL's command line
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "i" / "config.json").read_text())["model_type"] == "internvl"
    assert run("--family", "qwen2_vl", "--out", str(tmp_path / "x"), "--size", "3b").returncode != 0
