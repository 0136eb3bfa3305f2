"""Model-level PTQ, block by block: :func:`quantize_blocks` for any
:class:`~jaxquant.nn.block_stack.BlockStack`, :func:`quantize_model` for the LLaMA
:class:`~jaxquant.nn.Transformer`.

Calibration-based algorithms run block by block, as in the GPTQ paper: the calibration windows
go through the model's input stage once; each block is run in float on the outputs of the
*already-quantized* blocks before it while the inputs of its linears are captured
(``nn.intercept_methods``), its weights are quantized, and the quantized block then produces the
inputs of the next block.

The driver knows neither the algorithms nor the architecture: what to measure, what to fold
and how to quantize one linear is the algorithm's (:class:`~jaxquant.ptq.algorithm.PTQAlgorithm`,
found by the recipe's method in :data:`~jaxquant.ptq.registry.ALGORITHMS`); how to embed, which
blocks there are and how to run one, which linears share an input and where a scale of it folds
is the model's :class:`~jaxquant.nn.block_stack.BlockStack` (for the LLaMA,
:class:`~jaxquant.nn.transformer.TransformerStack` and
:func:`~jaxquant.nn.transformer.block_sites`).

The result is always serving params (QArray kernels) for the stack's served model
(``Transformer(serve_cfg, SERVE)``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from jaxquant.nn.block_stack import BlockStack, block_output
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.rules import QuantRule
from jaxquant.nn.sites import SiteTable
from jaxquant.nn.transformer import TransformerStack
from jaxquant.ptq import folding
from jaxquant.ptq.algorithm import PTQAlgorithm, SiteInputs, Stat, effective_group
from jaxquant.ptq.gptq import GPTQConfig
from jaxquant.ptq.hessian import InputStats, stats_init, stats_update
from jaxquant.ptq.options import PTQOptions
from jaxquant.ptq.recipe import Recipe

__all__ = ["GPTQConfig", "PTQOptions", "effective_group", "layer_group_sizes",
           "quantize_blocks", "quantize_model", "serving_config"]


def _stack(model: TransformerConfig | BlockStack) -> BlockStack:
    return model if isinstance(model, BlockStack) else TransformerStack(model)


def layer_group_sizes(model: TransformerConfig | BlockStack,
                      recipe: Recipe) -> dict[str, int | None] | None:
    """The group size each block linear is quantized with (:func:`effective_group` of the
    recipe's), by module path inside a block (``{"attn/q_proj": 96, ..., "mlp/down_proj": 128}``
    for ``g128`` on SmolLM2); None when the recipe has no weight groups. ``model``: a
    Transformer's config or any :class:`~jaxquant.nn.block_stack.BlockStack`."""
    dot = recipe.dot_config
    if dot is None or dot.rhs is None or dot.rhs.group_size is None:
        return None
    return {lin: effective_group(site.d_in, dot.rhs.group_size)
            for site in _stack(model).sites for lin in site.linears}


def _projection_rules(sites: SiteTable, recipe: Recipe, prefix: str) -> tuple:
    base = recipe.dot_config
    if base is None:
        return ()
    rules = []
    for site in sites:
        dot = base
        if base.rhs is not None and base.rhs.group_size is not None:
            rhs = dataclasses.replace(base.rhs, group_size=effective_group(site.d_in,
                                                                           base.rhs.group_size))
            dot = dataclasses.replace(base, rhs=rhs)
        rules.extend(QuantRule(rf"{prefix}{lin}$", dot) for lin in site.linears)
    return tuple(rules)


def serving_config(model: TransformerConfig | BlockStack, recipe: Recipe):
    """The config the quantized model serves with: block projections quantized (per-layer
    group sizes from :func:`effective_group`), the rest (embeddings, head) as the model has
    it. ``model``: a Transformer's config (returns a ``TransformerConfig``) or any
    :class:`~jaxquant.nn.block_stack.BlockStack` (returns its ``serving`` config)."""
    stack = _stack(model)
    return stack.serving(_projection_rules(stack.sites, recipe, stack.block_prefix))


def _make_capture(stack: BlockStack, sites: SiteTable):
    """``capture(block_params, x, extras) -> {site: input}`` for every site, and
    ``capture_site(name)(...) -> input`` of one site. Only the captured inputs are returned,
    so XLA drops the rest of the block: sequential GPTQ's early stages cost a fraction of a
    block."""
    block = stack.block(None, QuantMode.TRAIN)
    first = {site.linears[0]: site.name for site in sites}

    def trace(block_params, x, extras):
        seen = {}

        def interceptor(next_fun, args, kwargs, ctx):
            path = "/".join(ctx.module.path)
            if ctx.method_name == "__call__" and path in first:
                seen[first[path]] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            block.apply({"params": block_params}, x, *extras)
        missing = [site.name for site in sites if site.name not in seen]
        if missing:
            raise ValueError(f"The block's forward never called the first linear of sites "
                             f"{missing} ({[sites[m].linears[0] for m in missing]}): fix the "
                             "site table's paths.")
        return {site.name: seen[site.name] for site in sites}

    @functools.cache
    def capture_site(name):
        return jax.jit(lambda bp, x, extras: trace(bp, x, extras)[name])

    return jax.jit(trace), capture_site


