"""Redraw the picture of the package in docs/ARCHITECTURE.md from the code (its import graph):

    python tools/architecture.py            # rewrites the Mermaid block between the markers; prints it
    python tools/architecture.py --check    # exit 1 when the picture is out of date (the tests check it too)

The rules (imports go down `sambtcv.LAYERS`, none in a circle) are checked first: a violation is printed, exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sambtcv.architecture import diagram_block, read_graph, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether the picture is current")
    args = ap.parse_args(argv)
    graph = read_graph(ROOT)
    broken = [f"{a} imports {b} (upward)" for a, b in graph.upward()]
    broken += [f"{m}: a folder sambtcv.LAYERS does not list" for m in graph.unknown_layers()]
    if graph.cycle():
        broken.append("a circle: " + " -> ".join(graph.cycle()))
    if broken:
        print("\n".join(broken))
        return 1
    text = DOC.read_text()
    new = replace_block(text, diagram_block(graph))
    if args.check:
        print("docs/ARCHITECTURE.md is current" if new == text else "docs/ARCHITECTURE.md is out of date: "
              "python tools/architecture.py")
        return 0 if new == text else 1
    DOC.write_text(new)
    print(diagram_block(graph), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
