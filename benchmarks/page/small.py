"""The page's sections on small models: digits MLP (every method), leave-one-out validation, LDS,
mislabel detection, the seed example. Each ``render_*(results, run)`` takes a section's saved
"results" and its "run" (sizes, ...) and returns a ``Rendered``."""

from __future__ import annotations

from page.format import (
    EKFAC_FISHER,
    LABEL,
    PYDVL_SEMANTICS,
    Rendered,
    cell_time,
    fmt,
    ok,
    pair,
    ratio_cell,
    repeats_note,
    speed_pairs,
    table,
)


def render_digits(res: dict, run: dict) -> Rendered:
    rows, speed = [], []
    for row in res["rows"]:
        a, b = row["infscale"], row["pydvl"]
        ag_a, ag_b = row["agreement"]["infscale"], row["agreement"]["pydvl"]
        label = LABEL[row["method"]]
        rows.append(
            [
                label,
                cell_time(a),
                cell_time(b),
                ratio_cell(row["time_ratio"]),
                ratio_cell(row["rss_ratio"]),
                ratio_cell(row["floor_ratio"]),
                pair(ag_a.get("pearson"), ag_b.get("pearson")),
                pair(ag_a.get("rel"), ag_b.get("rel")),
                pair(ag_a.get("top10"), ag_b.get("top10")),
            ]
        )
        speed += speed_pairs("digits", [(label, a, b, row["time_ratio"])])
    sign = (
        "pyDVL's values have the opposite sign to infscale's; they are negated before comparing."
        if res["pydvl_sign"] < 0
        else "pyDVL's values have the same sign convention as infscale's."
    )
    n_tr, n_te = res["n_train"], res["n_test"]
    lines = [
        "## Digits MLP: every method, in memory",
        "",
        f"scikit-learn digits ({n_tr} train × {n_te} test, standardized), {res['architecture']} "
        f"({res['n_params']} parameters), cross-entropy, Hessian, λ = {res['regularization']}; influences of "
        f"all {n_te} test × {n_tr} training points. Time = fit + query ({repeats_note(run['sizes'])}); the "
        f"floor (plain torch: {n_tr + n_te} per-sample gradients + one product) took "
        f"{cell_time(res['floor'])}. "
        "Agreement with infscale's Direct (the exact reference): Pearson r, relative error ‖A − D‖/‖D‖, and "
        "the mean overlap of the top-10 training points per test point, given as infscale / pyDVL.",
        "",
        table(
            [
                "method",
                "infscale",
                "pyDVL 0.10",
                "pyDVL / infscale time",
                "pyDVL / infscale peak RSS",
                "infscale / floor",
                "Pearson r",
                "rel. error",
                "top-10 overlap",
            ],
            rows,
        ),
        "",
        "Settings (identical for both libraries): CG rtol 1e-6, atol 1e-9, maxiter 200 (pyDVL with "
        "`solve_simultaneously=True`, its block CG); LiSSA maxiter 200, scale 0.5, batches of 256; "
        "Arnoldi and Nyström rank 64; EK-FAC with the diagonal update. "
        f"{EKFAC_FISHER} {PYDVL_SEMANTICS} {sign}",
        "",
    ]
    summary = []
    direct = next((r for r in res["rows"] if r["method"] == "direct"), None)
    if direct and ok(direct["infscale"]) and ok(direct["pydvl"]):
        summary.append(
            f"Digits MLP, exact Direct: infscale {direct['infscale']['total_s']:.2f} s, "
            f"pyDVL {direct['pydvl']['total_s']:.2f} s ({ratio_cell(direct['time_ratio'])})."
        )
    return Rendered(lines, summary, speed=speed)


def _loo_label(row: dict) -> str:
    rank = row.get("settings", {}).get("rank")
    return LABEL[row["method"]].replace("r64", f"r{rank}") if rank is not None else LABEL[row["method"]]


