"""Formatting of the saved benchmark data: method labels, numbers, times, ratios, tables, and the
texts several sections share. Plain Python: no torch, no numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: The page's name of each method (keys: infscale's registry names, infscale.app.registry.METHODS).
LABEL = {
    "direct": "Direct",
    "cg": "CG",
    "lissa": "LiSSA",
    "arnoldi": "Arnoldi r64",
    "nystroem": "Nyström r64",
    "inverse-harmonic-mean": "Inv. harmonic mean",
    "ekfac": "EK-FAC",
    "floor": "floor (plain torch)",
}


@dataclass
class Rendered:
    """One section of the page: its Markdown lines, its lines for the summary and for 'what was
    reduced', and its (name, pyDVL / infscale time) pairs for the speed figure."""

    lines: list[str]
    summary: list[str] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)
    speed: list[tuple[str, float]] = field(default_factory=list)


def fmt(x, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no decimals from 100 up); '–' for None / NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def ok(r: dict | None) -> bool:
    """True for a run that finished without error."""
    return bool(r) and "error" not in r


def cell_time(r: dict | None) -> str:
    """A run's total time, or how it ended (not available, skipped, cut, failed)."""
    if not r:
        return "–"
    if r.get("unavailable"):
        return "not available"
    if r.get("skipped"):
        return "skipped (budget)"
    if r.get("timeout"):
        blocks = f"; {r['blocks']}" if r.get("blocks") else ""
        return f"> {r['total_s']:.0f} s (timeout{blocks})"
    if "error" in r:
        return "failed: " + r["error"].splitlines()[0][:70].replace("|", "/")
    return f"{r['total_s']:.2f} s"


def fit_note(r: dict | None) -> str:
    """' (fit F)' or, for a Dask run, ' (fit F, compute C)'; '' for a failed run."""
    if not ok(r):
        return ""
    compute = f", compute {r['compute_s']:.1f}" if r.get("compute_s") is not None else ""
    return f" (fit {r['fit_s']:.1f}{compute})"


def ratio_cell(r: dict | None) -> str:
    """A saved ratio {"value", "lower_bound"} as 'x.x×' or '> x.x×'; '–' when there is none."""
    if not r or r.get("value") is None:
        return "–"
    return f"{'> ' if r.get('lower_bound') else ''}{r['value']:.1f}×"


def pair(a, b, digits: int = 3) -> str:
    """'a / b' with ``fmt``."""
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def repeats_note(sizes: dict) -> str:
    return (
        f"runs under {sizes['short_run_s']:g} s are repeated and the best of {sizes['repeats']} is "
        "shown (each repeat refits, in the same fresh process), longer runs are measured once"
    )


def speed_pairs(prefix: str, rows: list[tuple[str, dict | None, dict | None, dict | None]]):
    """(name, pyDVL / infscale time) for the rows where both libraries finished: (label, a, b, ratio)."""
    return [
        (f"{prefix} {label}", r["value"])
        for label, a, b, r in rows
        if ok(a) and ok(b) and r and not r.get("lower_bound")
    ]


# What the two libraries compute differently at "equal settings" (read from pyDVL 0.10's source and
# checked numerically on the digits MLP).
PYDVL_SEMANTICS = (
    "Where the libraries differ at equal settings: pyDVL's `SecondOrderMode.GAUSS_NEWTON` is the "
    "empirical Fisher (the mean of per-sample gradient outer products), which infscale calls "
    "`SecondOrderMode.EMPIRICAL_FISHER` (infscale's `GAUSS_NEWTON` is the generalized Gauss-Newton "
    "matrix Jᵀ∇²_out ℓ J, which pyDVL 0.10 lacks), so wide-MLP rows run infscale's empirical Fisher "
    "against pyDVL's GAUSS_NEWTON, the same matrix (Pearson r 0.99999 between the two libraries' CG "
    "influences); pyDVL's LiSSA "
    "draws a fresh shuffled batch every iteration (dropping a short last batch), infscale cycles the fit "
    "loader and weights batches by size (hence its closer agreement with Direct); pyDVL's block CG tests "
    "the residual against a squared tolerance (rtol²), so it runs more iterations for the same rtol "
    "(11 vs 6 block products on digits) at the same accuracy; pyDVL's inverse harmonic mean equals "
    "infscale's divided by n_train (1437.000 on digits), so its relative error against Direct is about 1 "
    "whatever the ranking (Pearson r and top-k are unaffected)."
)
EKFAC_FISHER = (
    'EK-FAC\'s Fisher differs between the libraries: infscale uses `fisher="exact"`, G = E_x Σ_c p_c δ_c '
    "δ_cᵀ over every class c of the model's predictive distribution (δ_c: the output gradient of "
    "−log p_c; one backward pass per class), i.e. the Gauss-Newton matrix's Kronecker model, which "
    '`fisher="true"` (the default) estimates with one sampled label per point; pyDVL 0.10 has no '
    "choice: its G comes from the gradient of Σ_c √p_c log p_c (one backward pass per batch), which is "
    "neither the true nor the empirical Fisher exactly."
)
