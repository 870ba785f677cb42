"""What sets the size of a benchmark run: the sections, their budgets, the sizes per mode, and the
settings each method gets on each workload. Plain data; imports neither torch nor the sections.

The method names are infscale's (``infscale.app.registry.METHODS``): the same short names the
``infscale`` command takes, so the benchmark data and the command speak of the same methods.
"""

from __future__ import annotations

#: The sections, in the order they run and appear on the page.
SECTIONS = [
    "digits",
    "loo",
    "lds",
    "mislabel",
    "seed_example",
    "wide",
    "calculators",
    "out_of_core",
    "cnn",
    "kronfluence",
    "lds_bert",
]

#: Sections that use what another section measured in the same run (its influence matrices, which
#: are too large to save): ``--only lds`` runs digits first.
REQUIRES = {"lds": ("digits",), "mislabel": ("digits",), "lds_bert": ("kronfluence",)}

# Seconds per section (full mode), from the timings of the 20-minute run of 2026-11-28 (docs/benchmarks.md
# and its earlier runs) plus margin; --budget scales them all proportionally.
SECTION_BUDGETS = {
    # expected on an idle 2-core machine (s): digits ~400, loo ~30, lds ~60, seed ~60, wide ~640,
    # calculators ~560, out_of_core ~240, cnn ~110: about 35 min of the 42 budgeted. kronfluence ~600
    # (its CG reference on the CNN alone ~150), lds_bert ~60 with the cached ground truth (benchmarks/
    # results-kronfluence/lds_bert.npz), ~400 when it retrains the 150 BERTs
    "full": {
        "digits": 450,
        "loo": 60,
        "lds": 100,
        "mislabel": 10,
        "seed_example": 90,
        "wide": 700,
        "calculators": 660,
        "out_of_core": 280,
        "cnn": 180,
        "kronfluence": 900,
        "lds_bert": 600,
    },
    "quick": {
        "digits": 240,
        "loo": 40,
        "lds": 50,
        "mislabel": 10,
        "seed_example": 60,
        "wide": 180,
        "calculators": 180,
        "out_of_core": 60,
        "cnn": 100,
        "kronfluence": 600,
        "lds_bert": 300,
    },
    "smoke": {s: 240 for s in SECTIONS},
}

SIZES = {
    "full": dict(
        repeats=3,
        short_run_s=10.0,
        wide_epochs=40,
        wide_n_train=10_000,
        wide_n_test=20,
        wide_n_fit=2_000,
        wide_batch=1_000,
        calc_n_test=500,
        calc_test_batch=100,
        calc_batch=1_000,
        cg_maxiter_wide=30,
        lissa_maxiter_wide=100,
        ooc_n_train=50_000,
        ooc_small=5_000,
        ooc_n_test=2_000,
        ooc_batch=2_500,
        ooc_test_batch=500,
        lds_models=50,
        lds_bert_models=50,
        lds_bert_seeds=3,
        loo_removed=300,
        run_timeout_s=240,
        slow_run_s=150,
    ),
    "smoke": dict(  # only to check that every code path runs (python benchmarks/run_all.py --smoke)
        repeats=2,
        short_run_s=1.0,
        wide_epochs=1,
        wide_n_train=300,
        wide_n_test=4,
        wide_n_fit=200,
        wide_batch=100,
        calc_n_test=8,
        calc_test_batch=4,
        calc_batch=100,
        cg_maxiter_wide=5,
        lissa_maxiter_wide=5,
        ooc_n_train=600,
        ooc_small=300,
        ooc_n_test=40,
        ooc_batch=100,
        ooc_test_batch=20,
        lds_models=4,
        lds_bert_models=4,
        lds_bert_seeds=2,
        loo_removed=5,
        run_timeout_s=120,
        slow_run_s=60,
    ),
    "quick": dict(
        repeats=3,
        short_run_s=5.0,
        wide_epochs=4,
        wide_n_train=2_000,
        wide_n_test=10,
        wide_n_fit=500,
        wide_batch=500,
        calc_n_test=40,
        calc_test_batch=20,
        calc_batch=500,
        cg_maxiter_wide=20,
        lissa_maxiter_wide=50,
        ooc_n_train=5_000,
        ooc_small=500,
        ooc_n_test=200,
        ooc_batch=500,
        ooc_test_batch=100,
        lds_models=20,
        lds_bert_models=50,
        lds_bert_seeds=3,
        loo_removed=60,
        run_timeout_s=90,
        slow_run_s=40,
    ),
}

