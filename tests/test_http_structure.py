"""The HTTP package's shape: no import cycle among its modules."""

from __future__ import annotations

import ast
from pathlib import Path

HTTP = Path(__file__).resolve().parents[1] / "mmserver" / "http"


def _local_imports(path: Path) -> set[str]:
    """Modules of mmserver/http that `path` imports, at any depth in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                out |= {a.name for a in node.names}
            elif node.level == 2 and node.module and node.module.startswith("http."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mmserver.http.")}
    return out


def test_no_import_cycle():
    modules = {p.stem for p in HTTP.glob("*.py")}
    graph = {m: _local_imports(HTTP / f"{m}.py") & modules for m in modules}
    assert "app" in graph and {"openai_api", "lightllm_api", "completions"} <= graph["app"]
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
