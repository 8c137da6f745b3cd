"""The package's shape: imports point one way (no cycles), a stage never imports another stage,
every subpackage ships in the wheel, and ``alignment`` is a regular package.

Imports are read from the source (every ``import``, also inside functions and under
TYPE_CHECKING), so the graph is the one a reader sees, not only what happens to run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import alignment

# The source tree beside the tests, not the installed copy: CI installs the wheel, whose
# site-packages holds only the subpackages pyproject.toml lists (and no pyproject.toml).
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alignment"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """alignment modules that ``path`` imports (``from alignment.x import y`` counts y when it
    is itself a module, else x)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alignment")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("alignment"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _stage_of(module: str) -> str | None:
    """The stage a module belongs to: alignment.stages.<stage>[.<part>], or None (shared code)."""
    from alignment.stages import MODULES

    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["alignment", "stages"] and parts[2] in MODULES:
        return parts[2]
    return None


def test_a_stage_never_imports_another_stage():
    crossings = [(m, t) for m, targets in _graph().items() for t in targets
                 if _stage_of(m) and _stage_of(t) and _stage_of(m) != _stage_of(t)]
    assert crossings == []
    assert _stage_of("alignment.stages.ppo.maths") == "ppo" and _stage_of("alignment.stages.common") is None


def test_shared_layers_never_import_stages_or_the_pipeline():
    graph = _graph()
    upper = ("alignment.stages", "alignment.pipeline", "alignment.run", "alignment.bench")
    lower = ("alignment.data", "alignment.modeling", "alignment.rewards", "alignment.scale", "alignment.tracking", "alignment.records",
             "alignment.config", "alignment.errors")
    def under(module: str, roots: tuple[str, ...]) -> bool:
        return any(module == r or module.startswith(r + ".") for r in roots)

    bad = [(m, t) for m, targets in graph.items() if under(m, lower) for t in targets if under(t, upper)]
    assert bad == []


def test_every_subpackage_ships_in_the_wheel():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(alignment(?:\.\w+)*)"', pyproject[pyproject.index("packages = ["):]))
    on_disk = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_alignment_is_a_regular_package():
    assert alignment.__file__ is not None and Path(alignment.__file__).name == "__init__.py"