def _make_serve(stack: BlockStack, rules: tuple):
    block = stack.block(rules, QuantMode.SERVE)

    @jax.jit
    def run(block_params, x, extras):
        return block_output(block.apply({"params": block_params}, x, *extras))

    return run


def _batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclasses.dataclass(frozen=True)
class _Calib:
    """The calibration inputs of the current block and how to look inside it."""

    h: jax.Array  # [n, length, D] inputs of the block
    extras: tuple  # the block's other arguments, leading axis n (the LLaMA's positions)
    batches: list
    capture: Any
    capture_site: Any
    stride: int  # token stride of the kept samples
    max_sample: int

    def measure(self, step, hessian: bool, sample: bool, names):
        """Runs ``step(x, extras) -> {site: input}`` over the batches; returns
        ``{site: SiteInputs}`` with the statistics (Hessian only if asked) and samples."""
        stats: dict[str, InputStats] = {}
        kept: dict[str, list] = {name: [] for name in names}
        for a, b in self.batches:
            for name, x in step(self.h[a:b], _rows(self.extras, a, b)).items():
                if name not in stats:
                    stats[name] = stats_init(x.shape[-1], hessian=hessian)
                stats[name] = stats_update(stats[name], x)
                if sample:
                    kept[name].append(x.reshape(-1, x.shape[-1])[::self.stride])
        return {name: SiteInputs(stats=stats[name], raw_sample=(
            jnp.concatenate(kept[name])[: self.max_sample] if sample else None)) for name in names}


def _rows(extras: tuple, a: int, b: int) -> tuple:
    return tuple(e[a:b] for e in extras)


def _capture_one(capture, block_params, name, x, extras):
    return {name: capture(block_params, x, extras)}


def _fold(algo: PTQAlgorithm, sites: SiteTable, flat: dict, measured: dict) -> tuple[dict, dict]:
    """The algorithm's scales of the float block, folded. Returns ``(params, scales)``: the
    folded params (path -> array) compute the same function in float; ``scales[site]`` divides
    the inputs of that site's linears."""
    scales = {}
    for site in sites:
        if site.fold_into is None:
            continue
        s = algo.site_scale(site, measured.get(site.name, SiteInputs()),
                            [flat[k] for k in site.kernels], flat)
        if s is not None:
            scales[site.name] = s
    for site in sites:  # in execution order: a later fold sees the earlier ones
        if site.name in scales:
            prev, ks = folding.fold_scales(flat[site.fold_into], [flat[k] for k in site.kernels],
                                           scales[site.name])
            flat = {**flat, site.fold_into: prev, **dict(zip(site.kernels, ks, strict=True))}
    return flat, scales


def _quantize_block(algo: PTQAlgorithm, sites: SiteTable, bp: dict, cal: _Calib | None) -> dict:
    """One block: measure, fold, quantize. Returns the block's serving params. ``cal`` may be
    None for an algorithm that needs no calibration (RTN: the result is exactly ``convert``'s)."""
    flat = traverse_util.flatten_dict(jax.tree.map(jnp.asarray, bp), sep="/")
    for site in sites:
        for k in site.kernels:
            if k not in flat:
                raise ValueError(f"The site table's {site.name} names {k}, which the block's "
                                 f"params do not have: fix the model's site table.")
            if flat[k].shape[0] != site.d_in:
                raise ValueError(f"The site table says {site.name} is {site.d_in} wide, but "
                                 f"{k} is {flat[k].shape}: fix the model's site table.")
    hessian, sample = Stat.HESSIAN in algo.needs, Stat.SAMPLE in algo.needs
    one_shot = not algo.sequential
    names = [site.name for site in sites]
    measured = {}
    if algo.fold_needs or (algo.needs and one_shot):  # one pass of the float block
        measured = cal.measure(functools.partial(cal.capture, bp),
                               Stat.HESSIAN in algo.fold_needs or (hessian and one_shot),
                               Stat.SAMPLE in algo.fold_needs or (sample and one_shot), names)
    flat, scales = _fold(algo, sites, flat, measured)
    out = dict(flat)
    cur = dict(flat)  # sequential: the block with the earlier sites' linears quantized
    for site in sites:
        if one_shot:
            inputs = dataclasses.replace(measured.get(site.name, SiteInputs()),
                                         scale=scales.get(site.name))
        else:  # this site's inputs, through the block with the earlier sites quantized
            step = functools.partial(_capture_one, cal.capture_site(site.name),
                                     traverse_util.unflatten_dict(cur, sep="/"), site.name)
            inputs = cal.measure(step, hessian, sample, [site.name])[site.name]
        for lin, path in zip(site.linears, site.kernels, strict=True):
            k = flat[path]
            q = algo.quantize_linear(k, algo.weight_spec(k.shape[0]), inputs, site=site,
                                     linear=lin)
            out = {**out, path: q}
            if not one_shot:
                cur = {**cur, path: q.dequantize().astype(k.dtype)}
    return traverse_util.unflatten_dict(out, sep="/")


