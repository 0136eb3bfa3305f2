"""Model-level PTQ of the LLaMA :class:`~jaxquant.nn.Transformer`: RTN, GPTQ, AWQ, SmoothQuant.

Calibration-based methods run block by block, as in the GPTQ paper: the calibration windows
are embedded once; each decoder block is run in float on the outputs of the
*already-quantized* blocks before it while the inputs of its linears are captured
(``nn.intercept_methods``), its weights are quantized, and the quantized block then produces
the inputs of the next block.

Linears that share an input (one row per "input site" of a block):

==========  ====================  ===============================
site        linears               scale folds into
==========  ====================  ===============================
attn_in     q_proj, k_proj, v_proj  ``attn_norm``
o_in        o_proj                ``v_proj`` (only without GQA)
mlp_in      gate_proj, up_proj    ``mlp_norm``
down_in     down_proj             ``up_proj``
==========  ====================  ===============================

The result is always serving params (QArray kernels) for ``Transformer(serve_cfg, SERVE)``.
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
from tqdm.auto import tqdm

from jaxquant.core.dot_general import quantize_operand
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.linear import QDense
from jaxquant.nn.modes import QuantMode, convert
from jaxquant.nn.rules import QuantRule
from jaxquant.nn.transformer import Block, Transformer
from jaxquant.ptq import awq, folding, smoothquant
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.hessian import InputStats, hessian, stats_init, stats_update
from jaxquant.ptq.recipe import Recipe

SITES = {
    "attn_in": ("attn", ("q_proj", "k_proj", "v_proj")),
    "o_in": ("attn", ("o_proj",)),
    "mlp_in": ("mlp", ("gate_proj", "up_proj")),
    "down_in": ("mlp", ("down_proj",)),
}
_SITE_OF = {lin: site for site, (_, lins) in SITES.items() for lin in lins}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQOptions:
    """Knobs of the calibration-based methods.

    Attributes:
      gptq: :class:`GPTQConfig`.
      awq_grid: AWQ's number of ``alpha`` values.
      awq_tokens: calibration tokens kept per input site for the AWQ searches.
      batch_windows: calibration windows per jitted block call.
      smooth_sites: the input sites SmoothQuant smooths (``down_in`` folds into ``up_proj``).
      true_sequential: GPTQ quantizes a block's linears in execution order (q/k/v, o,
        gate/up, down), each on inputs recomputed with the linears before it quantized.
      smooth_search: pick SmoothQuant's ``alpha`` per site from
        :data:`~jaxquant.ptq.smoothquant.ALPHA_GRID` by the W8A8 output error (False: the
        recipe's ``alpha`` everywhere).
    """

    gptq: GPTQConfig = GPTQConfig()
    awq_grid: int = 20
    awq_tokens: int = 4096
    batch_windows: int = 8
    smooth_sites: tuple[str, ...] = ("attn_in", "mlp_in", "down_in")
    smooth_search: bool = True
    true_sequential: bool = True

    def __post_init__(self):
        allowed = ("attn_in", "mlp_in", "down_in")
        if bad := [s for s in self.smooth_sites if s not in allowed]:
            raise ValueError(f"smooth_sites must be among {allowed}; got {bad}.")
        if self.awq_grid < 1 or self.awq_tokens < 1 or self.batch_windows < 1:
            raise ValueError("awq_grid, awq_tokens and batch_windows must be positive.")


def effective_group(d_in: int, group: int | None) -> int | None:
    """The group size used for a layer with ``d_in`` inputs: ``group`` when it divides ``d_in``,
    else the largest divisor of ``d_in`` below it (SmolLM2's ``d_model = 576`` is not a
    multiple of 128, so its "g128" layers use groups of 96). None stays None."""
    if group is None or d_in % group == 0:
        return group
    return max(g for g in range(1, group) if d_in % g == 0)


def _projection_rules(cfg: TransformerConfig, recipe: Recipe, prefix: str) -> tuple:
    base = recipe.dot_config
    if base is None:
        return ()
    d_in = {"q_proj": cfg.d_model, "k_proj": cfg.d_model, "v_proj": cfg.d_model,
            "o_proj": cfg.q_dim, "gate_proj": cfg.d_model, "up_proj": cfg.d_model,
            "down_proj": cfg.ffn_dim}
    rules = []
    for lin, n in d_in.items():
        mod = SITES[_SITE_OF[lin]][0]
        dot = base
        if base.rhs is not None and base.rhs.group_size is not None:
            rhs = dataclasses.replace(base.rhs, group_size=effective_group(n, base.rhs.group_size))
            dot = dataclasses.replace(base, rhs=rhs)
        rules.append(QuantRule(rf"{prefix}{mod}/{lin}$", dot))
    return tuple(rules)


def serving_config(cfg: TransformerConfig, recipe: Recipe) -> TransformerConfig:
    """The config the quantized model serves with: block projections quantized (per-layer
    group sizes from :func:`effective_group`), embeddings / head float."""
    return dataclasses.replace(
        cfg, quant_rules=_projection_rules(cfg, recipe, r"(^|/)block_\d+/"))


def _block_config(cfg: TransformerConfig, recipe: Recipe) -> TransformerConfig:
    # A standalone Block sees module paths like "attn/q_proj" (no "block_i/" prefix).
    return dataclasses.replace(cfg, quant_rules=_projection_rules(cfg, recipe, r"^"))


def _make_capture(cfg: TransformerConfig):
    """``capture(block_params, x, positions) -> {site: input}`` for the four sites, and
    ``capture_site(site)(...) -> input`` of one site. Only the captured inputs are returned,
    so XLA drops the rest of the block: sequential GPTQ's early stages cost a fraction of a
    block."""
    block = Block(cfg, QuantMode.TRAIN)

    def trace(block_params, x, positions):
        seen = {}

        def interceptor(next_fun, args, kwargs, ctx):
            if isinstance(ctx.module, QDense) and ctx.method_name == "__call__":
                seen[ctx.module.name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            block.apply({"params": block_params}, x, positions)
        return {site: seen[lins[0]] for site, (_, lins) in SITES.items()}

    @functools.cache
    def capture_site(site):
        return jax.jit(lambda bp, x, pos: trace(bp, x, pos)[site])

    return jax.jit(trace), capture_site


def _make_serve(cfg: TransformerConfig):
    block = Block(cfg, QuantMode.SERVE)

    @jax.jit
    def run(block_params, x, positions):
        return block.apply({"params": block_params}, x, positions)[0]

    return run


def _batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _kernels(bp) -> dict:
    return {lin: bp[SITES[site][0]][lin]["kernel"] for lin, site in _SITE_OF.items()}


def _fold_block(bp, stats, samples, recipe: Recipe, cfg: TransformerConfig, opts: PTQOptions):
    """SmoothQuant / AWQ scale search and folding. Returns ``(folded float params, scales)``:
    the folded block computes the same function in float; ``scales[site]`` divides the
    inputs of that site's linears."""
    bp = jax.tree.map(jnp.asarray, bp)
    kern = _kernels(bp)
    scales = {}
    method = recipe.method
    if method == "smoothquant":
        for site in opts.smooth_sites:
            ks = [kern[x] for x in SITES[site][1]]
            # The captured input is the norm's output, so its max already includes the norm scale.
            if opts.smooth_search:
                scales[site], _ = smoothquant.search_alpha(samples[site], ks, stats[site].abs_max)
            else:
                scales[site] = smoothquant.smooth_scales(stats[site].abs_max, ks, recipe.alpha)
    if method in ("awq", "awq+gptq"):
        for site in ("attn_in", "mlp_in", "down_in", "o_in"):
            lins = SITES[site][1]
            if site == "o_in" and cfg.n_heads != cfg.n_kv_heads:
                continue  # v_proj's outputs are shared by several heads under GQA: no fold
            block_fn = None
            if site == "mlp_in":
                down = kern["down_proj"]

                def block_fn(ks, xx, down=down):
                    return (jax.nn.silu(xx @ ks[0]) * (xx @ ks[1])) @ down
            wspec = _weight_spec(recipe, kern[lins[0]].shape[0])
            scales[site], _ = awq.search_scale(samples[site], [kern[x_] for x_ in lins], wspec,
                                               n_grid=opts.awq_grid, block_fn=block_fn)
    for site, s in scales.items():
        lins = SITES[site][1]
        if site in ("attn_in", "mlp_in"):
            norm = "attn_norm" if site == "attn_in" else "mlp_norm"
            bp[norm]["scale"], ks = folding.fold_into_norm(
                bp[norm]["scale"], [kern[x] for x in lins], s)
        else:
            prev = "up_proj" if site == "down_in" else "v_proj"
            kern[prev], ks = folding.fold_into_linear(kern[prev], [kern[x] for x in lins], s)
        for lin, k in zip(lins, ks, strict=True):
            kern[lin] = k
    for lin, site in _SITE_OF.items():
        bp[SITES[site][0]][lin]["kernel"] = kern[lin]
    return bp, scales


def _weight_spec(recipe: Recipe, d_in: int):
    base = recipe.dot_config.rhs
    return dataclasses.replace(base, group_size=effective_group(d_in, base.group_size))


def _quantize_linears(bp, stats, samples, scales, recipe: Recipe, opts: PTQOptions):
    """Quantizes the (folded) block's seven linears from the float block's input statistics;
    returns serving params."""
    out = jax.tree.map(lambda a: a, bp)
    for lin, k in _kernels(bp).items():
        site = _SITE_OF[lin]
        spec = _weight_spec(recipe, k.shape[0])
        inv = 1.0 / scales[site] if site in scales else None
        if recipe.method in ("gptq", "awq+gptq"):
            h = hessian(stats[site])
            if inv is not None:  # inputs of the folded layer are x / s
                h = h * inv[:, None] * inv[None, :]
            q, _ = gptq_quantize(k, h, spec, opts.gptq)
        elif recipe.method == "awq" and lin not in ("q_proj", "k_proj"):  # AWQ skips q/k clips
            x = samples[site] if inv is None else samples[site] * inv
            q = awq.clip_quantize(x, k, spec)
        else:
            q = quantize_operand(k, spec, (0,))
        out[SITES[site][0]][lin]["kernel"] = q
    return out


def _gptq_sequential(bp, h, positions, capture_site, recipe: Recipe, opts: PTQOptions, batches):
    """GPTQ's "true sequential" order inside a block: q/k/v, then o, then gate/up, then down,
    each calibrated on inputs recomputed with the block's already-quantized linears."""
    cur = jax.tree.map(lambda a: a, bp)
    out = jax.tree.map(lambda a: a, bp)
    for site, (mod, lins) in SITES.items():
        st = None
        for a, b in batches:
            x = capture_site(site)(cur, h[a:b], positions[a:b])
            st = stats_update(st if st is not None else stats_init(x.shape[-1]), x)
        hess = hessian(st)
        for lin in lins:
            k = cur[mod][lin]["kernel"]
            q, _ = gptq_quantize(k, hess, _weight_spec(recipe, k.shape[0]), opts.gptq)
            out[mod][lin]["kernel"] = q
            cur[mod][lin]["kernel"] = q.dequantize().astype(k.dtype)
    return out


def quantize_model(
    cfg: TransformerConfig,
    params: dict,
    recipe: Recipe,
    calib_tokens: np.ndarray | None = None,
    *,
    options: PTQOptions = PTQOptions(),
    progress: bool = True,
) -> tuple[TransformerConfig, dict, dict[str, Any]]:
    """Post-training quantization of a :class:`~jaxquant.nn.Transformer`.

    Args:
      cfg: the float model's config.
      params: its float params.
      recipe: what to do (:func:`~jaxquant.ptq.recipe.parse_recipe`).
      calib_tokens: ``[n, length]`` calibration windows (needed by gptq / awq / smoothquant).
      options: :class:`PTQOptions`.
      progress: show a progress bar over blocks.

    Returns:
      ``(serve_cfg, serve_params, info)``: run with ``Transformer(serve_cfg, SERVE)``;
      ``info`` has the quantization time in seconds.
    """
    t0 = time.perf_counter()
    if recipe.method == "fp32":
        return cfg, params, {"seconds": 0.0}
    serve_cfg = serving_config(cfg, recipe)
    if recipe.method in ("rtn", "w8a8"):
        out = convert(Transformer(serve_cfg), params)
        jax.block_until_ready(out)
        return serve_cfg, out, {"seconds": time.perf_counter() - t0}
    if calib_tokens is None:
        raise ValueError(f"{recipe.method} needs calibration data: pass calib_tokens [n, length].")
    calib = jnp.asarray(calib_tokens, jnp.int32)
    n, length = calib.shape
    bcfg = _block_config(cfg, recipe)
    (capture, capture_site), serve = _make_capture(cfg), _make_serve(bcfg)
    h = jnp.asarray(params["embed"]["embedding"])[calib].astype(cfg.compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    gptq = recipe.method in ("gptq", "awq+gptq")
    sequential = gptq and options.true_sequential
    need_h = gptq and not sequential
    # Every method but plain sequential GPTQ (which captures stage by stage) needs one pass of
    # the float block for its statistics.
    float_pass = not (recipe.method == "gptq" and sequential)
    keep = recipe.method in ("awq", "awq+gptq") or (
        recipe.method == "smoothquant" and options.smooth_search)
    batches = _batches(n, options.batch_windows)
    stride = max(1, (n * length) // options.awq_tokens)
    out_params = {k: v for k, v in params.items() if not k.startswith("block_")}
    bar = tqdm(range(cfg.n_layers), desc=f"{recipe.name} blocks", disable=not progress)
    for i in bar:
        bp = params[f"block_{i}"]
        stats: dict[str, InputStats] = {}
        samples: dict[str, list] = {site: [] for site in SITES}
        for a, b in batches if float_pass else ():
            sites = capture(bp, h[a:b], positions[a:b])
            for site, x in sites.items():
                if site not in stats:
                    stats[site] = stats_init(x.shape[-1], hessian=need_h)
                stats[site] = stats_update(stats[site], x)
                if keep:
                    samples[site].append(x.reshape(-1, x.shape[-1])[::stride])
        samples = {s: jnp.concatenate(v)[: options.awq_tokens] for s, v in samples.items() if v}
        bp, scales = _fold_block(bp, stats, samples, recipe, cfg, options)
        if sequential:
            qbp = _gptq_sequential(bp, h, positions, capture_site, recipe, options, batches)
        else:
            qbp = _quantize_linears(bp, stats, samples, scales, recipe, options)
        h = jnp.concatenate([serve(qbp, h[a:b], positions[a:b]) for a, b in batches])
        out_params[f"block_{i}"] = qbp
    return serve_cfg, out_params, {"seconds": time.perf_counter() - t0}