def render_loo(res: dict, run: dict) -> Rendered:
    rows, summary = [], []
    for ds in res["datasets"]:
        name = ds["name"]
        for row in ds["rows"]:
            if "status" in row:
                rows.append([name, LABEL[row["method"]], row["status"], "", ""])
            else:
                rows.append(
                    [
                        name,
                        _loo_label(row),
                        fmt(row["pearson"], 4),
                        fmt(row["spearman"], 4),
                        fmt(row["slope"]),
                    ]
                )
        weak = ds.get("weak")
        if weak:
            rows.append(
                [
                    name,
                    f"{LABEL[weak['method']]}, λ = {weak['regularization']:g}",
                    fmt(weak["pearson"], 4),
                    fmt(weak["spearman"], 4),
                    fmt(weak["slope"]),
                ]
            )
        rows.append(
            [
                name,
                f"({ds['n_removed']} of {ds['n_train']} points retrained in {ds['retrain_s']:.1f} s)",
                "",
                "",
                "",
            ]
        )
        r = {row["method"]: row.get("pearson") for row in ds["rows"] if "pearson" in row}
        if r.get("direct") is not None and r.get("cg") is not None:
            summary.append(
                f"Leave-one-out on {name}: Pearson r {r['direct']:.3f} (Direct), {r['cg']:.3f} (CG) between "
                "influence/n and retraining."
            )
    by_name = {ds["name"]: ds for ds in res["datasets"]}
    bc, d17 = by_name.get("breast_cancer"), by_name.get("digits 1 vs 7")
    sizes = ""
    if bc and d17:
        sizes = (
            f" on scikit-learn's breast_cancer ({bc['n_train']} train / {bc['n_test']} test) and "
            "digits 1-vs-7 "
            f"({d17['n_train']} / {d17['n_test']})"
        )
    params = " and ".join(str(ds["n_params"]) for ds in res["datasets"])
    reg = res["regularization"]
    weak_reg = next((ds["weak"]["regularization"] for ds in res["datasets"] if ds.get("weak")), reg / 10)
    lines = [
        "## Validation against leave-one-out retraining",
        "",
        "After Koh & Liang (2017, Fig. 2). L2-regularized logistic regression in float64 "
        f"(`nn.Linear(d, 1)`, binary cross-entropy){sizes}, standardized. The objective is "
        f"J(θ) = (1/n) Σ_j ℓ_j(θ) + (λ/2)‖θ‖² with λ = {reg} on all parameters, so "
        "`hessian_regularization=λ` makes H + λI exactly ∇²J. Each removed point is retrained away by "
        f"Newton's method warm-started at the full optimum until ‖∇J‖ ≤ {res['newton_tol']:g} (with n kept "
        "fixed), and the actual change of every test loss is compared with influence / n (removing a helpful "
        "point raises the loss). Correlations are over all (test point, removed point) pairs; slope is the "
        "least-squares slope of actual on predicted (1 = right sign and scale).",
        "",
        table(["dataset", "method", "Pearson r", "Spearman ρ", "slope"], rows),
        "",
        f"Arnoldi and Nyström use rank min(16, d/2) here (d + 1 = {params} parameters); LiSSA "
        "maxiter 500, scale 2. Expected: Pearson ≥ 0.98 for Direct and CG. The row "
        f"'Direct, λ = {weak_reg:g}' "
        "shows the same model with ten times weaker regularization: the ranking stays right (Spearman), "
        "but high-leverage points move the test loss more than the first-order prediction (slope > 1), "
        "so Pearson drops.",
        "",
    ]
    if res.get("figure"):
        lines += [f"![LOO scatter]({res['figure']})", ""]
    return Rendered(lines, summary)


def render_lds(res: dict, run: dict) -> Rendered:
    rows = [[LABEL[r["method"]], fmt(r["infscale"]), fmt(r["pydvl"])] for r in res["rows"]]
    k = res["n_models"]
    lines = [
        "## Linear datamodeling score (LDS)",
        "",
        f"Park et al. (2023): {k} digits MLPs retrained (same recipe, a different initialization seed each) "
        f"on random halves of the {res['n_train']} training points; for each test point, the Spearman "
        "correlation over the subsets between the predicted test loss (−Σ_{i∈S} influence) and the "
        f"measured one; averaged over the {res['n_test']} test points. Influences are those of the digits "
        "table (the model trained on all points).",
        "",
        table(["method", "infscale LDS", "pyDVL LDS"], rows),
        "",
        "Peers, recalled from the papers (approximate, not re-checked here; the settings differ: their "
        "output function is the correct-class margin, ours the test loss; their models are ResNets / "
        "language models, ours a small MLP): Park et al. 2023 (TRAK) report LDS for influence "
        "functions of roughly 0.1 or below on CIFAR-2/CIFAR-10 ResNet-9 and about 0.2–0.5 for TRAK "
        "with an ensemble of models; Bae et al. 2024 / the Kronfluence report put EK-FAC influence "
        "around 0.3–0.5 on small tabular regression MLPs (UCI). Small convex-ish models like ours are "
        "the easy end of that range.",
        "",
    ]
    out = Rendered(lines)
    if k < res["n_models_planned"]:
        out.reduced.append(
            f"LDS: only {k} of {res['n_models_planned']} retrained models fitted in the time budget"
        )
    direct = next((r for r in res["rows"] if r["method"] == "direct"), None)
    if direct and direct["infscale"] is not None:
        out.summary.append(f"LDS on the digits MLP ({k} half-data models): Direct {direct['infscale']:.2f}.")
    return out


