"""Out of core: the wide MLP's influences streamed to zarr through the sequential calculator at two
sizes (peak RSS should stay flat while the matrix grows), pyDVL at the smaller size only."""

from __future__ import annotations

from config import wide_settings
from runner import log
from shared import Context, ok, ratio, timing

from sections.wide import workload

#: Arnoldi first: its training representation is n × rank, so the 2,000 × 50,000 products are cheap;
#: Nyström and EK-FAC multiply full-size factors (10¹³ multiply-adds here). A method that fails at the
#: smaller size gives way to the next.
CANDIDATES = ("arnoldi", "nystroem", "ekfac")


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data."""
    S = ctx.sizes
    m, nf = S["ooc_n_test"], S["wide_n_fit"]
    sizes = (S["ooc_small"], S["ooc_n_train"])

    def common(method: str, n: int) -> dict:
        return dict(
            method=method,
            params=wide_settings(method, S),
            task="sequential",
            batch_size=S["ooc_batch"],
            test_batch_size=S["ooc_test_batch"],
            keep_rows=5,
            n_blocks=-(-m // S["ooc_test_batch"]) * -(-n // S["ooc_batch"]),
        )

    workloads = {n: workload(ctx, f"ooc{n}", n, m, nf) for n in sizes}
    runs = {}
    for method in CANDIDATES:
        log(f"out-of-core: {method}, {m} test × {sizes[0]} train to zarr")
        runs[("infscale", sizes[0])] = ctx.runner.run(
            "infscale", workloads[sizes[0]], **common(method, sizes[0])
        )
        if ok(runs[("infscale", sizes[0])]) or runs[("infscale", sizes[0])].get("timeout"):
            break
    log(f"out-of-core: {method}, {m} test × {sizes[1]} train to zarr")
    runs[("infscale", sizes[1])] = ctx.runner.run("infscale", workloads[sizes[1]], **common(method, sizes[1]))
    log(f"out-of-core: pyDVL at {sizes[0]} train")  # last: it is the slowest
    runs[("pydvl", sizes[0])] = ctx.runner.run(
        "pydvl", workloads[sizes[0]], slow=True, **common(method, sizes[0])
    )
    small, big = runs[("infscale", sizes[0])], runs[("infscale", sizes[1])]
    growth = None
    if ok(small) and ok(big):
        growth = big["peak_rss_mib"] / small["peak_rss_mib"] - 1
    return {
        "method": method,
        "settings": wide_settings(method, S),
        "n_fit": nf,
        "n_test": m,
        "batch": S["ooc_batch"],
        "test_batch": S["ooc_test_batch"],
        "small": sizes[0],
        "large": sizes[1],
        "runs": [{"lib": lib, "n_train": n, "run": timing(r)} for (lib, n), r in runs.items()],
        "rss_growth": growth,
        "pydvl_time_ratio": ratio(runs[("pydvl", sizes[0])], small),
    }
