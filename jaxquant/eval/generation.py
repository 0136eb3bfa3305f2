"""Text generation with the KV cache, from a prompt string."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxquant.eval import tasks
from jaxquant.models.registry import LoadedModel
from jaxquant.nn.decode import generate
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.recipe import Recipe


def generate_text(model: LoadedModel, prompt: str, *, recipe: Recipe | None = None,
                  max_new_tokens: int = 40, temperature: float = 0.0,
                  kv_cache_qtype: str = "float", seed: int = 0) -> dict:
    """Greedy (``temperature=0``) or sampled continuation of ``prompt``.

    Calibration-free recipes (fp32, rtn, w8a8) are applied on the fly.
    """
    recipe = recipe or Recipe(method="fp32")
    cfg, params, info = tasks.quantize(model, recipe, calib_windows=8, calib_len=256)
    mode = QuantMode.SERVE if cfg.quant_rules else QuantMode.TRAIN
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("The prompt is empty after tokenization; give some text.")
    t0 = time.perf_counter()
    out = generate(Transformer(cfg, mode=mode), params, jnp.asarray([ids], jnp.int32),
                   max_new_tokens, temperature=temperature,
                   key=jax.random.key(seed) if temperature > 0 else None,
                   kv_cache_qtype=None if kv_cache_qtype == "float" else kv_cache_qtype)
    new = [int(t) for t in out[0, len(ids):]]
    seconds = time.perf_counter() - t0
    return {"model": model.name, "recipe": recipe.name, "prompt": prompt,
            "completion": model.tokenizer.decode(new), "tokens": new,
            "kv_cache": kv_cache_qtype, "seconds": seconds,
            "tokens_per_second": max_new_tokens / max(seconds, 1e-9)}
