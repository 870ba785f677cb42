"""``infscale demo`` end to end at a reduced size, checked against an explicit float64 Hessian."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from helpers import flat_forward
from PIL import Image
from torch import nn

from infscale import demo
from infscale.cli import main

LAMBDA = 0.1  # the tiny MLP's Hessian has eigenvalues down to about -0.02


def _explicit_influences(size, seed=0):
    """Test × train influences and training self-influences from torch.autograd.functional.hessian
    of the mean training loss in float64 (an independent path from the library's)."""
    data = demo.load_data(size, seed)
    model, _ = demo.train_model(data, size, seed, progress=False)
    model = model.double()
    forward, theta = flat_forward(model)

    def loss(flat, x, y):
        return nn.functional.cross_entropy(forward(flat, x), y)

    x_tr, y_tr = data.x_train.double(), data.y_train
    x_te, y_te = data.x_test.double(), data.y_test
    H = torch.autograd.functional.hessian(lambda t: loss(t, x_tr, y_tr), theta, vectorize=True)

    def grads(x, y):
        per_sample = torch.func.grad(lambda t, xi, yi: loss(t, xi[None], yi[None]))
        return torch.func.vmap(per_sample, in_dims=(None, 0, 0))(theta, x, y)

    g_tr, g_te = grads(x_tr, y_tr), grads(x_te, y_te)
    A = H + LAMBDA * torch.eye(len(theta), dtype=torch.float64)
    solved = torch.linalg.solve(A, g_tr.T)  # (p, n_train)
    return data, (g_te @ solved).numpy(), (g_tr * solved.T).sum(1).numpy()


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo", "--out", str(out), "--size", "tiny", "--no-progress",
        "--param", "second_order_mode=hessian", "--param", f"hessian_regularization={LAMBDA}",
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest
    try:
        data, influences, self_influences = _explicit_influences(demo.SIZES["tiny"])
    finally:
        torch.set_num_threads(threads)
    group = zarr.open_group(str(out / "influences.zarr"), mode="r")
    stored = group["influences"][:]
    assert stored.shape == influences.shape == (24, 200)
    scale = np.abs(influences).max()
    np.testing.assert_allclose(stored, influences, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(group["self_influences"][:], self_influences, rtol=1e-3, atol=1e-4 * scale)
    assert sorted(group.attrs["flipped"]) == list(np.flatnonzero(data.flipped))
    assert group["top_helpful_indices"].shape == (24, 10)

    # the printed findings: sign convention, helpful/harmful lists, the mislabel hunt vs chance
    assert "sign: influence = ∇ℓ(test)ᵀ (H + λI)⁻¹ ∇ℓ(train); positive = the training point helps" in text
    assert text.count("most helpful: #") == 3 and text.count("most harmful: #") == 3
    order = np.argsort(-self_influences)
    n_flipped = int(data.flipped.sum())
    for frac in (0.1, 0.2):
        k = int(round(frac * 200))
        hits = int(data.flipped[order[:k]].sum())
        assert f"top {100 * frac:.0f}% ({k} points): {hits} of {n_flipped} flipped labels found" in text
        assert hits > 2 * frac * n_flipped  # far better than chance
    assert "inspecting at random would find 2.0 (10%)" in text
    # the most helpful training point printed for the first shown test image is the true argmax
    first = int(text.split("test image #")[1].split(":")[0])
    assert f"most helpful: #{int(np.argmax(influences[first]))} " in text

    # the report: a PNG of the figure's size with 3 rows × (1 + 3 + 3) digits and the curve
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG"
        width, height = image.size
    n_cols = 1 + 2 * demo.K_SHOW
    assert (width, height) == (round((1.25 * n_cols + 0.4) * 80), round((1.55 * demo.N_SHOW + 3.4) * 80))


def test_report_panels(tmp_path):
    size = demo.SIZES["tiny"]
    data = demo.load_data(size)
    rng = np.random.default_rng(1)
    influences = rng.normal(size=(len(data.y_test), len(data.y_train)))
    self_infl = rng.normal(size=len(data.y_train)) + 5 * data.flipped
    curve = demo.recovery_curve(self_infl, data.flipped)
    assert curve[0][0] == 0 and curve[1][-1] == 1.0 and np.all(np.diff(curve[1]) >= 0)
    shown = demo.choose_tests(data.y_test.numpy(), data.y_test.numpy())
    assert len(shown) == demo.N_SHOW and len({int(data.y_test[i]) for i in shown}) == demo.N_SHOW
    n_axes = demo.draw_report(str(tmp_path / "r.png"), data, data.y_test.numpy(), influences, shown, curve,
                              {0.1: 3}, "X")  # fmt: skip
    assert n_axes == demo.N_SHOW * (1 + 2 * demo.K_SHOW) + 1
    with Image.open(tmp_path / "r.png") as image:
        image.verify()


def test_demo_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'; available: direct (DirectInfluence), cg (CgInfluence)" in err
