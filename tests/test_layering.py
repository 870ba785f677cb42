"""The package's shape: five boxes, each importing only the ones before it.

    contract  →  chunked computation  →  torch core  →  methods  →  application

Read from the source with ``ast`` (function-level imports included), so a cycle hidden in a
function body, ``demo`` reaching into ``cli``, torch in a framework-free module or a module
grown past 550 lines fails here, not in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "infscale"
MAX_LINES = 550

#: box index of every module (package facades ``__init__`` are listed too).
BOXES: dict[int, tuple[str, ...]] = {
    0: ("infscale._version", "infscale.base", "infscale.errors"),
    1: (
        "infscale.aggregators",
        "infscale.sequences",
        "infscale.store",
        "infscale.store.",  # the store package: opening, markers, writer, groups
        "infscale.grid_sides",
        "infscale.calculator",
        "infscale.parallel",
        "infscale.dask_writer",
        "infscale.dask_threads",
        "infscale.dask_tasks",
        "infscale.array",
    ),
    2: (
        "infscale.torch.layout",
        "infscale.torch.data",
        "infscale.torch.memory",
        "infscale.torch.gradients",
        "infscale.torch.curvature",
        "infscale.torch.perturbation",
        "infscale.torch.linalg",
        "infscale.torch.capture",
        "infscale.torch.factored",
        "infscale.torch.factored_ops",
        "infscale.torch.batched",
        "infscale.torch.layer_kinds",
        "infscale.torch.kernels",
        "infscale.torch.settings",
        "infscale.torch.functional",
        "infscale.torch.util",
        "infscale.torch.dask_data",
        "infscale.torch.validation",
        "infscale.torch.base",
    ),
    3: ("infscale.torch.",),  # every other module of infscale.torch: one file per method
    4: ("infscale.app.", "infscale.cli", "infscale.demo"),
}
FACADES = ("infscale", "infscale.torch", "infscale.app")
ZARR_MODULES = ("infscale.store",)  # the package and its modules


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth of its body."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from . import x`` / ``from .pkg import mod``: the names may be modules
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _box(name: str) -> int | None:
    for index in sorted(BOXES):
        for entry in BOXES[index]:
            if entry.endswith("."):
                if name.startswith(entry) and not any(name in BOXES[i] for i in BOXES if i < index):
                    return index
            elif name == entry:
                return index
    return None


MODULES = _modules()
FRAMEWORK_FREE = tuple(n for n in sorted(MODULES) if _box(n) in (0, 1) or n == "infscale.store")
GRAPH = {
    name: {imp for imp in _imports(name, path) if imp in MODULES and imp != name}
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_550_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (limit {MAX_LINES})."


def test_every_module_has_a_box():
    missing = [n for n in MODULES if n not in FACADES and _box(n) is None]
    assert not missing, f"modules in no box of tests/test_layering.py: {missing}"


def test_each_box_imports_only_earlier_boxes():
    wrong = []
    for name, targets in GRAPH.items():
        if name in FACADES:
            continue
        for target in targets:
            if target in FACADES:
                if target == "infscale" and _box(name) == 4:
                    continue  # the application may read the package's version
                wrong.append(f"{name} imports the facade {target}")
            elif _box(target) > _box(name):
                wrong.append(f"{name} (box {_box(name)}) imports {target} (box {_box(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_demo_does_not_import_cli():
    assert "infscale.cli" not in GRAPH["infscale.demo"]


@pytest.mark.parametrize("name", FRAMEWORK_FREE)
def test_framework_free_modules_do_not_import_torch(name):
    imported = _imports(name, MODULES[name])
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], name


def test_only_the_store_module_imports_zarr():
    users = sorted(
        n for n, p in MODULES.items() if any(m.split(".")[0] == "zarr" for m in _imports(n, p))
    )
    outside = [u for u in users if not u.startswith(ZARR_MODULES)]
    assert not outside, f"zarr imported outside infscale.store: {outside}"


def test_function_level_imports_are_seen(tmp_path):
    """The import reader itself can fail: an import inside a function body counts."""
    planted = tmp_path / "a.py"
    planted.write_text("def f():\n    from .b import g\n    import torch.nn\n")
    assert {"pkg.b", "torch.nn"} <= _imports("pkg.a", planted)
