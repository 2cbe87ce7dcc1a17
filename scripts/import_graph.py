"""Import circles and imports hidden inside functions in src/fluxserve, from the AST (every import statement).

    python scripts/import_graph.py        # prints each circle and each function-level import of ours

`lint-imports` (pyproject.toml) is the contract CI enforces; this is the count the architecture notes quote.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "fluxserve").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    hidden = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        # Module level, and inside module-level ifs (TYPE_CHECKING blocks): not hidden in a function.
        top = {id(node) for node in tree.body}
        top |= {id(inner) for node in tree.body if isinstance(node, ast.If) for inner in node.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from . import x` names the submodule x, not the package it is in
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] or [base]
            else:
                continue
            ours = {t for t in targets if t in mods and t != name}
            edges[name] |= ours
            if ours and id(node) not in top:
                hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} -> {', '.join(sorted(ours))}")
    return edges, hidden


def circles(edges: dict[str, set[str]], names: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in names:
        if name not in index:
            visit(name)
    return found


def main() -> int:
    mods = modules()
    edges, hidden = graph(mods)
    found = circles(edges, list(mods))
    print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} imports between them")
    print(f"{len(found)} circles")
    for c in found:
        print("  " + " <-> ".join(c))
    print(f"{len(hidden)} imports of fluxserve modules inside functions")
    for line in hidden:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
