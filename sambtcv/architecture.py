"""The package's import graph, read from the source (nothing is imported): which module imports which,
whether every import goes down `sambtcv.LAYERS` and none runs in a circle, and the picture of it that
docs/ARCHITECTURE.md shows (`python tools/architecture.py` redraws it; tests/test_architecture.py checks
both the rules and that the picture is current).

A module's layer is its sub-package (`sambtcv.engine.walks` -> "engine"); a module directly in `sambtcv/`
(`cli`, this one) is in layer "cli". Lazy imports inside functions count like any other.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from sambtcv import LAYERS

PACKAGE = "sambtcv"
ROOT_LAYER = "cli"  # the layer of a module that lies directly in the package folder


@dataclass
class Graph:
    """Modules ("sambtcv.engine.walks", ...) and the sambtcv modules each imports; pages (scripts at the
    repository's root and in tools/) and the sub-packages each imports."""

    imports: dict = field(default_factory=dict)  # module -> set of modules
    pages: dict = field(default_factory=dict)  # page name -> set of layers

    def layer(self, module: str) -> str:
        """The sub-package a module lies in (a sub-package's own __init__ too), else ROOT_LAYER."""
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ROOT_LAYER

    def upward(self) -> list[tuple[str, str]]:
        """(importer, imported) pairs whose imported module lies in a higher layer than the importer."""
        rank = {name: i for i, name in enumerate(LAYERS)}
        return sorted((m, d) for m, deps in self.imports.items() for d in deps
                      if rank[self.layer(d)] > rank[self.layer(m)])

    def unknown_layers(self) -> list[str]:
        """Modules in a folder that `sambtcv.LAYERS` does not list."""
        return sorted(m for m in self.imports if self.layer(m) not in LAYERS)

    def cycle(self) -> list[str]:
        """One circle of imports (its modules in order, the first repeated at the end), or []."""
        state, stack = {}, []

        def visit(m):
            state[m] = "open"
            stack.append(m)
            for d in sorted(self.imports.get(m, ())):
                if state.get(d) == "open":
                    return stack[stack.index(d):] + [d]
                if d not in state:
                    found = visit(d)
                    if found:
                        return found
            state[m] = "done"
            stack.pop()
            return []

        for m in sorted(self.imports):
            if m not in state:
                found = visit(m)
                if found:
                    return found
        return []

    def layer_edges(self) -> dict:
        """(from layer, to layer) -> number of module imports between two different layers."""
        edges = {}
        for m, deps in self.imports.items():
            for d in deps:
                a, b = self.layer(m), self.layer(d)
                if a != b:
                    edges[(a, b)] = edges.get((a, b), 0) + 1
        return edges


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, modules: set, here: str) -> set:
    """The package modules an AST imports (`from sambtcv.x import y`, where y may be a module itself)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name)
    return {m for m in found if m in modules and m != here and m != PACKAGE}


def read_graph(root: Path) -> Graph:
    """The graph of the package in `root`/sambtcv, and of the pages in `root` and `root`/tools."""
    package_dir = root / PACKAGE
    paths = sorted(package_dir.rglob("*.py"))
    modules = {_module_name(p, package_dir) for p in paths}
    graph = Graph()
    for p in paths:
        name = _module_name(p, package_dir)
        if name == PACKAGE:
            continue
        deps = _imported(ast.parse(p.read_text(), str(p)), modules, name)
        graph.imports[name] = {d for d in deps if not name.startswith(d + ".")}  # a module's own package: its docstring
    for p in sorted([*root.glob("*.py"), *(root / "tools").glob("*.py")]):
        deps = _imported(ast.parse(p.read_text(), str(p)), modules, "")
        graph.pages[str(p.relative_to(root))] = {graph.layer(d) for d in deps}
    return graph


def mermaid(graph: Graph) -> str:
    """The sub-packages (each with its modules), the pages above them, and the imports between sub-packages,
    as a Mermaid flowchart (GitHub and most Markdown viewers draw it)."""
    lines = ["flowchart BT"]
    for layer in LAYERS:
        mods = sorted(m.rsplit(".", 1)[-1] for m in graph.imports if graph.layer(m) == layer
                      and (layer == ROOT_LAYER or m != f"{PACKAGE}.{layer}"))  # not a sub-package's __init__
        label = f"sambtcv.{layer}" if layer != ROOT_LAYER else "sambtcv"
        detail = ", ".join(mods)
        lines.append(f'    {layer}["<b>{label}</b><br/>{_wrap(detail)}"]')
    pages = sorted(graph.pages)
    lines.append(f'    pages["<b>pages</b> (the scripts users run)<br/>{_wrap(", ".join(pages))}"]')
    for (a, b), n in sorted(graph.layer_edges().items(), key=lambda e: (LAYERS.index(e[0][0]), LAYERS.index(e[0][1]))):
        lines.append(f"    {a} -->|{n}| {b}")
    used = sorted({layer for layers in graph.pages.values() for layer in layers}, key=LAYERS.index)
    for layer in used:
        lines.append(f"    pages --> {layer}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 60) -> str:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        out.append(line)
    return "<br/>".join(out)


BEGIN = "<!-- drawn by tools/architecture.py from the code: do not edit by hand -->"
END = "<!-- end of the drawing -->"


def diagram_block(graph: Graph) -> str:
    """The Markdown block docs/ARCHITECTURE.md holds between BEGIN and END."""
    return f"{BEGIN}\n```mermaid\n{mermaid(graph)}```\n{END}\n"


def replace_block(text: str, block: str) -> str:
    """`text` with its BEGIN..END block replaced by `block` (ValueError when it has none)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no block between {BEGIN!r} and {END!r}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1].lstrip("\n")
    return head + block + tail
