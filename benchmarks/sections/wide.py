"""Wide MLP (101k parameters), CG and the approximations in memory, infscale against pyDVL and the
floor, agreement with infscale's CG; plus CG with the generalized Gauss-Newton matrix (infscale only)."""

from __future__ import annotations

from config import PYDVL_EKFAC_CHUNK, WIDE_REG, fit_batch, wide_settings
from runner import log
from shared import PYDVL_SIGN, Context, agreement, ratio, timing

LIBS = ("infscale", "pydvl")
#: The rows, in page order; run cheapest first, pyDVL's two hopeless runs last (see ``measure``).
METHODS = ["cg", "lissa", "arnoldi", "nystroem", "inverse-harmonic-mean", "ekfac"]


def workload(ctx: Context, name: str, n: int, m: int, nf: int):
    """Save the wide MLP with its first ``n`` training, ``m`` test and ``nf`` fit rows; the workload dir."""
    model, x_pool, y_pool, x_te_pool, y_te_pool, _ = ctx.wide_model()
    data = {
        "x_train": x_pool[:n],
        "y_train": y_pool[:n],
        "x_test": x_te_pool[:m],
        "y_test": y_te_pool[:m],
        "x_fit": x_pool[:nf],
        "y_fit": y_pool[:nf],
    }
    return ctx.runner.save(name, model, "ce", data)


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data."""
    S, R = ctx.sizes, ctx.runner
    model, *_, train_s = ctx.wide_model()
    n, m, nf = S["wide_n_train"], S["wide_n_test"], S["wide_n_fit"]
    wl = workload(ctx, "wide", n, m, nf)
    log(f"wide MLP: in memory ({m} test × {n} train)")
    floor = R.run("floor", wl, method="floor")
    results = {}
    # cheapest first; pyDVL's inverse harmonic mean (several minutes, 12 GB) and Arnoldi (over 150 s
    # in the 20-minute run) last of all, capped at slow_run_s
    slow = [("pydvl", "inverse-harmonic-mean"), ("pydvl", "arnoldi")]
    order = [
        (lib, k)
        for k in ("ekfac", "nystroem", "inverse-harmonic-mean", "cg", "lissa", "arnoldi")
        for lib in LIBS
    ]
    for lib, method in [job for job in order if job not in slow] + slow:
        results[(lib, method)] = R.run(
            lib,
            wl,
            slow=(lib, method) in slow,
            method=method,
            params=wide_settings(method, S),
            fit_batch_size=fit_batch(method, nf),
            batch_size=S["wide_batch"],
            # pyDVL 0.10's EK-FAC query over all 10,000 training points in one call asks for 102 GB
            **({"train_chunk": PYDVL_EKFAC_CHUNK} if (lib, method) == ("pydvl", "ekfac") else {}),
        )
    # the generalized Gauss-Newton matrix (infscale only: pyDVL 0.10 has none), for its cost
    gn = R.run(
        "infscale",
        wl,
        method="cg",
        params=wide_settings("cg", S, "gauss_newton"),
        fit_batch_size=nf,
        batch_size=S["wide_batch"],
    )
    ref = results[("infscale", "cg")].get("values")
    rows = [
        {
            "key": "cg_gn",
            "method": "cg",
            "curvature": "gauss_newton",
            "settings": wide_settings("cg", S, "gauss_newton"),
            "infscale": timing(gn),
            "pydvl": None,
            "time_ratio": None,
            "floor_ratio": ratio(gn, floor),
            "agreement": {"infscale": agreement(gn.get("values"), ref), "pydvl": {}},
        }
    ]
    for method in METHODS:
        a, b = results[("infscale", method)], results[("pydvl", method)]
        vb = b.get("values") * PYDVL_SIGN if b.get("values") is not None else None
        rows.append(
            {
                "key": method,
                "method": method,
                "curvature": "empirical_fisher",
                "settings": wide_settings(method, S),
                "infscale": timing(a),
                "pydvl": timing(b),
                "time_ratio": ratio(b, a),
                "floor_ratio": ratio(a, floor),
                "agreement": {"infscale": agreement(a.get("values"), ref), "pydvl": agreement(vb, ref)},
            }
        )
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "epochs": S["wide_epochs"],
        "train_s": train_s,
        "n_train": n,
        "n_test": m,
        "n_fit": nf,
        "regularization": WIDE_REG,
        "cg_maxiter": S["cg_maxiter_wide"],
        "lissa_maxiter": S["lissa_maxiter_wide"],
        "slow_run_s": S["slow_run_s"],
        "pydvl_ekfac_chunk": PYDVL_EKFAC_CHUNK,
        "floor": timing(floor),
        "rows": rows,
    }