def render_mislabel(res: dict, run: dict) -> Rendered:
    rows = []
    for r in res["rows"]:
        row = [LABEL[r["method"]]]
        for lib in ("infscale", "pydvl"):
            found = r[lib]
            if "top10" in found:
                row += [fmt(found["top10"]), fmt(found["top20"])]
            else:
                row += [cell_time(found.get("run")), "–"]
        rows.append(row)
    lines = [
        "## Mislabel detection",
        "",
        f"Digits with {res['fraction_flipped']:.0%} of the training labels flipped to another class "
        f"({res['n_flipped']} of {res['n_train']}), the digits MLP retrained on them; training points ranked "
        "by self-influence (largest first). Fraction of the flipped labels found in the top 10% / 20% "
        f"(checking a random 10% finds about 0.10; here {res['random_top10']:.2f}; a perfect ranking finds "
        "1.0).",
        "",
        table(["method", "infscale top 10%", "infscale top 20%", "pyDVL top 10%", "pyDVL top 20%"], rows),
        "",
        "Peers, from memory (not re-checked, settings differ): Koh & Liang (2017, Fig. 6) flipped 10% of "
        "Enron spam labels and found a large share of them (most after checking ~30% of the data) by "
        "self-influence of a logistic regression, ahead of loss-based and random checks.",
        "",
    ]
    out = Rendered(lines)
    direct = next((r for r in res["rows"] if r["method"] == "direct"), None)
    if direct and "top10" in direct["infscale"]:
        out.summary.append(
            f"Mislabel detection (digits, {res['fraction_flipped']:.0%} flipped), Direct self-influence: "
            f"{direct['infscale']['top10']:.0%} of flipped labels in the top 10%, "
            f"{direct['infscale']['top20']:.0%} in the top 20%."
        )
    return out


def render_seed(res: dict, run: dict) -> Rendered:
    if not res.get("available"):
        return Rendered(["## Seed example", "", f"Not run: {res.get('reason', 'no seed example')}.", ""])
    a, b = res["infscale"], res["pydvl"]
    n_test_blocks, n_train_blocks = res["blocks"]
    lines = [
        "## Seed example: sequential calculator",
        "",
        "The data and model of `../shared/checks/seed_examples.py` (`make_problem`: "
        f"{res['n_train']} train × {res['n_test']} test, MLP 8-6-3), `CgInfluence(model, loss, "
        f"hessian_regularization={res['regularization']})` (pyDVL: `regularization`, "
        "with `solve_simultaneously=True`, its faster block CG: its default solves one right-hand side "
        "at a time, 6.1 s per block pair against 0.30 s, measured) fitted on the training loader "
        "and run through `SequentialInfluenceCalculator`, every loader with batches of "
        f"{res['batch']} as the "
        f"seed writes it ({n_test_blocks} × {n_train_blocks} blocks), written to zarr; "
        f"{repeats_note(run['sizes'])}.",
        "",
        table(
            ["infscale", "pyDVL 0.10", "pyDVL / infscale", "Pearson r (pyDVL vs infscale)"],
            [[cell_time(a), cell_time(b), ratio_cell(res["time_ratio"]), fmt(res["pearson"], 6)]],
        ),
        "",
    ]
    return Rendered(lines, speed=speed_pairs("seed", [("sequential CG", a, b, res["time_ratio"])]))
