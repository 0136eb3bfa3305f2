"""Quantized checkpoints as the command line writes them: Orbax params plus a JSON sidecar.

Layout of ``DIR``::

    DIR/params/         the serving params (jaxquant.checkpoint: packed codes + scales)
    DIR/jaxquant.json   recipe, source model, base TransformerConfig, versions
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jaxquant import checkpoint
from jaxquant.nn.config import TransformerConfig
from jaxquant.ptq.pipeline import serving_config
from jaxquant.ptq.recipe import parse_recipe

SIDECAR = "jaxquant.json"
_SKIP = ("quant_rules", "attn_qk_config", "attn_pv_config")


def save_quantized(
    out: str | os.PathLike,
    serve_cfg: TransformerConfig,
    params: Any,
    info: dict,
    *,
    force: bool = False,
) -> Path:
    """Writes ``params`` and the sidecar; the previous checkpoint survives a failed save."""
    out = Path(out)
    base = {
        f.name: getattr(serve_cfg, f.name)
        for f in dataclasses.fields(serve_cfg)
        if f.name not in _SKIP
    }
    checkpoint.save(out / "params", params, force=force)
    sidecar = {"format": 1, "recipe": info["recipe"], "info": info, "transformer_config": base}
    tmp = out / (SIDECAR + ".tmp")
    tmp.write_text(json.dumps(sidecar, indent=2, default=str))
    tmp.replace(out / SIDECAR)
    return out


def load_quantized(directory: str | os.PathLike) -> tuple[TransformerConfig, Any, dict]:
    """Reads a checkpoint of :func:`save_quantized`: ``(serve_cfg, params, sidecar)``."""
    directory = Path(directory)
    side = directory / SIDECAR
    if not side.is_file():
        raise FileNotFoundError(
            f"{side} is missing: {directory} is not a checkpoint written by `jaxquant ptq --out`."
        )
    sidecar = json.loads(side.read_text())
    base = TransformerConfig.from_dict(sidecar["transformer_config"])
    serve_cfg = serving_config(base, parse_recipe(sidecar["recipe"]))
    return serve_cfg, checkpoint.restore(directory / "params"), sidecar