PYDVL_EKFAC_CHUNK = 100  # training points per pyDVL EK-FAC query on the wide MLP (~1 GB each)
DIGITS_REG = 0.01  # H + 0.01 I is positive definite for the digits MLP (λ_min(H) ≈ −0.002)
WIDE_REG = 0.1  # wide MLP (empirical Fisher: the matrix both libraries compute; see page/texts.py)
LOO_REG = 0.1
IHM = "inverse-harmonic-mean"  # the registry's name of the inverse harmonic mean (DataInf)
# The kronfluence section's λ per workload (benchmarks/results-kronfluence/*.json "dampings"): 3% of the
# largest eigenvalue of the Gauss-Newton matrix of the mean training loss in the Linear / Conv2d
# parameters (BERT 5.58 → 0.17, CNN 0.26 → 0.0078), and DIGITS_REG for the MLP.
KRONFLUENCE_DAMPING = {"bert": 0.17, "cnn": 0.0078, "mlp": DIGITS_REG}
# Its reference: CG with the Gauss-Newton matrix, in float64, at a tight tolerance.
KRONFLUENCE_REFERENCE = {"second_order_mode": "gauss_newton", "rtol": 1e-10, "atol": 0.0, "maxiter": 2000}
# lds_bert's low-rank methods (Gauss-Newton, as the reference)
LDS_BERT_SETTINGS = {
    "arnoldi": {"rank": 64, "second_order_mode": "gauss_newton"},
    "nystroem": {"rank": 64, "second_order_mode": "gauss_newton"},
}


def bench_methods() -> list[str]:
    """The registry's methods (``infscale.app.registry.METHODS``) in the order the suite runs them:
    LiSSA last, the slowest, so that a section's budget cuts it first."""
    from infscale.app.registry import METHODS

    return [m for m in METHODS if m != "lissa"] + [m for m in METHODS if m == "lissa"]


def digits_settings(method: str) -> dict:
    """Shared settings of each method on the digits MLP (Hessian, λ = 0.01)."""
    return {
        "direct": {},
        "cg": {"rtol": 1e-6, "atol": 1e-9, "maxiter": 200},
        "lissa": {"maxiter": 200, "scale": 0.5, "dampen": 0.0, "rtol": 1e-4},
        "arnoldi": {"rank": 64},
        "nystroem": {"rank": 64},
        IHM: {},
        "ekfac": {"fisher": "exact"},
    }[method] | {"regularization": DIGITS_REG}


def wide_settings(method: str, sizes: dict, curvature: str = "empirical_fisher") -> dict:
    """Shared settings on the wide MLP (λ = 0.1). The curvature is the empirical Fisher, the matrix
    pyDVL 0.10 calls GAUSS_NEWTON (the pyDVL adapter in child.py translates the name); infscale's
    "gauss_newton" (Jᵀ∇²ℓJ) has no pyDVL counterpart."""
    gn = {"second_order_mode": curvature}
    return {
        "cg": {"rtol": 1e-4, "atol": 1e-7, "maxiter": sizes["cg_maxiter_wide"], **gn},
        "lissa": {"maxiter": sizes["lissa_maxiter_wide"], "scale": 10.0, "dampen": 0.0, "rtol": 1e-4, **gn},
        "arnoldi": {"rank": 64, **gn},
        "nystroem": {"rank": 64, **gn},
        IHM: {},
        "ekfac": {"fisher": "exact"},
    }[method] | {"regularization": WIDE_REG}


def fit_batch(method: str, n: int) -> int:
    """The fit loader's batch size: LiSSA samples one batch of 256 per iteration, the others take all."""
    return min(256, n) if method == "lissa" else n
