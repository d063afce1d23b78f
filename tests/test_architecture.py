"""The package's shape: every import goes down the sub-packages' declared order (`sambtcv.LAYERS`), none runs in
a circle, every sub-package says what it owns and may import, and docs/ARCHITECTURE.md's picture is the one the
code draws today (`python tools/architecture.py` redraws it)."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest

import sambtcv
from sambtcv.architecture import diagram_block, read_graph, replace_block

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return read_graph(ROOT)


def test_imports_only_go_down_and_never_in_a_circle(graph):
    assert graph.imports, "no modules found"
    assert graph.unknown_layers() == []
    assert graph.upward() == []
    assert graph.cycle() == []


def test_the_check_finds_an_upward_import_and_a_circle(tmp_path):
    """The same reading on a small package with one import up (core -> engine) and a circle (engine a <-> b)."""
    pkg = tmp_path / "sambtcv"
    for folder in ("core", "engine"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text('"""x"""\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "errors.py").write_text("")
    (pkg / "core" / "low.py").write_text("def f():\n    from sambtcv.engine import a\n")  # lazy, still counted
    (pkg / "engine" / "a.py").write_text("from sambtcv.engine.b import g\nfrom sambtcv.core import errors\n")
    (pkg / "engine" / "b.py").write_text("from sambtcv.engine import a\n")
    g = read_graph(tmp_path)
    assert g.upward() == [("sambtcv.core.low", "sambtcv.engine.a")]
    assert g.cycle() == ["sambtcv.engine.a", "sambtcv.engine.b", "sambtcv.engine.a"]
    (pkg / "tools").mkdir()
    (pkg / "tools" / "x.py").write_text("")
    assert read_graph(tmp_path).unknown_layers() == ["sambtcv.tools.x"]


def test_every_sub_package_says_what_it_owns_and_may_import():
    for layer in sambtcv.LAYERS:
        init = ROOT / "sambtcv" / layer / "__init__.py"
        if layer == "cli":
            assert (ROOT / "sambtcv" / "cli.py").is_file()
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "Imports:" in doc, f"sambtcv/{layer}/__init__.py needs a docstring with 'Imports:'"
    folders = sorted(p.name for p in (ROOT / "sambtcv").iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(set(sambtcv.LAYERS) - {"cli"})


def test_the_architecture_picture_is_drawn_from_todays_code(graph):
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert replace_block(doc, diagram_block(graph)) == doc, "stale: python tools/architecture.py redraws it"


def test_the_picture_changes_when_an_import_does(graph):
    """A new import between two sub-packages shows in the picture (so the doc check above can fail)."""
    changed = copy.deepcopy(graph)
    changed.imports["sambtcv.servers.nnia"] = changed.imports["sambtcv.servers.nnia"] | {"sambtcv.study.records"}
    assert diagram_block(changed) != diagram_block(graph)
