"""The import graph of `src/llava_ultra` against the layer order written in ARCHITECTURE.md.

Every `import` and `from ... import` is read statically with `ast`, including imports inside
functions (lazy imports) and under `TYPE_CHECKING`: a lazy import is still a dependency. Two rules:

- an import may point down the layer order or stay inside its own package, never up and never
  sideways between sibling layers (same number);
- no cycles between modules, not even inside one package.

The layer table is parsed from the ```layers block of ARCHITECTURE.md, so the document and the
code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "llava_ultra"


def read_layers() -> list[tuple[int, str, list[str]]]:
    """(level, name, module prefixes) per line of the ```layers block."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(\w+):\s*(.+)", line)
        if m:
            prefixes = [p.strip() for p in m.group(3).split(",") if p.strip()]
            layers.append((int(m.group(1)), m.group(2), prefixes))
    assert layers, "the ```layers block of ARCHITECTURE.md lists no layer"
    return layers


def module_names() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports, resolved to module names (not symbols)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                symbol = f"{module}.{alias.name}"
                targets.append(symbol if symbol in mods else module)
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    found.add(target)
    return found


def layer_of(module: str, layers: list[tuple[int, str, list[str]]]) -> tuple[int, str]:
    best: tuple[int, str, int] | None = None
    for level, lname, prefixes in layers:
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[2]):
                best = (level, lname, len(prefix))
    assert best, f"{module} is in no layer of ARCHITECTURE.md: add it to the ```layers block"
    return best[0], best[1]


def graph() -> dict[str, set[str]]:
    mods = module_names()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer_violations() -> list[str]:
    layers = read_layers()
    bad = []
    for source, targets in graph().items():
        s_level, s_layer = layer_of(source, layers)
        for target in sorted(targets):
            t_level, t_layer = layer_of(target, layers)
            if t_layer == s_layer:
                continue
            if t_level >= s_level:
                bad.append(f"{source} ({s_layer}) -> {target} ({t_layer})")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    layers = read_layers()
    for name in module_names():
        layer_of(name, layers)


def test_imports_only_point_down():
    bad = layer_violations()
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = [" <-> ".join(c) for c in cycles()]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself must not be blind: a lazy relative import inside a function counts.
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import y\n    return y\n")
    (pkg / "b.py").write_text("import llava_ultra.a.x\ny = 1\n")
    mods = {
        "llava_ultra": pkg / "__init__.py",
        "llava_ultra.a": pkg / "a" / "__init__.py",
        "llava_ultra.a.x": pkg / "a" / "x.py",
        "llava_ultra.b": pkg / "b.py",
    }
    assert imports_of("llava_ultra.a.x", mods["llava_ultra.a.x"], mods) == {"llava_ultra.b"}
    assert imports_of("llava_ultra.b", mods["llava_ultra.b"], mods) == {"llava_ultra.a.x"}
