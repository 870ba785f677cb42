"""Digits MLP, every method in memory, infscale and pyDVL side by side, against the floor (plain torch)
and against infscale's Direct. Also measures the self-influences on the digits with 10% flipped labels
(in the same child process) and publishes the influence matrices for the LDS and mislabel sections.
"""

from __future__ import annotations

import evaluation as E
import workloads as W
from config import DIGITS_REG, bench_methods, digits_settings, fit_batch
from runner import log
from shared import Context, agreement, ok, ratio, timing

LIBS = ("infscale", "pydvl")


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data (see docs/benchmarks-data/README.md)."""
    log("digits MLP: every method, in memory")
    R = ctx.runner
    methods = bench_methods()
    model, _, (x_tr, y_tr, x_te, y_te) = W.digits_mlp()
    x_n, y_n, _, _, flipped = W.flipped_digits(0.1)
    noisy_model = W.digits_mlp_on(x_n, y_n)
    wl = R.save("digits", model, "ce", {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te})
    noisy = R.save(
        "digits_noisy", noisy_model, "ce", {"x_train": x_n, "y_train": y_n, "x_test": x_te, "y_test": y_te}
    )
    results, self_scores = {}, {}
    floor = R.run("floor", wl, method="floor")
    for method in methods:
        for lib in LIBS:
            common = dict(
                method=method, params=digits_settings(method), fit_batch_size=fit_batch(method, len(x_tr))
            )
            jobs = [(wl, common), (noisy, dict(task="self", **common))]
            results[(lib, method)], self_scores[(lib, method)] = R.run_jobs(lib, jobs)
    ref = results[("infscale", "direct")].get("values")
    pd_direct = results[("pydvl", "direct")].get("values")
    sign = -1.0 if ref is not None and pd_direct is not None and E.pearson(pd_direct, ref) < 0 else 1.0
    values = {}
    for (lib, method), r in results.items():
        if r.get("values") is not None:
            values[(lib, method)] = r["values"] * (sign if lib == "pydvl" else 1)
    rows = []
    for method in methods:
        a, b = results[("infscale", method)], results[("pydvl", method)]
        rows.append(
            {
                "method": method,
                "settings": digits_settings(method),
                "infscale": timing(a),
                "pydvl": timing(b),
                "time_ratio": ratio(b, a),
                "rss_ratio": ratio(b, a, "peak_rss_mib") if ok(a) and ok(b) else None,
                "floor_ratio": ratio(a, floor),
                "agreement": {
                    "infscale": agreement(values.get(("infscale", method)), ref),
                    "pydvl": agreement(values.get(("pydvl", method)), ref),
                },
            }
        )
    ctx.publish(
        "digits",
        data=(x_tr, y_tr, x_te, y_te),
        values=values,
        self_scores={
            key: (
                r.get("values") * (sign if key[0] == "pydvl" else 1) if r.get("values") is not None else None
            )
            for key, r in self_scores.items()
        },
        self_runs={key: timing(r) for key, r in self_scores.items()},
        flipped=flipped,
        methods=methods,
    )
    return {
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "n_params": sum(p.numel() for p in model.parameters()),
        "architecture": "MLP 64-32-10 tanh",
        "curvature": "hessian",
        "regularization": DIGITS_REG,
        "floor": timing(floor),
        "pydvl_sign": sign,
        "rows": rows,
    }
