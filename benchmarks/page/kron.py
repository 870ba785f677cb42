"""The page's sections on the EK-FAC reference (kronfluence) and the LDS on the tiny BERT. Each
``render_*(results, run)`` takes a section's saved "results" and its "run" and returns a ``Rendered``."""

from __future__ import annotations

from page.format import Rendered, fmt, ok, table

WORKLOAD_TITLE = {"bert": "Tiny BERT", "cnn": "Digits CNN", "mlp": "Digits MLP"}
METHOD = {
    "ekfac": "EK-FAC",
    "kfac": "K-FAC",
    "cg": "CG, Gauss-Newton",
    "arnoldi": "Arnoldi r64, Gauss-Newton",
    "nystroem": "Nyström r64, Gauss-Newton",
    "gradient_dot": "gradient dot product (no curvature)",
}
FISHER = {"exact": "exact", "true": "true (sampled labels)", "empirical": "empirical"}
TRACKED = {"all": "all", "linear": "Linear only"}


def _load(values) -> str:
    return "–" if not values else f"{values[0]:.1f} / {values[1]:.1f} / {values[2]:.1f}"


def _s(r: dict | None, key: str) -> str:
    return f"{r[key]:.2f}" if ok(r) and r.get(key) is not None else "–"


def _error(r: dict | None) -> str:
    return (r or {}).get("error", "").splitlines()[0] if r and r.get("error") else ""


def _method(row: dict) -> str:
    key = row.get("key", "")
    if key.endswith("_tl"):
        return "K-FAC in kronfluence's convention (T·λ, × T per layer)"
    return METHOD[row["method"]]


def _versus(acc: dict) -> str:
    r, t = acc["pearson"], acc["top10"]
    return (
        f"Pearson r {fmt(r['infscale'])} vs {fmt(r['kronfluence'])}, top-10 {fmt(t['infscale'], 2)} vs "
        f"{fmt(t['kronfluence'], 2)}"
    )


def _range(values: list | None, digits: int = 3) -> str:
    return "–" if not values else f"{fmt(values[0], digits)}–{fmt(values[1], digits)}"


def _minmax(values: list | None) -> list | None:
    return [min(values), max(values)] if values else None


def _short_goal(name: str, g: dict) -> str:
    """One line for the page's summary."""
    title = {"bert": "the tiny BERT", "cnn": "the digits CNN", "mlp": "the digits MLP"}[name]
    if g.get("met") is None:
        return f"{title}: not decided ({g.get('why')})"
    r, t = g["accuracy"]["pearson"], g["accuracy"]["top10"]
    return (
        f"{title}: goal {'met' if g['met'] else 'not met'}: infscale EK-FAC r {fmt(r['infscale'])} "
        f"(kronfluence {fmt(r['kronfluence'])}), top-10 {fmt(t['infscale'], 2)} "
        f"({fmt(t['kronfluence'], 2)}), "
        f"{fmt(g['speed']['total_s'])}× faster (CPU time {fmt(g['speed']['total_cpu_s'])}×)"
        + ("" if g["reference"] == "all" else "; Linear layers only")
    )


def _goal_text(name: str, g: dict | None, draws: int) -> str:
    title = WORKLOAD_TITLE[name]
    if not g or g.get("met") is None:
        return f"{title}: not decided ({(g or {}).get('why', 'no data')})."
    layers = "the whole model" if g["reference"] == "all" else "the Linear layers only (kronfluence's set)"
    reasons = [
        why
        for ok_, why in ((g["as_accurate"], "less accurate"), (g["twice_as_fast"], "less than 2× faster"))
        if not ok_
    ]
    because = f" ({' and '.join(reasons)})" if reasons else ""
    true, seeds = g["true_fisher"], g["true_fisher"]["seed_range"]
    spread = "; ".join(
        f"{lib}: r {_range(v.get('pearson'))}, top-10 {_range(v.get('top10'), 2)}" for lib, v in seeds.items()
    )
    return (
        f'{title}: **{"met" if g["met"] else "not met"}**{because}. infscale EK-FAC (`fisher="exact"`) vs '
        "kronfluence EK-FAC (its default, the true Fisher), both on and against CG Gauss-Newton on "
        f"{layers}: "
        f"{_versus(g['accuracy'])}; kronfluence / infscale time {fmt(g['speed']['total_s'])}× (wall "
        f"clock), {fmt(g['speed']['total_cpu_s'])}× (CPU). Like for like (infscale with the true Fisher "
        f"too): {_versus(true['accuracy'])}, time {fmt(true['speed']['total_s'])}× / "
        f"{fmt(true['speed']['total_cpu_s'])}×; over {draws} draws of the sampled labels: {spread}."
    )


