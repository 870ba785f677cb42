"""The page's sections on the wide MLP (in memory, the calculators, out of core) and the small CNN.
Each ``render_*(results, run)`` takes a section's saved "results" and its "run" (sizes, ...) and
returns a ``Rendered``."""

from __future__ import annotations

from page.format import (
    EKFAC_FISHER,
    LABEL,
    PYDVL_SEMANTICS,
    Rendered,
    cell_time,
    fit_note,
    fmt,
    ok,
    pair,
    ratio_cell,
    repeats_note,
    speed_pairs,
    table,
)

GN_LABEL = "CG, Gauss-Newton Jᵀ∇²ℓJ (infscale only)"
TASK_LABEL = {
    "memory": "in memory",
    "sequential": "sequential → zarr",
    "dask1": "Dask, 1 worker",
    "dask2": "Dask, 2 workers",
}


def _fit(r: dict | None) -> str:
    return f" (fit {r['fit_s']:.1f})" if ok(r) else ""


def render_wide(res: dict, run: dict) -> Rendered:
    rows, speed = [], []
    for row in res["rows"]:
        a, b = row["infscale"], row["pydvl"]
        ag_a, ag_b = row["agreement"]["infscale"], row["agreement"]["pydvl"]
        if row["key"] == "cg_gn":  # no pyDVL counterpart
            rows.append(
                [
                    GN_LABEL,
                    cell_time(a) + _fit(a),
                    "– (no such mode)",
                    "–",
                    fmt((a or {}).get("peak_rss_mib")),
                    ratio_cell(row["floor_ratio"]),
                    f"{fmt(ag_a.get('pearson'))} / –",
                    f"{fmt(ag_a.get('top10'))} / –",
                ]
            )
            continue
        label = LABEL[row["method"]]
        rows.append(
            [
                label,
                cell_time(a) + _fit(a),
                cell_time(b) + _fit(b),
                ratio_cell(row["time_ratio"]),
                pair(a.get("peak_rss_mib"), b.get("peak_rss_mib")) if ok(a) and ok(b) else "–",
                ratio_cell(row["floor_ratio"]),
                pair(ag_a.get("pearson"), ag_b.get("pearson")),
                pair(ag_a.get("top10"), ag_b.get("top10")),
            ]
        )
        speed += speed_pairs("wide", [(label, a, b, row["time_ratio"])])
    n, m, nf = res["n_train"], res["n_test"], res["n_fit"]
    lines = [
        "## Wide MLP: CG and the approximations, in memory",
        "",
        "Pool: `make_classification(n_samples=52000, n_features=128, n_informative=32, n_redundant=32, "
        "n_classes=10, n_clusters_per_class=2, random_state=0)`, split 50,000 / 2,000, standardized on "
        f"the first 10,000 training rows; MLP 128-256-256-10 tanh ({res['n_params']:,} parameters), trained "
        f"{res['epochs']} epochs with Adam on the first 10,000 rows ({res['train_s']:.0f} s). Influences of "
        f"the first {m} test × first {n:,} training rows; curvature fitted on the first {nf:,} training "
        "rows; curvature: the empirical Fisher (1/n) Σ gᵢgᵢᵀ (infscale `second_order_mode="
        '"empirical_fisher"`, pyDVL `SecondOrderMode.GAUSS_NEWTON`: the same matrix), λ = '
        f"{res['regularization']}. The floor (plain torch: {n + m:,} per-sample gradients + one "
        f"product) took {cell_time(res['floor'])}. Agreement (infscale / pyDVL) with infscale's CG "
        "(rtol 1e-4, "
        f"maxiter {res['cg_maxiter']}), the closest to exact that fits the budget here. The first "
        "row solves with infscale's generalized Gauss-Newton matrix instead, a different curvature "
        "whose products cost a forward and a backward pass per vector and whose wider spectrum "
        "needs more CG iterations.",
        "",
        table(
            [
                "method",
                "infscale (s)",
                "pyDVL 0.10 (s)",
                "pyDVL / infscale time",
                "peak RSS MiB infscale / pyDVL",
                "infscale / floor",
                "Pearson r vs CG",
                "top-10 overlap",
            ],
            rows,
        ),
        "",
        f"Settings for both libraries: LiSSA maxiter {res['lissa_maxiter']}, scale 10, batches of 256; "
        "Arnoldi and Nyström rank 64; EK-FAC (no second-order mode) with the diagonal "
        "update; inverse harmonic mean with the same λ. Goal: low-rank methods and EK-FAC within 3× of "
        f"the floor. {EKFAC_FISHER} pyDVL's EK-FAC query is called on training chunks of "
        f"{res['pydvl_ekfac_chunk']} (one call over all 10,000 training points tried to allocate 102 GB, "
        "10,000² × 256 float32, and its query time grows with the chunk: 83 s at 200, 218 s at 1,000 "
        "on a loaded machine); infscale's in one call. pyDVL's inverse harmonic mean and Arnoldi run "
        f"last and are cut at {res['slow_run_s']} s. Time = fit + query; {repeats_note(run['sizes'])}. "
        + PYDVL_SEMANTICS,
        "",
    ]
    reduced = [
        f"wide MLP in memory: {m} test points instead of 500, curvature fitted on the first {nf:,} training "
        f"rows, CG capped at {res['cg_maxiter']} iterations, LiSSA at {res['lissa_maxiter']}: CG with 500 "
        "right-hand sides over 10,000 rows of a 101k-parameter model does not fit a 40-minute run on 2 cores"
    ]
    return Rendered(lines, reduced=reduced, speed=speed)


