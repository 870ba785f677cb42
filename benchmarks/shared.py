"""What the sections share, explicitly: the context a section runs in (sizes, the runner, where
figures go, the trained wide MLP) and the helpers that turn measurements into plain data.

A section never reads another section's attributes. What one section leaves for another (the digits
influence matrices, too large to save, for LDS and mislabel detection) goes through
``Context.publish`` / ``Context.needs``, and ``config.REQUIRES`` tells the driver the order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import evaluation as E
import numpy as np
import torch
import workloads as W
from runner import Runner, log

#: What a child's result keeps in the saved data (its influence values and tracebacks stay out).
TIMING_KEYS = (
    "total_s",
    "fit_s",
    "query_s",
    "fit_cpu_s",
    "query_cpu_s",
    "total_cpu_s",
    "compute_s",
    "peak_rss_mib",
    "base_rss_mib",
    "children_peak_rss_mib",
    "runs",
    "process_s",
    "error",
    "timeout",
    "skipped",
    "unavailable",
    "blocks",
    "rss_cumulative",
    "shape",
    "dropped_settings",
    "warnings",
)

#: pyDVL 0.10's influences have infscale's sign (the digits section checks it on Direct every run and
#: records "pydvl_sign"); the other sections compare pyDVL's values multiplied by this.
PYDVL_SIGN = 1.0


class MissingInput(RuntimeError):
    """A section needs what another section of the same run measured, and that section did not run."""


@dataclass
class Context:
    """Everything a section may use: ``sizes`` (config.SIZES[mode]), the ``runner`` (its ``deadline``
    is the section's), the folder for figures, and what earlier sections published."""

    mode: str
    sizes: dict
    runner: Runner
    figures: Path
    published: dict = field(default_factory=dict)
    _wide: tuple | None = None

    @property
    def deadline(self) -> float:
        return self.runner.deadline

    def publish(self, section: str, **things) -> None:
        """Leave in-memory results (arrays) for the sections that require ``section``."""
        self.published[section] = things

    def needs(self, section: str) -> dict:
        """What ``section`` published in this run; raises MissingInput when it did not run."""
        if section not in self.published:
            raise MissingInput(f"needs the {section!r} section in the same run (it did not run or failed)")
        return self.published[section]

    def wide_model(self) -> tuple:
        """(model, x_pool, y_pool, x_test_pool, y_test_pool, train_s): the wide MLP, trained once per
        run and shared by the wide, calculators and out-of-core sections."""
        if self._wide is None:
            S = self.sizes
            log(f"wide MLP: training {S['wide_epochs']} epochs")
            x_pool, y_pool, x_te_pool, y_te_pool = W.wide_pool(
                max(S["ooc_n_train"], 10_000), max(S["ooc_n_test"], S["calc_n_test"])
            )
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(128, 256),
                torch.nn.Tanh(),
                torch.nn.Linear(256, 256),
                torch.nn.Tanh(),
                torch.nn.Linear(256, 10),
            )
            t0 = time.perf_counter()
            W.train(
                model,
                x_pool[:10_000],
                y_pool[:10_000],
                epochs=S["wide_epochs"],
                lr=1e-3,
                batch_size=128,
                seed=0,
            )
            self._wide = (model, x_pool, y_pool, x_te_pool, y_te_pool, time.perf_counter() - t0)
        return self._wide


def timing(result: dict | None) -> dict | None:
    """A child's result as plain data: times, memory, and how it ended (no values)."""
    if result is None:
        return None
    out = {k: result[k] for k in TIMING_KEYS if k in result and result[k] not in (None, "", [])}
    if "error" in out:
        out["error"] = str(out["error"])[:500]
    return out


def ok(r: dict | None) -> bool:
    """True for a run that finished without error."""
    return bool(r) and "error" not in r


def ratio(a: dict | None, b: dict | None, key: str = "total_s") -> dict | None:
    """a / b as {"value", "lower_bound"} (a lower bound when a timed out); None when not comparable."""
    if not b or "error" in b or not a or key not in b:
        return None
    if a.get("timeout"):
        return {"value": a["total_s"] / b[key], "lower_bound": True}
    if "error" in a or key not in a:
        return None
    return {"value": a[key] / b[key], "lower_bound": False}


def agreement(values, reference) -> dict:
    """Pearson r, relative error and mean top-10 overlap of ``values`` against ``reference``
    ({} when either is missing or the shapes differ; None entries for non-finite values)."""
    if values is None or reference is None or np.shape(values) != np.shape(reference):
        return {}
    if not np.all(np.isfinite(values)):
        return {"pearson": None, "rel": None, "top10": None}
    return {
        "pearson": E.pearson(values, reference),
        "rel": E.relative_error(values, reference),
        "top10": E.topk_overlap(values, reference, 10),
    }


def plain(value):
    """``value`` with numpy scalars turned into Python numbers and non-finite floats into None, so that
    it is strict JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