def _workload(w: dict) -> list[str]:
    bert = w["name"] == "bert"
    refs = ["all", "linear"] if bert else ["all"]
    header = ["library", "method", "Fisher", "λ", "layers", "fit (s)", "query (s)", "total (s)", "CPU (s)"]
    for ref in refs:
        suffix = "" if ref == "all" else " (Linear only)"
        header += [f"r vs CG{suffix}", f"top-10 vs CG{suffix}"]
    rows, failures = [], {}
    for ref in w["references"]:
        r = ref["run"]
        cells = [
            "infscale",
            "**CG, Gauss-Newton (reference)**",
            "–",
            fmt(w["lambda"]),
            TRACKED[ref["tracked"]],
        ]
        cells += [_s(r, "fit_s"), _s(r, "query_s"), _s(r, "total_s"), _s(r, "total_cpu_s")]
        cells += ["1 (itself)" if x == ref["tracked"] else "–" for x in refs for _ in (0, 1)]
        rows.append(cells)
    for row in w["rows"]:
        r = row["run"]
        lam = fmt(row["damping"]) if isinstance(row["damping"], (int, float)) else row["damping"]
        tracked = TRACKED[row["tracked"]] + (" (logits wrapper)" if row.get("logits_wrapper") else "")
        cells = [row["lib"], _method(row), FISHER[row["fisher"]], lam, tracked]
        if ok(r):
            cells += [_s(r, "fit_s"), _s(r, "query_s"), _s(r, "total_s"), _s(r, "total_cpu_s")]
            for ref in refs:
                a = row["vs"].get(ref, {})
                cells += [fmt(a.get("pearson")), fmt(a.get("top10"), 2)]
        else:
            error = _error(r) or "no result"
            mark = failures.setdefault(error, f"[{len(failures) + 1}]")
            cells += [f"failed {mark}"] + ["–"] * (3 + 2 * len(refs))
        rows.append(cells)
    T = sorted({round(t, 2) for t in w["positions"].values()})
    lines = [
        f"### {WORKLOAD_TITLE[w['name']]}",
        "",
        f"{w['n_train']:,} train × {w['n_test']} test, {w['n_params']:,} parameters "
        f"({w['n_params_linear']:,} in Linear / Conv2d layers), test accuracy {w['test_accuracy']:.1%}; "
        f"{w['training']}. λ = {fmt(w['lambda'])}; fit batch {w['batch_size']}; positions per example T "
        f"per layer: {', '.join(fmt(t) for t in T)}.",
        "",
        table(header, rows),
        "",
    ]
    for error, mark in failures.items():
        lines += [f"{mark} `{error[:400]}`", ""]
    if w.get("cross_checks"):
        parts = []
        for c in w["cross_checks"]:
            method, fisher = c["kronfluence"].split("_")
            parts.append(f"{METHOD[method]} {fisher} r {c['pearson']:.6f}, top-10 {fmt(c['top10'], 2)}")
        lines += [
            "The same computation in both libraries (infscale's row against kronfluence's, on the same "
            f"layers): {'; '.join(parts)} (true Fisher: different sampled labels).",
            "",
        ]
    spreads = [
        f"{sp['lib']} ({TRACKED[sp['tracked']]}): r {_range(_minmax(v.get('pearson')))}, top-10 "
        f"{_range(_minmax(v.get('top10')), 2)}"
        for sp in w.get("seed_spread", [])
        for ref, v in sp["vs"].items()
        if ref == sp["tracked"]
    ]
    if spreads:
        seeds = w.get("seed_spread")[0]["seeds"]
        lines += [
            f"EK-FAC with the true Fisher over {len(seeds)} draws of the sampled labels (seeds "
            f"{', '.join(map(str, seeds))}), against CG on the same layers: {'; '.join(spreads)}.",
            "",
        ]
    agree = w.get("linear_vs_all_reference")
    if agree:
        lines += [
            "Leaving out the embeddings and LayerNorms changes the exact influences themselves: CG on the "
            f"Linear layers against CG on the whole model, Pearson r {fmt(agree['pearson'])}, top-10 "
            f"{fmt(agree['top10'], 2)}. So on this BERT no method restricted to the Linear layers "
            "(kronfluence cannot track the others) can agree with the whole model's influences.",
            "",
        ]
    return lines


