"""The data layer's modules import one another without a circle (deferred imports inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import aeflow.data

PACKAGE = Path(aeflow.data.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every aeflow.data.* module a file imports, wherever the import statement is (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("aeflow.data.") and (PACKAGE / f"{n.split('.')[2]}.py").exists())
    return {".".join(n.split(".")[:3]) for n in found}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_sees_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_data_layer():
    graph = {f"aeflow.data.{p.stem}": imports_of(p) - {f"aeflow.data.{p.stem}"}
             for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert "aeflow.data.sources" in graph["aeflow.data.readers"]  # the graph is read at all
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_public_names_stay_importable_and_synthetic_loads_first():
    from aeflow.data import RawImage, make_phantom, read_raw
    from aeflow.data.readers import SYNTHETIC_PREFIX, join_source, split_source
    from aeflow.data.synthetic import phantom_source

    source = phantom_source(0, 3, 32, 0.5, "good")
    assert source.startswith(SYNTHETIC_PREFIX)
    assert split_source(join_source("a.nii", slice=2)) == ("a.nii", {"slice": "2"})
    raw = read_raw(source)
    assert isinstance(raw, RawImage) and (raw.array == make_phantom(0, 3, size=32)[0]).all()
    # importing the generator alone, first in a fresh interpreter, works (it needs nothing from the readers)
    code = ("import aeflow.data.synthetic as s, sys; s.read_synthetic(s.phantom_source(0, 1, 16, 0.5, 'good')); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
