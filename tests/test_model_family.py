"""The model-family interface: the registry's choice, InternVL's prompt expansion against
transformers' own InternVLProcessor, image options, and the import rules (no module outside
the family folder imports it; no import cycle in mmserver/)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_image
from hf_reference import hf_processor
from mmserver.models.errors import ConfigError, OptionError
from mmserver.models.internvl.family import InternVLFamily
from mmserver.models.registry import load_family

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmserver"


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_registry_picks_internvl_for_both_layouts(checkpoints, layout):
    family = load_family(checkpoints(layout, "qwen2"))
    assert isinstance(family, InternVLFamily)
    assert family.config.layout == layout


def _unsupported(ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "paligemma"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_registry_refuses_an_unknown_architecture(ckpt, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_family(_unsupported(ckpt, tmp_path))
    msg = str(e.value)
    assert "PaliGemmaForConditionalGeneration" in msg
    assert "supported: InternVLChatModel, InternVLForConditionalGeneration" in msg


def test_server_refuses_an_unknown_architecture(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmserver.api_server", "--model_dir",
                           str(_unsupported(ckpt, tmp_path)), "--device", "cpu"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode != 0
    assert "start-up failed" in proc.stderr
    assert "PaliGemmaForConditionalGeneration" in proc.stderr and "InternVLChatModel" in proc.stderr


# --------------------------------------------------------------------------- prompts


PROMPTS = {
    "one_448": ("<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", [(448, 448)], 12),
    "multi_tile": ("<image>\nDescribe the picture in detail.", [(640, 480)], 12),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nCompare them.", [(300, 900), (1280, 720)], 6),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_expansion_matches_transformers_processor(checkpoints, case):
    hf_dir = checkpoints("hf", "qwen2")
    prompt, sizes, cap = PROMPTS[case]
    images = [random_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    family = load_family(hf_dir)
    options = family.image_options({"image_max_patch_num": cap}, {})
    counts = [family.plan_image(w, h, options).n_tokens for w, h in sizes]
    ids, spans = family.expand_prompt(prompt, counts)

    # transformers marks an image's place with the context token itself
    expected = hf_processor(hf_dir, cap)(text=prompt.replace("<image>", "<IMG_CONTEXT>"), images=images)
    assert ids == list(expected["input_ids"][0])
    context = family.special.img_context
    assert [(s, n) for s, n in spans] == family.find_spans(ids)
    for (start, n), count in zip(spans, counts):
        assert n == count and set(ids[start:start + n]) == {context}
        assert ids[start - 1] == family.special.img_start and ids[start + n] == family.special.img_end
    assert sum(n for _, n in spans) == ids.count(context)


def test_preprocess_gives_what_the_plan_said(ckpt):
    family = load_family(ckpt)
    options = family.image_options({}, {"max_dynamic_patch": 6})
    image = random_image(640, 480, 3)
    compact, normalized = family.preprocess(image, options), family.preprocess(image, options, normalize=True)
    assert compact.pixels.shape == (7, 448, 448, 3) and normalized.pixels.shape == (7, 3, 448, 448)
    assert compact.n_tokens == normalized.n_tokens == family.plan_image(640, 480, options).n_tokens == 7 * 256
    assert family.warmup_input().n_tokens == 256


# --------------------------------------------------------------------------- image options


def test_image_options_and_cache_key(ckpt):
    family = load_family(ckpt)
    default = family.config.max_dynamic_patch
    assert family.image_options({}, {}) == family.image_options({"image_max_patch_num": -1}, {}) == f"max{default}"
    assert family.image_options({"image_max_patch_num": 3}, {}) == "max3"
    assert family.image_options({"image_max_patch_num": 3}, {"max_dynamic_patch": 2, "detail": "auto"}) == "max2"
    with pytest.raises(OptionError, match=r"must be -1 \(model default\) or >= 1, got 0") as e:
        family.image_options({"image_max_patch_num": 0}, {})
    assert e.value.name == "image_max_patch_num"
    with pytest.raises(OptionError, match=r"must be an integer >= 1, got 'x'") as e:
        family.image_options({}, {"max_dynamic_patch": "x"})
    assert e.value.name == "max_dynamic_patch"


def test_intake_words_option_errors_as_before(ckpt):
    """The HTTP messages did not change when the checks moved into the family."""
    from mmserver.frontend.errors import BadParam
    from mmserver.frontend.intake import Intake, IntakeLimits
    from mmserver.http.schemas import ImageSpec

    intake = Intake(load_family(ckpt), IntakeLimits(1 << 20, 1.0, None, 4096, 5.0), None, None)
    try:
        with pytest.raises(BadParam) as e:
            intake.image_options([], {"image_max_patch_num": -2})
        assert e.value.message == "parameter 'image_max_patch_num' must be -1 (model default) or >= 1, got -2"
        spec = ImageSpec("url", "http://x", {"max_dynamic_patch": 0}, "messages[0].content[1].image_url")
        with pytest.raises(BadParam) as e:
            intake.image_options([spec], {})
        assert e.value.message == "messages[0].content[1].image_url.max_dynamic_patch must be an integer >= 1, got 0"
        assert e.value.param == "messages[0].content[1].image_url.max_dynamic_patch"
    finally:
        intake.close()


# --------------------------------------------------------------------------- import rules


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool, modules: set[str] = frozenset()) -> set[str]:
    """mmserver modules `name` imports: `from pkg import sub` counts as importing pkg.sub when
    that is one of `modules`, else pkg (a parent package's __init__, which Python runs before
    any submodule, is not counted)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names}
            found |= subs if subs <= set(modules) else {module} | subs
    return {m for m in found if m == "mmserver" or m.startswith("mmserver.")}


def test_only_the_family_and_the_registry_import_internvl():
    allowed = ("mmserver.models.internvl", "mmserver.models.registry")
    offenders = {name: sorted(m for m in _imports(name, path, top_level_only=False)
                              if m.startswith("mmserver.models.internvl"))
                 for name, path in _modules().items() if not name.startswith(allowed)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, True, set(modules)) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