def render_kronfluence(res: dict, run: dict) -> Rendered:
    draws = len(res.get("seeds", [0]))
    goal_lines = [
        _goal_text(w["name"], w["goal"], draws) for w in res["workloads"] if w.get("goal") is not None
    ]
    bert = next((w for w in res["workloads"] if w["name"] == "bert"), None)
    lines = [
        f"## EK-FAC reference: infscale and kronfluence {res['kronfluence']}",
        "",
        f'Goal (issue 16, item 7): "{res["goal_line"]}".',
        "",
        *[f"- {g}" for g in goal_lines],
        "",
        "infscale's `EkfacInfluence` (K-FAC: `update_diagonal=False`) and kronfluence "
        f"{res['kronfluence']}'s `fit_all_factors` + `compute_pairwise_scores` (strategy `ekfac` / "
        "`kfac`; its own venv "
        f"`{res['kronfluence_python']}`, never importing infscale) on the same saved model and data, each "
        f"library in fresh processes (`benchmarks/kron_child.py`), {res['threads']} torch thread; time = "
        "fit (kronfluence: `prepare_model`, `Analyzer`, `fit_all_factors`, factors written to disk as it "
        "always does) + query (the whole test × train matrix), wall clock and this process's CPU time, "
        f"best of {run['sizes']['repeats']} runs (each refits) for runs under "
        f"{run['sizes']['short_run_s']:g} s. Load average (1 / 5 / 15 min) at the start "
        f"{_load(res['load_start'])}, at the end {_load(res['load_end'])} on {run['machine']['cores']} "
        "cores: wall-clock times are noisy, the CPU times and the ratios less so.",
        "",
        'Reference: infscale `CgInfluence(second_order_mode="gauss_newton")` in float64 at the same λ '
        "(rtol 1e-10): the exact generalized Gauss-Newton inverse that K-FAC and EK-FAC approximate "
        "(their Fishers equal it in expectation). Pearson r over the whole matrix; top-10: mean over test "
        "points of the overlap of the 10 most helpful training points. Equal damping: kronfluence's "
        "`damping_factor` is absolute on the Fisher of the mean loss, as infscale's "
        "`hessian_regularization`, so EK-FAC runs at λ in both; kronfluence's K-FAC averages both "
        "Kronecker factors over the T positions a layer sees per example (Conv2d output locations, "
        "unmasked tokens), so its block is F/T and its layer-l influences equal T_l × infscale's K-FAC at "
        "T_l·λ: infscale's K-FAC runs at λ (the Fisher at λ, as the reference), and once in kronfluence's "
        "convention as a cross-check. Fishers: `exact` (infscale only: the expectation over the model's "
        "predictive distribution), `true` (one sampled label per point; both libraries' default), "
        "`empirical` (the given labels; deterministic, so both libraries must agree exactly).",
        "",
    ]
    if bert:
        lines += [
            "Tiny BERT: kronfluence tracks only the Linear layers (embeddings and LayerNorms held fixed), "
            "so the BERT rows are measured twice for infscale: on the whole model as a user would call it "
            "(dict batches, the HF model's own output) and on kronfluence's layers (the other parameters "
            "frozen, the model wrapped to return its logits tensor, as kronfluence's task does), against "
            "CG on the whole model and CG on the Linear layers only.",
            "",
        ]
    for w in res["workloads"]:
        lines += _workload(w)
    summary = [
        f"EK-FAC reference (kronfluence {res['kronfluence']}), {_short_goal(w['name'], w['goal'])}"
        for w in res["workloads"]
        if w.get("goal") is not None
    ]
    reduced = []
    if bert and any(
        r["lib"] == "infscale" and r["tracked"] == "all" and not ok(r["run"]) for r in bert["rows"]
    ):
        reduced.append(
            "EK-FAC reference: infscale's EK-FAC failed on the whole tiny BERT (see its table); the BERT "
            "verdict uses infscale's EK-FAC on kronfluence's layers (Linear only, logits wrapper)"
        )
    return Rendered(lines, summary=summary, reduced=reduced)


