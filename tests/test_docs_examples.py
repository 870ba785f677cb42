"""The Python examples of docs/transformers.md run as written (tiny models built from configs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "import torch" in b]


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["bert", "gpt2"])
def test_example_runs(index, capsys):
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([3, 32])" in printed if index == 0 else printed.count("torch.Size([2, 6])") == 3
    scores = namespace["scores"]
    assert bool(scores.isfinite().all())
