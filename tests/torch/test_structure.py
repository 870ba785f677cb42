"""The torch core's shape: small modules, no import cycles (function-level imports included), and the
old import paths still giving the same objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import infscale.torch

PACKAGE = Path(infscale.torch.__file__).parent
MAX_LINES = 550


def modules() -> dict[str, Path]:
    return {
        ("infscale.torch" if p.stem == "__init__" else f"infscale.torch.{p.stem}"): p
        for p in sorted(PACKAGE.glob("*.py"))
    }


def imports(name: str, path: Path) -> set[str]:
    """The infscale.torch modules that ``path`` imports anywhere in it; ``from . import x`` counts as
    importing the package itself as well (it runs the package's __init__)."""
    package = "infscale.torch"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = f"{package}.{node.module}" if node.module else package
            elif node.level == 0:
                base = node.module or ""
            else:
                continue  # infscale.* outside the torch package
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    known = modules()
    return {m for m in found if m in known and m != name}


def test_every_module_is_at_most_550_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_no_import_cycles():
    graph = {n: imports(n, p) for n, p in modules().items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_old_import_paths_give_the_new_objects():
    from infscale.torch import curvature, data, gradients, layout, linalg, memory, perturbation
    from infscale.torch import functional as old

    assert old.ParameterLayout is layout.ParameterLayout
    assert old.BlockMode is layout.BlockMode and old.SecondOrderMode is layout.SecondOrderMode
    assert old.CurvatureOperator is curvature.CurvatureOperator
    assert old.split_batch is data.split_batch and old.loader_batches is data.loader_batches
    assert old.per_sample_gradients is gradients.per_sample_gradients
    assert old.gradient_engine is gradients.gradient_engine
    assert old.perturbation_influences is perturbation.perturbation_influences
    assert old.self_perturbation_influences is perturbation.self_perturbation_influences
    assert old.block_regularization is layout.block_regularization
    assert old.default_chunk_size is memory.default_chunk_size
    assert old.stack_rows is linalg.stack_rows
    assert old.MERGE_ROWS == memory.MERGE_ROWS and old.DEFAULT_GRADIENT_MEMORY == memory.GRADIENT_BYTES
    for name in old.__all__:
        assert hasattr(old, name), name
    for name in infscale.torch.__all__:
        assert hasattr(infscale.torch, name), name