def render_lds_bert(res: dict, run: dict) -> Rendered:
    truth = res["truth"]
    rows = []
    for row in res["rows"]:
        label = METHOD.get(row["key"].split("_")[0] if row["key"] != "gradient_dot" else row["key"])
        if row["key"].startswith(("ekfac", "kfac")):
            label += f", {FISHER[row['key'].split('_')[1]]}"
        if row["key"] == "cg":
            label += " (reference)"
        r = row.get("run")
        time_cell = _s(r, "total_s") if r else "(in the kronfluence section)" if row["key"] == "cg" else "–"
        if "error" in row:
            rows.append(
                [label, row["lib"], TRACKED[row["tracked"]], f"failed: {row['error'][:80]}", "–", "–", "–"]
            )
            continue
        runs = row["per_run"]
        rows.append(
            [
                label,
                row["lib"],
                TRACKED[row["tracked"]],
                f"{row['lds']:.3f}",
                fmt(row["stderr"], 2),
                f"{min(runs):.3f} – {max(runs):.3f}",
                time_cell,
            ]
        )
    m, k = res["n_models"], res["runs_per_model"]
    header = ["method", "library", "layers", "LDS", "± s.e.", "LDS per single run (min – max)", "time (s)"]
    agreement = truth["run_agreement"]
    lines = [
        "## Linear datamodeling score on the tiny BERT",
        "",
        f"The tiny BERT ({res['n_train']} train × {res['n_test']} test) retrained from its initialization "
        f"on {m} random halves of the training set, {k} times each with different minibatch orders "
        f"({truth['retraining']}); ground truth: {truth['source']}"
        + (f", {truth['retrain_s']:.0f} s" if truth.get("retrain_s") else "")
        + ". LDS = mean over test points of Spearman's correlation, across the subsets, between the "
        "predicted loss −Σ_{i∈S} influence[t, i] and the measured test loss averaged over the runs "
        f"(benchmarks/lds_bert.py). All influences at λ = {fmt(res['lambda'])}, from the kronfluence "
        "section's runs except Arnoldi and Nyström (measured here, one thread) and the gradient dot "
        "product (in float64, over all parameters, one test and one training point at a time). Load "
        f"average (1 / 5 / 15 min) at the start {_load(res.get('load_start'))}, at the end "
        f"{_load(res.get('load_end'))}.",
        "",
        f"Noise of the ground truth: two training runs on the same subsets agree to a Spearman "
        f"correlation of {fmt(agreement, 2)} (mean over test points); a test loss moves by "
        f"{fmt(truth['loss_std_across_runs'], 2)} (std) between runs and by "
        f"{fmt(truth['loss_std_across_subsets'], 2)} between subsets. So the scores below are small and "
        "close together: differences under about two standard errors (± s.e.: over the test points) or "
        "inside the per-run range mean little.",
        "",
        table(header, rows),
        "",
    ]
    best = {}
    for r in res["rows"]:  # the first row of each (CG: the whole model)
        if "lds" in r:
            best.setdefault(r["key"] + "/" + r["lib"], r["lds"])
    summary = [
        f"LDS on the tiny BERT ({m} half-data models × {k} runs; runs agree to Spearman "
        f"{fmt(agreement, 2)}): "
        + ", ".join(
            f"{label} {best[key]:.3f}"
            for key, label in (
                ("cg/infscale", "CG"),
                ("ekfac_true/infscale", "infscale EK-FAC"),
                ("ekfac_true/kronfluence", "kronfluence EK-FAC"),
                ("gradient_dot/plain torch", "gradient dot product"),
            )
            if key in best
        )
    ]
    return Rendered(lines, summary=summary)
