"""The package's dependency rules (docs/ARCHITECTURE.md's table) and no import cycle between modules,
checked on the source's import statements (module level and lazy, function-level ones)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ftkit"

# package -> ftkit packages/modules it may import (besides itself); lazy imports included
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "segments": {"errors"},
    "data": {"segments", "errors", "files"},
    "models": {"segments", "errors", "files"},
    "adapters": {"models", "data.packer", "segments", "errors", "files"},
    "train": {"models", "data", "adapters", "infer.mcot", "segments", "errors", "files"},
    "infer": {"models", "data", "adapters.io", "adapters.attach", "segments", "errors", "files"},
    "testing": {"data.packer", "segments", "errors"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """ftkit modules imported by ``path`` (``from ftkit.x import y`` counts ``ftkit.x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ftkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftkit") and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_mod = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                    (PKG.parent / sub.replace(".", "/") / "__init__.py").is_file()
                out.add(sub if is_mod else node.module)
    return out


SOURCES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def owner(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("mod", [m for m in SOURCES if owner(m) in ALLOWED])
def test_dependency_rules(mod):
    pkg = owner(mod)
    bad = []
    for dep in imports(SOURCES[mod], top_level_only=False):
        rest = dep.split(".", 1)[1] if "." in dep else ""
        if owner(dep) == pkg:
            continue
        if not any(rest == a or rest.startswith(a + ".") for a in ALLOWED[pkg]):
            bad.append(dep)
    assert not bad, f"{mod} imports {bad}; ARCHITECTURE.md allows {pkg} -> {sorted(ALLOWED[pkg])}"


def test_no_module_level_import_cycle():
    graph = {m: {d for d in imports(p, top_level_only=True) if d in SOURCES and d != m} for m, p in SOURCES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_shapes_world_leaf():
    """Generator and judge share one vocabulary module that imports nothing from ftkit; the judge does not
    import the generator (the old geneval <-> shapes cycle)."""
    assert imports(SOURCES["ftkit.data.world"], top_level_only=False) == set()
    assert "ftkit.data.shapes" not in imports(SOURCES["ftkit.data.geneval"], top_level_only=False)
