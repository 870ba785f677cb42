"""The benchmark page, rendered from saved data only (no torch, no measuring): one ``render_*`` per
section (config.SECTIONS), each taking the section's saved "results" and "run" and returning a
``page.format.Rendered``."""

from __future__ import annotations

from page.kron import render_kronfluence, render_lds_bert
from page.small import render_digits, render_lds, render_loo, render_mislabel, render_seed
from page.wide import render_calculators, render_cnn, render_out_of_core, render_wide

RENDERERS = {
    "digits": render_digits,
    "loo": render_loo,
    "lds": render_lds,
    "mislabel": render_mislabel,
    "seed_example": render_seed,
    "wide": render_wide,
    "calculators": render_calculators,
    "out_of_core": render_out_of_core,
    "cnn": render_cnn,
    "kronfluence": render_kronfluence,
    "lds_bert": render_lds_bert,
}

#: The heading of each section, for a section whose data is missing or whose measuring failed.
TITLES = {
    "digits": "Digits MLP: every method, in memory",
    "loo": "Validation against leave-one-out retraining",
    "lds": "Linear datamodeling score (LDS)",
    "mislabel": "Mislabel detection",
    "seed_example": "Seed example: sequential calculator",
    "wide": "Wide MLP: CG and the approximations, in memory",
    "calculators": "Wide MLP: sequential to zarr and on Dask",
    "out_of_core": "Out of core: streamed to zarr",
    "cnn": "Small CNN on 8×8 digits: K-FAC and EK-FAC",
    "kronfluence": "EK-FAC reference: infscale and kronfluence",
    "lds_bert": "Linear datamodeling score on the tiny BERT",
}