def render_calculators(res: dict, run: dict) -> Rendered:
    rows, speed = [], []
    for row in res["rows"]:
        a, b, has_b = row["infscale"], row.get("pydvl"), "pydvl" in row
        label = TASK_LABEL[row["task"]]
        rows.append(
            [
                label,
                cell_time(a) + fit_note(a),
                cell_time(b) + fit_note(b) if has_b else "",
                ratio_cell(row.get("time_ratio")) if has_b else "",
                pair(a.get("peak_rss_mib"), b.get("peak_rss_mib"))
                if has_b and ok(a) and ok(b)
                else fmt(a.get("peak_rss_mib")),
                fmt(row["pearson"].get("infscale"), 6),
                fmt(row["pearson"].get("pydvl"), 6) if has_b else "",
            ]
        )
        if has_b:
            speed += speed_pairs("wide", [(label, a, b, row.get("time_ratio"))])
    eff = res.get("efficiency")
    eff_text, eff_detail = "–", "not measured: a Dask run failed or was cut"
    if eff:
        eff_text = f"{eff['value']:.0%}"
        eff_detail = f"{eff['compute_1_worker_s']:.1f} s / (2 × {eff['compute_2_workers_s']:.1f} s)"
    n, m, bs, tbs = res["n_train"], res["n_test"], res["batch"], res["test_batch"]
    sizes = run["sizes"]
    lines = [
        "## Wide MLP: sequential to zarr and on Dask",
        "",
        f"{LABEL[res['method']]} (empirical Fisher, pyDVL's GAUSS_NEWTON, λ = {res['regularization']}, "
        "rtol 1e-4, "
        f"maxiter {res['settings']['maxiter']}, curvature on the first "
        f"{res['n_fit']:,} training rows) on the wide MLP: {m} test × {n:,} training points"
        + (f" (issue 6 asks for 500 test points; {m} fit this section's budget)" if m < 500 else "")
        + f", training batches of {bs:,}, test batches of {tbs} ({res['n_blocks']} blocks); each run fits "
        "the method in its own process (fit time in brackets) and writes the matrix to a local zarr "
        "store. Dask: a LocalCluster of worker processes with one thread each, the same cluster settings "
        "for both libraries; 'compute' is the Dask computation alone (graph, compute and store; cluster "
        "start-up excluded). infscale computes each test batch's CG solve once and each training "
        "batch's gradients once; pyDVL 0.10's calculators call `influences` for every (test batch, "
        "training batch) pair, redoing the test batch's CG solve for each of the "
        f"{res['n_train_batches']} training batches, so its two runs are cut at {res['slow_run_s']} s "
        "and run "
        "after infscale's (a cut run shows how many of its blocks it had written; its ratio is a lower "
        "bound). Peak RSS is the driver process's. Agreement: Pearson r of the first "
        f"{res['agreement_rows']} rows with infscale in memory. {repeats_note(sizes).capitalize()}.",
        "",
        table(
            [
                "calculator",
                "infscale (s)",
                "pyDVL 0.10 (s)",
                "pyDVL / infscale",
                "peak RSS MiB infscale / pyDVL",
                "r (infscale)",
                "r (pyDVL)",
            ],
            rows,
        ),
        "",
        "Parallel efficiency of infscale on Dask (compute time with 1 worker / (2 × with 2 workers), "
        f"cluster start-up excluded): **{eff_text}** (goal ≥ 85% on 2 cores; {eff_detail}).",
        "",
    ]
    out = Rendered(lines, [f"Dask parallel efficiency (2 workers, wide MLP): {eff_text}."], speed=speed)
    if m < 500:
        out.reduced.append(
            f"wide MLP calculators: {m} test points instead of 500 (each test batch of {tbs} costs a "
            "block-CG solve)"
        )
    return out


