"""The layering of src/minpro_cli (docs/architecture.md): imports point down, no stage imports
another stage, no cycle. The rule lives in scripts/import_graph.py; CI runs it here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
assert spec is not None and spec.loader is not None
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_every_module_has_a_layer_and_every_import_points_down():
    edges = import_graph.graph()
    assert {"train", "sampling", "step", "heldout", "cli"} <= set(edges)  # the scan sees the package
    assert "sampling" in edges["train"] and "step" in edges["probe"]  # lazy and module-level imports alike
    assert import_graph.violations(edges) == []


def test_the_check_names_what_breaks_the_rule():
    edges = {m: set(deps) for m, deps in import_graph.graph().items()}
    edges["train"].add("eval")  # a stage importing a stage
    edges["errors"].add("config")  # the bottom importing the recipe
    edges["config"].add("rundir")
    edges["rundir"].add("config")  # a cycle (and an upward import)
    found = import_graph.violations(edges)
    assert "train imports eval: a stage imports another stage" in found
    assert "errors (basics) imports config (recipe), a higher layer" in found
    assert any(f.startswith("import cycle:") and "config" in f and "rundir" in f for f in found)
    edges["brand_new"] = set()
    assert import_graph.violations(edges) == ["brand_new: in no layer (add it to LAYERS)"]


def test_relative_and_function_level_imports_are_seen(tmp_path, monkeypatch):
    package = tmp_path / "minpro_cli"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from minpro_cli.b import x\n    return x\n")
    (package / "sub" / "__init__.py").write_text("from .c import y\nfrom .. import d\n")
    monkeypatch.setattr(import_graph, "PACKAGE", package)
    assert import_graph.imports_of(package / "a.py") == {"b"}
    assert import_graph.imports_of(package / "sub" / "__init__.py") == {"sub.c", "d"}


def test_docs_show_the_current_graph():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert import_graph.mermaid(import_graph.graph()) in doc, "regenerate: python scripts/import_graph.py"
