"""The file format of fitted EK-FAC factors: one safetensors file with the tensors of every layer
(``"<block>/<name>"``) and a JSON record of the layers and the settings that determine them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .ekfac_factors import _Layer

__all__ = ["write_factors", "read_factors"]

FORMAT = "infscale.ekfac/1"
#: settings a file must share with the model that loads it
CHECKED = ("loss", "fisher", "update_diagonal")


def _layer_shapes(layers: Sequence[_Layer]) -> dict[str, list]:
    return {ly.block: [ly.kind, ly.d_out, ly.d_in] for ly in layers}


def write_factors(
    path: str | Path, layers: Sequence[_Layer], factors: Mapping[str, Mapping[str, Tensor]], record: dict
) -> None:
    """Write ``factors`` (name → block → tensor) of ``layers`` to a safetensors file at ``path``, with
    the layers' shapes and ``record`` (JSON-ready: the settings of ``CHECKED`` and anything else)."""
    from safetensors.torch import save_file

    tensors = {
        f"{ly.block}/{name}": by_block[ly.block].detach().contiguous().cpu()
        for name, by_block in factors.items()
        for ly in layers
    }
    meta = {"format": FORMAT, "layers": _layer_shapes(layers), **record}
    save_file(tensors, str(path), metadata={"infscale": json.dumps(meta)})


def read_factors(
    path: str | Path,
    layers: Sequence[_Layer],
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
        factors = {
            name: {ly.block: fh.get_tensor(f"{ly.block}/{name}").to(device, dtype) for ly in layers}
            for name in names
        }
    return factors, meta