def render_out_of_core(res: dict, run: dict) -> Rendered:
    m, small, large = res["n_test"], res["small"], res["large"]
    rows = []
    by_key = {}
    for entry in res["runs"]:
        r, n = entry["run"], entry["n_train"]
        by_key[(entry["lib"], n)] = r
        rows.append(
            [
                entry["lib"],
                f"{m:,} × {n:,}",
                f"{m * n * 4 / 2**20:,.0f} MiB",
                cell_time(r),
                fmt((r or {}).get("peak_rss_mib")),
                fmt((r or {}).get("base_rss_mib")),
            ]
        )
    growth = "–" if res["rss_growth"] is None else f"{res['rss_growth']:+.1%}"
    lines = [
        "## Out of core: streamed to zarr",
        "",
        f"{LABEL[res['method']]} (fitted on {res['n_fit']:,} rows) on the wide MLP through "
        f"`SequentialInfluenceCalculator` to a local zarr store, training batches of {res['batch']:,}, test "
        f"batches of {res['test_batch']}. Peak RSS of the whole process (MiB); baseline = after loading "
        "data, "
        "model and library.",
        "",
        table(
            ["library", "test × train", "matrix (float32)", "time", "peak RSS MiB", "baseline RSS MiB"], rows
        ),
        "",
        f"Memory flatness: peak RSS grows **{growth}** while the matrix grows {large // small}× "
        "(goal < 10%). "
        f"pyDVL runs at the smaller size only (time ratio there: {ratio_cell(res['pydvl_time_ratio'])}).",
        "",
    ]
    big = by_key.get(("infscale", large)) or {}
    summary = [
        f"Out of core ({m:,} × {large:,} to zarr): {cell_time(big)}, peak RSS {fmt(big.get('peak_rss_mib'))} "
        f"MiB, growth {growth} vs {small:,} training rows."
    ]
    reduced = [
        "out of core: pyDVL only at the smaller size (its calculator calls `influences` per block, so it "
        "recomputes test factors for every training batch and training gradients for every test batch, "
        "which at full size alone would take longer than the whole run)"
    ]
    return Rendered(lines, summary, reduced)


def render_cnn(res: dict, run: dict | None = None) -> Rendered:
    rows = []
    for r in res["rows"]:
        cells = [f"{r['lambda']:g}", r["method"]]
        cells += ["(reused)", "–"] if r["reused"] else [f"{r['fit_s']:.2f}", f"{r['query_s']:.2f}"]
        for key in ("vs_full", "vs_layer_wise"):
            cells += [f"{r[key]['pearson']:.3f}", f"{r[key]['top10']:.2f}"]
        rows.append(cells)
    header = [
        "λ",
        "method",
        "fit (s)",
        "query (s)",
        "r vs GN full",
        "top-10 vs GN full",
        "r vs GN layer-wise",
        "top-10 vs GN layer-wise",
    ]
    lams, shares = res["lambdas"], res["lambda_shares"]
    lines = [
        "## Small CNN on 8×8 digits: K-FAC and EK-FAC",
        "",
        f"scikit-learn digits as 1×8×8 images (standardized), {res['n_train']:,} train × "
        f"{res['n_test']} test; "
        "CNN Conv2d(1,8,3,pad 1) → tanh → Conv2d(8,16,3,stride 2,pad 1) → tanh → Linear(256,10), "
        f"{res['n_params']:,} parameters, trained with Adam (seeded, full batch; test accuracy "
        f"{res['test_accuracy']:.1%}). Influences for all {res['n_test']} × {res['n_train']:,} pairs, "
        "float32 "
        f"model, one thread. λ = {lams[0]:g} and {lams[1]:g}, i.e. {shares[0]:.0%} and {shares[1]:.0%} "
        f"of the largest eigenvalue of the full Gauss-Newton matrix ({res['lambda_max']:.3g}); times at the "
        "first λ (fit = building and factorizing the curvature, query = the whole test × train matrix), the "
        "second reuses the fits. "
        '`EkfacInfluence(fisher="exact")`: K-FAC = `update_diagonal=False`, EK-FAC = `True`. '
        'References: `DirectInfluence(second_order_mode="gauss_newton")` with `block_structure` '
        "full (exact) and layer-wise (the block-diagonal matrix that K-FAC and EK-FAC approximate). "
        "Top-10: mean over test points of the overlap of the 10 most helpful training points.",
        "",
        table(header, rows),
        "",
        f"Command: `{res['command']}`.",
        "",
    ]
    return Rendered(lines)
