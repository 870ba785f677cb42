"""The file format of fitted EK-FAC factors: one safetensors file with the tensors of every block
(``"<block>/<name>"``; a block stores only the tensors it has: an embedding has no eigenbasis on its
vocabulary side, a diagonal block only its diagonal) and a JSON record of the blocks (kind, rows,
cols) and the settings that determine them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .ekfac_layers import Block

__all__ = ["write_factors", "read_factors", "FactorFile"]

FORMAT = "infscale.ekfac/1"
#: settings a file must share with the model that loads it
CHECKED = ("loss", "fisher", "update_diagonal")


def _layer_shapes(blocks: Sequence[Block]) -> dict[str, list]:
    return {b.name: [b.kind, b.rows, b.cols] for b in blocks}


def write_factors(
    path: str | Path, layers: Sequence[Block], factors: Mapping[str, Mapping[str, Tensor]], record: dict
) -> None:
    """Write ``factors`` (name → block → tensor; blocks may lack some names) of the blocks ``layers``
    to a safetensors file at ``path``, with the blocks' shapes and ``record`` (JSON-ready: the
    settings of ``CHECKED`` and anything else)."""
    from safetensors.torch import save_file

    tensors = {
        f"{b.name}/{name}": by_block[b.name].detach().contiguous().cpu()
        for name, by_block in factors.items()
        for b in layers
        if b.name in by_block
    }
    meta = {"format": FORMAT, "layers": _layer_shapes(layers), **record}
    save_file(tensors, str(path), metadata={"infscale": json.dumps(meta)})


def read_factors(
    path: str | Path,
    layers: Sequence[Block],
    names: Sequence[str],
    settings: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """The factors ``names`` (name → block → tensor, on ``device`` in ``dtype``) of a file written by
    ``write_factors``, and its record.

    Raises:
        ValueError: the file is not an infscale EK-FAC file, or its layers (kind, d_out, d_in) or
            one of the ``CHECKED`` settings differ from ``layers`` and ``settings``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("infscale")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"load_factors(): {str(path)!r} is not an infscale EK-FAC factor file.")
        expected = _layer_shapes(layers)
        if meta["layers"] != expected:
            raise ValueError(
                f"load_factors(): the file's layers {meta['layers']} (kind, d_out, d_in) differ "
                f"from this model's {expected}."
            )
        for key in CHECKED:
            if meta[key] != settings[key]:
                raise ValueError(
                    f"load_factors(): the factors were fitted with {key}={meta[key]!r}, but this "
                    f"model has {key}={settings[key]!r}; create it with the same setting."
                )
        keys = set(fh.keys())
        factors = {
            name: {
                b.name: fh.get_tensor(f"{b.name}/{name}").to(device, dtype)
                for b in layers
                if f"{b.name}/{name}" in keys
            }
            for name in names
        }
    return factors, meta


class FactorFile:
    """``save_factors`` / ``load_factors`` of ``EkfacInfluence`` (a mixin: it reads and sets the
    fitted factors, the settings and the fitted state of the model it is mixed into)."""

    def _factor_names(self) -> tuple[str, ...]:
        return ("eigenvectors_A", "eigenvalues_A", "eigenvectors_G", "eigenvalues_G", "diagonal")

    def _factor_settings(self) -> dict[str, Any]:
        return {
            "loss": None if self.loss_type is None else self.loss_type.value,
            "fisher": self.fisher.value,
            "update_diagonal": self.update_diagonal,
        }

    def save_factors(self, path: str | Path) -> None:
        """Write the fitted eigenbases, eigenvalues and diagonals to a safetensors file.

        The file also records the blocks, their kinds and shapes and the settings that determine the
        factors (loss, fisher, update_diagonal, seed); ``load_factors`` checks them.
        """
        self._require_fitted("save_factors")
        shape = list(self._feature_shape) if self._feature_shape is not None else None
        record = {
            **self._factor_settings(),
            "seed": self.seed,
            "n_train": self.n_train,
            "feature_shape": shape,
        }
        write_factors(path, self.blocks, {name: getattr(self, name) for name in self._factor_names()}, record)

    def load_factors(self, path: str | Path) -> FactorFile:
        """Load factors written by ``save_factors`` (for the same architecture and settings)
        and mark the model fitted. Returns self.

        Raises:
            ValueError: the file is not an infscale EK-FAC file, or its layers, shapes, loss,
                fisher or update_diagonal differ from this model's.
        """
        names = self._factor_names()
        factors, meta = read_factors(
            path, self.blocks, names, self._factor_settings(), self.device, self.factor_dtype
        )
        for name in names:
            getattr(self, name).clear()
            getattr(self, name).update(factors[name])
        self.n_train = meta.get("n_train")
        shape = meta.get("feature_shape")
        self._feature_shape = tuple(shape) if shape is not None else None
        self._denominators = {}
        self._fitted = True
        return self
