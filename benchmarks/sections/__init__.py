"""The benchmark sections: one module each, with ``measure(ctx) -> dict`` returning plain data (numbers
and strings) that the driver saves as JSON and benchmarks/render.py turns into the page."""

from __future__ import annotations

import importlib
from types import ModuleType

#: Section name (config.SECTIONS, the JSON file's name) → module in this package.
MODULES = {
    "digits": "digits",
    "loo": "loo",
    "lds": "lds",
    "mislabel": "mislabel",
    "seed_example": "seed",
    "wide": "wide",
    "calculators": "calculators",
    "out_of_core": "out_of_core",
    "cnn": "cnn",
    "kronfluence": "kronfluence",
    "lds_bert": "lds_bert",
}


def load(name: str) -> ModuleType:
    """The module of section ``name`` (imported on demand: most import torch)."""
    return importlib.import_module(f"sections.{MODULES[name]}")
