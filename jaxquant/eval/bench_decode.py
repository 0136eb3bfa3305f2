"""Decode speed and memory of the quantized transformer, as ratios against float in one run.

A model with SmolLM2-135M's shapes (random weights: speed and bytes don't depend on the values)
is served with each recipe, with the KV cache in float and in int8. For each combination and
batch size: prefill ``prompt_len`` tokens, then ``decode_steps`` jitted decode steps (one token
per sequence each); compilation and one warm-up step are excluded. Steps are timed one by one
(``block_until_ready``), interleaved over the combinations in rounds, so a burst of load from
elsewhere hits them alike; the reported step time is the median.

Memory is computed from the arrays held: the serving params (a :class:`~jaxquant.core.QArray`
counts its packed codes plus scales) and the KV cache at its full capacity. Where the device
reports it, ``memory_stats()["peak_bytes_in_use"]`` is recorded too (None on CPU).

Recipes (``RECIPES``): the block projections and the tied embedding / head are quantized alike.
Groups of "g128" fall back to the largest divisor of the input width (96 for SmolLM2's 576).
The ``w4a8`` / ``w3a8`` / ``w2a8`` recipes are the weight-only ones with dynamic int8
activations (one scale per row) added to every rule: their product is the integer one
(:mod:`jaxquant.core.w4a8`), where the weight-only recipes multiply float activations.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.core.dot_config import DotGeneralConfig, w8a8, weight_only
from jaxquant.core.spec import QuantSpec
from jaxquant.nn import (
    QuantMode,
    QuantRule,
    Transformer,
    TransformerConfig,
    decode_step,
    init_kv_cache,
    kv_cache_bytes,
    param_bytes,
    prefill,
    quantize_params,
)
from jaxquant.ptq.pipeline import effective_group, serving_config
from jaxquant.ptq.recipe import Recipe

# name -> (compute/param dtype, Recipe of the block projections or None for float)
RECIPES: dict[str, tuple[str, Recipe | None]] = {
    "f32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8_wo": ("float32", Recipe(method="rtn", qtype="int8")),
    "int4_g128_wo": ("float32", Recipe(method="rtn", qtype="int4", group_size=128)),
    "w8a8": ("float32", Recipe(method="w8a8")),
    "w4a8_g128": ("float32", Recipe(method="rtn", qtype="int4", group_size=128)),
    "w3a8_g128": ("float32", Recipe(method="rtn", qtype="int3", group_size=128)),
    "w2a8_g64": ("float32", Recipe(method="rtn", qtype="int2", group_size=64)),
}
# Recipes whose every quantized product also takes dynamic int8 activations (per row).
INT8_ACTIVATIONS = frozenset({"w4a8_g128", "w3a8_g128", "w2a8_g64"})
# The default set: what the goals need (the int3 / int2 W*A8 rows on request).
DEFAULT_RECIPES = ("f32", "bf16", "int8_wo", "int4_g128_wo", "w8a8", "w4a8_g128")
KV_CACHES = (None, "int8")


def _head_config(cfg: TransformerConfig, recipe: Recipe) -> DotGeneralConfig:
    if recipe.method == "w8a8":
        return w8a8()
    return weight_only(recipe.qtype, effective_group(cfg.d_model, recipe.group_size))


def recipe_config(base: TransformerConfig, name: str, kv_cache: str | None) -> TransformerConfig:
    """``base`` served with recipe ``name`` (projections and tied head) and this KV cache."""
    dtype, recipe = RECIPES[name]
    cfg = dataclasses.replace(base, dtype=dtype, param_dtype=dtype, kv_cache_qtype=kv_cache)
    if recipe is None:
        return dataclasses.replace(cfg, quant_rules=())
    cfg = serving_config(cfg, recipe)
    head = QuantRule(r"(^|/)(embed|lm_head)$", _head_config(cfg, recipe))
    rules = cfg.quant_rules + (head,)
    if name in INT8_ACTIVATIONS:
        act = QuantSpec(qtype="int8")
        rules = tuple(dataclasses.replace(r, config=dataclasses.replace(r.config, lhs=act))
                      for r in rules)
    return dataclasses.replace(cfg, quant_rules=rules)


def float_params(cfg: TransformerConfig, seed: int = 0):
    """Random float params of ``cfg``'s shapes at ``cfg.param_dtype``: kernels and embeddings
    ``N(0, init_std)``, norm scales 1. Drawn with numpy (much faster on CPU than ``init``)."""
    model = Transformer(dataclasses.replace(cfg, quant_rules=()))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), *model.example_inputs())["params"])
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if path[-1].key == "scale":
            return jnp.ones(x.shape, x.dtype)
        v = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(cfg.init_std)
        return jnp.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def serving_params(cfg: TransformerConfig, params=None, seed: int = 0):
    """``(SERVE-mode model, serving params)`` of ``cfg``: its rules applied to float ``params``
    (random from :func:`float_params` if None), each quantized kernel a packed QArray."""
    params = float_params(cfg, seed) if params is None else params
    if cfg.quant_rules:
        params, _ = quantize_params(params, cfg.quant_rules, warn=False)
    return Transformer(cfg, mode=QuantMode.SERVE), jax.block_until_ready(params)


def memory_row(cfg: TransformerConfig, params, batch: int, max_len: int) -> dict:
    """Bytes held for decoding: params (codes + scales) and the KV cache at capacity."""
    p = param_bytes(params)
    kv = kv_cache_bytes(cfg, batch, max_len, qtype=cfg.kv_cache_qtype)
    return {"param_bytes": p, "kv_cache_bytes": kv, "total_bytes": p + kv}


def _device_peak_bytes():
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class _Run:
    """One (recipe, kv cache, batch) combination being decoded."""

    name: str
    kv: str | None
    batch: int
    model: Transformer
    params: object
    cache: object = None
    step_s: list = dataclasses.field(default_factory=list)
    prefill_s: float | None = None

    def start(self, cfg, prompt_len: int, max_len: int, run_prefill: bool):
        tokens = jnp.ones((self.batch, prompt_len), jnp.int32)
        cache = init_kv_cache(cfg, self.batch, max_len)
        if not run_prefill:  # the step's cost doesn't depend on the cached values
            self.cache = cache._replace(length=jnp.asarray(prompt_len, jnp.int32))
            return
        jax.block_until_ready(prefill(self.model, self.params, tokens, cache, donate=True))  # jit
        cache = init_kv_cache(cfg, self.batch, max_len)
        t0 = time.perf_counter()
        _, self.cache = jax.block_until_ready(
            prefill(self.model, self.params, tokens, cache, donate=True)
        )
        self.prefill_s = time.perf_counter() - t0

    def steps(self, n: int, *, timed: bool = True):
        tok = jnp.ones((self.batch, 1), jnp.int32)
        for _ in range(n):
            t0 = time.perf_counter()
            _, self.cache = jax.block_until_ready(
                decode_step(self.model, self.params, tok, self.cache, donate=True)
            )
            if timed:
                self.step_s.append(time.perf_counter() - t0)


def run(
    base: TransformerConfig | None = None,
    *,
    recipes: Sequence[str] = DEFAULT_RECIPES,
    kv_caches: Sequence[str | None] = KV_CACHES,
    batches: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    decode_steps: int = 128,
    rounds: int = 8,
    run_prefill: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Decodes every (recipe, KV cache, batch) combination and reports speed and bytes.

    Args:
      base: model shapes (default SmolLM2-135M's).
      recipes: names from ``RECIPES`` (default ``DEFAULT_RECIPES``); ``f32`` and ``bf16`` are
        always included (the baselines).
      kv_caches: None (float, the compute dtype) and / or ``"int8"``.
      batches: batch sizes.
      prompt_len: prefill length.
      decode_steps: timed decode steps per combination (after one untimed warm-up step).
      rounds: the steps are run in this many rounds, each visiting every combination.
      run_prefill: prefill the prompt (and time it); False marks ``prompt_len`` tokens as cached
        without computing them (zeros: a step costs the same), saving a compilation per row.
      seed: weight seed.
      progress: show a progress bar.

    Returns:
      A JSON-ready dict with a row per combination: median step time, tokens per second,
      bytes, and the ratios of both against ``f32`` and ``bf16`` with the same KV cache and batch.
    """
    base = base or TransformerConfig.smollm2_135m()
    recipes = list(dict.fromkeys(["f32", "bf16", *recipes]))
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise ValueError(f"Unknown recipes {sorted(unknown)}; choose from {sorted(RECIPES)}.")
    max_len = prompt_len + decode_steps + 1  # + the warm-up step
    if max_len > base.max_seq_len:
        raise ValueError(f"prompt_len + decode_steps + 1 = {max_len} > max_seq_len.")
    rounds = max(1, min(rounds, decode_steps))
    combos = [(r, kv, b) for r in recipes for kv in kv_caches for b in batches]
    bar = tqdm(total=len(combos) * (decode_steps + 1), desc="decode", unit="step",
               disable=not progress)
    runs, cfgs = [], {}
    for name in recipes:
        for kv in kv_caches:
            cfgs[name, kv] = recipe_config(base, name, kv)
    floats = {}  # float params per dtype, quantized per recipe
    for name in recipes:  # one set of params per recipe, shared by its KV caches and batches
        cfg = cfgs[name, kv_caches[0]]
        if cfg.param_dtype not in floats:
            floats[cfg.param_dtype] = float_params(cfg, seed)
        _, params = serving_params(cfg, floats[cfg.param_dtype])
        for kv in kv_caches:
            model_kv = Transformer(cfgs[name, kv], mode=QuantMode.SERVE)
            for b in batches:
                bar.set_postfix_str(f"compile {name} kv={kv or 'float'} B={b}")
                r = _Run(name, kv, b, model_kv, params)
                r.start(cfgs[name, kv], prompt_len, max_len, run_prefill)
                r.steps(1, timed=False)  # compiles the step
                bar.update(1)
                runs.append(r)
    per_round = [decode_steps // rounds + (i < decode_steps % rounds) for i in range(rounds)]
    for n in per_round:
        for r in runs:
            bar.set_postfix_str(f"{r.name} kv={r.kv or 'float'} B={r.batch}")
            r.steps(n)
            bar.update(n)
    bar.close()
    rows = []
    for r in runs:
        step = statistics.median(r.step_s)
        rows.append({
            "recipe": r.name, "kv_cache": r.kv or "float", "batch": r.batch,
            "median_step_ms": step * 1e3, "step_ms": [t * 1e3 for t in r.step_s],
            "tokens_per_s": r.batch / step,
            "prefill_tokens_per_s": r.prefill_s and r.batch * prompt_len / r.prefill_s,
            **memory_row(cfgs[r.name, r.kv], r.params, r.batch, max_len),
        })
    _add_ratios(rows)
    return {
        "model": "SmolLM2-135M shapes, random weights (speed and bytes don't depend on values)",
        "n_params": n_params(base),
        "prompt_len": prompt_len, "prefill_run": run_prefill, "decode_steps": decode_steps,
        "rounds": rounds,
        "kv_capacity_tokens": max_len, "statistic": "median step time",
        "donate": True,
        "device_peak_bytes_in_use": _device_peak_bytes(),
        "peak_bytes_method": "analytic: serving params (codes + scales) + KV cache at capacity",
        "rows": rows,
    }


def n_params(cfg: TransformerConfig) -> int:
    """Parameters of the float model of ``cfg``'s shapes."""
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def _add_ratios(rows: list[dict]) -> None:
    """Speedup (tok/s ratio) and memory reduction (bytes ratio) vs f32 / bf16 at the same batch.

    Both baselines keep their KV cache in float: ``int8`` KV rows are compared with float-KV
    baselines, so the ratio shows what the whole recipe (weights and cache) buys.
    """
    base = {(r["recipe"], r["kv_cache"], r["batch"]): r for r in rows}
    for r in rows:
        for ref in ("f32", "bf16"):
            b = base.get((ref, "float", r["batch"]))
            if b is None:
                continue
            r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / b["tokens_per_s"]
            r[f"memory_reduction_vs_{ref}"] = b["total_bytes"] / r["total_bytes"]


def markdown_table(result: dict) -> str:
    lines = [
        "| recipe | KV cache | batch | tok/s | vs f32 | vs bf16 | params MB | KV MB | "
        "total MB | smaller than f32 | smaller than bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['kv_cache']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
            f"{r.get('speedup_vs_f32', float('nan')):.2f}x | "
            f"{r.get('speedup_vs_bf16', float('nan')):.2f}x | {r['param_bytes'] / 1e6:.1f} | "
            f"{r['kv_cache_bytes'] / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} | "
            f"{r.get('memory_reduction_vs_f32', float('nan')):.2f}x | "
            f"{r.get('memory_reduction_vs_bf16', float('nan')):.2f}x |"
        )
    return "\n".join(lines)