def quantize_model(
    cfg: TransformerConfig,
    params: dict,
    recipe: Recipe,
    calib_tokens: np.ndarray | None = None,
    *,
    options: PTQOptions | None = None,
    progress: bool = True,
) -> tuple[TransformerConfig, dict, dict[str, Any]]:
    """Post-training quantization of a :class:`~jaxquant.nn.Transformer`
    (:func:`quantize_blocks` on its :class:`~jaxquant.nn.transformer.TransformerStack`).

    Args:
      cfg: the float model's config.
      params: its float params.
      recipe: what to do (:func:`~jaxquant.ptq.recipe.parse_recipe`).
      calib_tokens: ``[n, length]`` calibration windows (needed by gptq / awq / smoothquant).
      options: :class:`PTQOptions` (None: the defaults).
      progress: show a progress bar over blocks.

    Returns:
      ``(serve_cfg, serve_params, info)``: run with ``Transformer(serve_cfg, SERVE)``;
      ``info`` has the quantization time in ``seconds`` and, for grouped recipes,
      ``group_sizes``: the group size of each block linear (:func:`layer_group_sizes`).
    """
    return quantize_blocks(TransformerStack(cfg), params, recipe, calib_tokens, options=options,
                           progress=progress)


def quantize_blocks(
    stack: BlockStack,
    params: dict,
    recipe: Recipe,
    calib_tokens: np.ndarray | None = None,
    *,
    options: PTQOptions | None = None,
    progress: bool = True,
) -> tuple[Any, dict, dict[str, Any]]:
    """Post-training quantization of any model described by a
    :class:`~jaxquant.nn.block_stack.BlockStack`, block by block.

    Args:
      stack: the model's stack (the LLaMA's: ``TransformerStack(cfg)``).
      params: its float params (``params[key]`` for each of ``stack.block_keys``; the other
        top-level entries are kept as they are).
      recipe: what to do (:func:`~jaxquant.ptq.recipe.parse_recipe`).
      calib_tokens: ``[n, length]`` calibration windows (needed by gptq / awq / smoothquant).
      options: :class:`PTQOptions` (None: the defaults).
      progress: show a progress bar over blocks.

    Returns:
      ``(serve_cfg, serve_params, info)``: ``serve_cfg`` is ``stack.serving(rules)``;
      ``info`` as :func:`quantize_model`'s.
    """
    t0 = time.perf_counter()
    options = options or PTQOptions()
    algo = recipe.algorithm(options)
    if recipe.dot_config is None:
        return stack.serving(None), params, {"seconds": 0.0}
    sites = stack.sites
    algo.check(sites)
    serve_cfg = serving_config(stack, recipe)
    info: dict[str, Any] = {}
    if (groups := layer_group_sizes(stack, recipe)) is not None:
        info["group_sizes"] = groups
    keys = stack.block_keys
    if missing := [k for k in keys if k not in params]:
        raise ValueError(f"params have no {missing[:3]}: the stack's blocks are {list(keys)}.")
    out_params = {k: v for k, v in params.items() if k not in keys}
    bar = tqdm(keys, desc=f"{recipe.name} blocks", disable=not progress)
    if not algo.calibrated:
        for key in bar:
            out_params = {**out_params, key: _quantize_block(algo, sites, params[key], None)}
        jax.block_until_ready(out_params)
        return serve_cfg, out_params, {"seconds": time.perf_counter() - t0, **info}
    if calib_tokens is None:
        raise ValueError(f"{recipe.method} needs calibration data: pass calib_tokens [n, length].")
    calib = jnp.asarray(calib_tokens, jnp.int32)
    n, length = calib.shape
    serve = _make_serve(stack, _projection_rules(sites, recipe, r"^"))
    capture, capture_site = _make_capture(stack, sites)
    h, extras = stack.block_inputs(params, calib)
    batches = _batches(n, options.batch_windows)
    stride = max(1, (n * length) // options.awq_tokens)
    for key in bar:
        cal = _Calib(h, extras, batches, capture, capture_site, stride, options.awq_tokens)
        qbp = _quantize_block(algo, sites, params[key], cal)
        h = jnp.concatenate([serve(qbp, h[a:b], _rows(extras, a, b)) for a, b in batches])
        out_params = {**out_params, key: qbp}
    return serve_cfg, out_params, {"seconds": time.perf_counter() - t0, **info}
