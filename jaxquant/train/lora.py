"""LoRA and QLoRA on the jaxquant :class:`~jaxquant.nn.Transformer`: a frozen base, trained adapters.

A targeted projection with kernel ``W [d_in, d_out]`` computes, in activation space::

    y = x W  +  (alpha / r) * dropout(x) A B          A: [d_in, r],  B: [r, d_out]

``W`` is frozen. For QLoRA (``LoRAConfig(base="nf4")``, the default) it is held as a
:class:`~jaxquant.core.double_quant.DoubleQuantArray`: packed NF4 codes in blocks of 64 inputs,
block scales in 8 bits (blocks of 256, centred on their mean), about 0.516 bytes per weight.
Each layer dequantizes its own kernel right before its product, and the backward pass
dequantizes it again rather than keeping a float copy (the bitsandbytes way); a zero derived
from the layer's activation makes XLA keep to that order, so the compiled step holds about one
layer's float kernels at a time (``_frozen_product``; measured in
``experiments/qlora_memory.py``). ``base_targets=ALL_WEIGHTS`` freezes the embedding / tied head
in NF4 too. For float LoRA (``base=None``) the kernel stays float. ``A`` starts Kaiming-uniform
(PEFT's ``U(-1/sqrt(d_in), 1/sqrt(d_in))``), ``B`` at zero, so the model starts exactly at its
base. The adapters run through ``flax.linen.intercept_methods`` around the unchanged
``Transformer``: the ``nn`` layers know nothing of LoRA.

The adapters are a nested dict mirroring the param tree (only the targeted modules)::

    {"block_0": {"attn": {"q_proj": {"lora_a": [d_in, r], "lora_b": [r, d_out]}, ...}, ...}}

The gradient is taken with respect to that tree only: the optimizer state holds adapter-sized
arrays, and the base (an argument of the jitted step, not a constant baked into it) is never
written.

Example::

    lora = LoRAConfig(rank=16, alpha=16.0)                     # QLoRA, all seven projections
    base, adapters = init_lora(params, lora, jax.random.key(0))
    opt = make_optimizer(learning_rate=2e-4, warmup_steps=10, total_steps=1000)
    step = make_lora_train_step(cfg, base, opt, lora)
    state = init_lora_state(adapters, opt)
    state, metrics = step(state, tokens)                       # tokens int [B, S]
    save_adapters("run/adapters", state.adapters, lora)        # tiny: the adapters alone
    params = merge_adapters(base, state.adapters, lora)        # float, for RTN / GPTQ serving
    memory_report(step, state, tokens)                         # base bytes/param, step peak

The surface: :class:`LoRAConfig`, :func:`init_lora` (= :func:`quantize_base` +
:func:`init_adapters`), :class:`LoRAState` / :func:`init_lora_state`,
:func:`make_lora_train_step` (a :class:`LoRATrainStep`), :func:`lora_apply` (the forward),
:func:`make_lora_eval_step`, :func:`merge_adapters`, :func:`dequantize_base`,
:func:`save_adapters` / :func:`load_adapters`, :func:`base_memory`, :func:`memory_report`,
:func:`compiled_memory_stats`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxquant.checkpoint import restore as _restore
from jaxquant.checkpoint import save as _save
from jaxquant.core import QArray, QuantSpec, check_finite, gather_rows, get_qtype, quantize
from jaxquant.core.double_quant import DoubleQuantArray, double_quantize
from jaxquant.errors import JaxquantError
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.linear import QDense, QEmbed
from jaxquant.nn.rules import module_path
from jaxquant.nn.transformer import Transformer
from jaxquant.train.step import next_token_loss

__all__ = [
    "ALL_WEIGHTS",
    "PROJECTIONS",
    "LoRAConfig",
    "LoRAState",
    "LoRATrainStep",
    "base_memory",
    "compiled_memory_stats",
    "dequantize_base",
    "init_adapters",
    "init_lora",
    "init_lora_state",
    "load_adapters",
    "lora_apply",
    "make_lora_eval_step",
    "make_lora_train_step",
    "memory_report",
    "merge_adapters",
    "quantize_base",
    "save_adapters",
]

PROJECTIONS = r"(^|/)(q|k|v|o|gate|up|down)_proj$"
"""The seven projections of a Transformer block (``re.search`` over module paths)."""

ALL_WEIGHTS = r"(^|/)((q|k|v|o|gate|up|down)_proj|embed|lm_head)$"
"""``base_targets`` that also freezes the embedding (and an untied head) in the base format:
every matrix, so the whole frozen base (norm scales aside) is about 0.52 bytes per parameter."""

LORA_A, LORA_B = "lora_a", "lora_b"
_FORMAT = "jaxquant-lora-adapters"
_FORMAT_VERSION = 1

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """How to build and run the adapters and the frozen base.

    Attributes:
      rank: ``r``, the adapters' inner size.
      alpha: the adapter output is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input ``x`` (training only), in ``[0, 1)``.
      targets: regex (``re.search``) over module paths such as ``"block_0/attn/q_proj"``: the
        linears that get adapters. Default: the seven block projections.
      base: the frozen base's format: ``"nf4"`` (QLoRA; any name of
        :data:`jaxquant.core.QTYPES` works), or None for a float base (plain LoRA).
      base_targets: regex of the modules whose kernel (or embedding table) is stored in
        ``base`` format. Default: the seven projections, whether or not they have adapters,
        as bitsandbytes does (embedding, head and norms stay float); :data:`ALL_WEIGHTS` adds
        the embedding / head (the table in blocks along ``D``, looked up row by row).
      block_size: inputs per first-level scale of the base.
      double_quant: store the block scales in 8 bits (blocks of ``scale_block_size``, QLoRA's
        double quantization); False keeps them float32 (a plain :class:`~jaxquant.core.QArray`).
      scale_block_size: block scales per second-level float32 scale.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = PROJECTIONS
    base: str | None = "nf4"
    base_targets: str = PROJECTIONS
    block_size: int = 64
    double_quant: bool = True
    scale_block_size: int = 256

    def __post_init__(self):
        for name in ("rank", "block_size", "scale_block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoRAConfig.{name} must be an int >= 1, got {v!r}.")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not np.isfinite(a) or a <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {a!r}.")
        object.__setattr__(self, "alpha", float(a))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {d!r}.")
        object.__setattr__(self, "dropout", float(d))
        for name in ("targets", "base_targets"):
            pattern = getattr(self, name)
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"LoRAConfig.{name} must be a non-empty regex, got {pattern!r}.")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoRAConfig.{name} {pattern!r} is not a valid regex: {e}.") from e
        if self.base is not None:
            try:
                get_qtype(self.base)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"LoRAConfig.base must be None (float LoRA) or a qtype such as 'nf4', got "
                    f"{self.base!r}."
                ) from e
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"LoRAConfig.double_quant must be a bool, got {self.double_quant!r}.")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on ``x A B``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> LoRAConfig:
        return cls(**dict(d))


# --- building the base and the adapters -------------------------------------------------------


def _flat(params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(_as_dict(params))


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def _kernels(params) -> dict[str, Any]:
    """``{module path: kernel}`` of every ``kernel`` leaf (QArray / DoubleQuantArray kept whole)."""
    out = {}
    for key, leaf in traverse_util.flatten_dict(
        _as_dict(params), is_leaf=lambda _, x: isinstance(x, (QArray, DoubleQuantArray))
    ).items():
        if key[-1] == "kernel":
            out["/".join(str(k) for k in key[:-1])] = leaf
    return out


def _flatten_frozen(params):
    return traverse_util.flatten_dict(
        _as_dict(params), is_leaf=lambda _, x: isinstance(x, (QArray, DoubleQuantArray))
    )


# One compile per kernel shape, not one per op (op-by-op dispatch dominates on CPU).
_double_quantize = jax.jit(
    double_quantize, static_argnames=("qtype", "block_size", "axis", "scale_block_size")
)


@functools.partial(jax.jit, static_argnames=("qtype", "block_size", "axis"))
def _block_quantize(w, qtype, block_size, axis):
    spec = QuantSpec(qtype=qtype, channel_axes=(1 - axis,), group_size=block_size, group_axis=axis)
    return quantize(w, spec)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q, dtype):
    return q.dequantize(dtype)


def quantize_base(params: PyTree, lora: LoRAConfig) -> PyTree:
    """The frozen base: ``params`` with every kernel (or embedding table) of a module matching
    ``lora.base_targets`` quantized in blocks of ``lora.block_size`` along its contracting axis.

    Args:
      params: the float Transformer params (nested dicts; kernels ``[d_in, d_out]``, tables
        ``[V, D]``).
      lora: the config; ``base=None`` returns the params unchanged (float LoRA).

    Returns:
      The same tree with those leaves as :class:`~jaxquant.core.double_quant.DoubleQuantArray`
      (``double_quant=True``) or :class:`~jaxquant.core.QArray` (float32 block scales).

    Raises:
      ValueError: nothing matches ``base_targets``, ``block_size`` does not divide a
        contracting size, a leaf is already quantized or holds NaN/inf.
    """
    if lora.base is None:
        return params
    flat = _flatten_frozen(params)
    new, hit = {}, False
    for key, leaf in flat.items():
        new[key] = leaf
        path = "/".join(str(k) for k in key[:-1])
        if key[-1] not in ("kernel", "embedding") or not re.search(lora.base_targets, path):
            continue
        name = f"{path}/{key[-1]}"
        if isinstance(leaf, (QArray, DoubleQuantArray)):
            raise ValueError(
                f"quantize_base: {name} is already quantized; pass the float params "
                "(e.g. a loaded float model), not serving params."
            )
        w = jnp.asarray(leaf)
        if w.ndim != 2:
            raise ValueError(f"quantize_base: {name} has shape {w.shape}; expected 2-D.")
        # kernels [d_in, d_out]: blocks of inputs; tables [V, D]: blocks along D (the tied
        # head's contracting axis), so that rows can be looked up with their own scales
        axis = 0 if key[-1] == "kernel" else 1
        if w.shape[axis] % lora.block_size:
            raise ValueError(
                f"quantize_base: block_size {lora.block_size} does not divide {name}'s "
                f"contracting size {w.shape[axis]}; choose a LoRAConfig.block_size that divides it."
            )
        hit = True
        check_finite(w, name)
        if lora.double_quant:
            new[key] = _double_quantize(
                w, lora.base, block_size=lora.block_size, axis=axis,
                scale_block_size=lora.scale_block_size,
            )
        else:
            new[key] = _block_quantize(w, lora.base, lora.block_size, axis)
    if not hit:
        raise ValueError(
            f"LoRAConfig.base_targets {lora.base_targets!r} matched no kernel; kernels are at "
            f"{sorted(_kernels(params))[:8]}..."
        )
    return traverse_util.unflatten_dict(new)


def dequantize_base(base: PyTree, dtype=jnp.float32) -> PyTree:
    """``base`` with every quantized kernel dequantized (the float model QLoRA trains on top of)."""
    dtype = np.dtype(dtype)
    return jax.tree.map(
        lambda x: _dequantize(x, dtype) if isinstance(x, (QArray, DoubleQuantArray)) else x,
        base,
        is_leaf=lambda x: isinstance(x, (QArray, DoubleQuantArray)),
    )


def init_adapters(params: PyTree, lora: LoRAConfig, key: jax.Array) -> PyTree:
    """Fresh adapters for every kernel whose module path matches ``lora.targets``.

    Args:
      params: the float params or the frozen base (only the kernels' shapes are read).
      lora: the config.
      key: PRNG key for ``A``.

    Returns:
      ``{..module path..: {"lora_a": f32 [d_in, r], "lora_b": f32 [r, d_out] zeros}}`` (nested).

    Raises:
      ValueError: ``targets`` matches no kernel, or a matched kernel is not 2-D.
    """
    kernels = {p: k for p, k in _kernels(params).items() if re.search(lora.targets, p)}
    if not kernels:
        raise ValueError(
            f"LoRAConfig.targets {lora.targets!r} matched no kernel; kernels are at "
            f"{sorted(_kernels(params))[:8]}... (regex searched in these paths)."
        )
    flat = {}
    for i, (path, k) in enumerate(sorted(kernels.items())):
        shape = tuple(k.shape)
        if len(shape) != 2:
            raise ValueError(f"LoRA needs 2-D kernels [d_in, d_out]; {path} has shape {shape}.")
        d_in, d_out = shape
        bound = 1.0 / np.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [r, d_in], as PEFT
        a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, lora.rank), jnp.float32,
                               -bound, bound)
        parts = tuple(path.split("/"))
        flat[parts + (LORA_A,)] = a
        flat[parts + (LORA_B,)] = jnp.zeros((lora.rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def init_lora(params: PyTree, lora: LoRAConfig, key: jax.Array) -> tuple[PyTree, PyTree]:
    """``(base, adapters)`` from float params: :func:`quantize_base` and :func:`init_adapters`."""
    return quantize_base(params, lora), init_adapters(params, lora, key)


def _adapter_table(adapters: PyTree) -> dict[str, tuple[jax.Array, jax.Array]]:
    flat = _flat(adapters)
    table: dict[str, dict] = {}
    for key, leaf in flat.items():
        if key[-1] not in (LORA_A, LORA_B):
            raise ValueError(f"adapters: unexpected leaf {'/'.join(map(str, key))}; expected "
                             f"'{LORA_A}' / '{LORA_B}' leaves only.")
        table.setdefault("/".join(map(str, key[:-1])), {})[key[-1]] = leaf
    out = {}
    for path, d in table.items():
        if set(d) != {LORA_A, LORA_B}:
            raise ValueError(f"adapters at {path} need both {LORA_A} and {LORA_B}.")
        out[path] = (d[LORA_A], d[LORA_B])
    return out


# --- the forward --------------------------------------------------------------------------------


def _dot_in(x, w, precision, k_axis=0):
    """``x [..., d_in]`` contracted with axis ``k_axis`` of the 2-D ``w``."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (k_axis,)), ((), ())), precision)


def _after(kernel, t):
    """``kernel`` made to depend on the activation ``t`` without changing its bits.

    A quantized kernel depends on parameters only, so XLA is free to dequantize every layer's
    kernel at the start of the step, and to share one dequantization (e.g. the codebook
    lookup) between the forward and the backward pass, keeping it alive in between: measured
    on CPU, the step's temp buffer then grows by two float kernels per layer
    (``optimization_barrier`` does not prevent it). Adding ``uint8(e - e)`` for one element
    ``e`` of ``t`` (0 for a finite activation) to the packed codes makes the whole
    dequantization wait for ``t``, so each float kernel lives only around its own product.
    """
    e = jax.lax.stop_gradient(t.reshape(-1)[0]).astype(jnp.float32)
    zero = (e - e).astype(kernel.qvalue.dtype)
    return dataclasses.replace(kernel, qvalue=kernel.qvalue + zero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _frozen_product(x, kernel, precision, dtype, k_axis=0):
    """``x [..., d_in]`` times the dequantized frozen 2-D ``kernel``, contracting its axis
    ``k_axis`` (0: a ``[d_in, d_out]`` kernel; 1: the tied head ``x . E^T`` of a ``[V, D]`` table).

    The float kernel exists only around its own product: the forward dequantizes it after
    ``x`` exists, the backward dequantizes it again (nothing float is saved for it) after the
    output's cotangent exists (see :func:`_after`). No gradient flows to the kernel.
    """
    return _dot_in(x, _after(kernel, x).dequantize(dtype), precision, k_axis)


def _frozen_product_fwd(x, kernel, precision, dtype, k_axis):
    return _frozen_product(x, kernel, precision, dtype, k_axis), kernel


def _frozen_product_bwd(precision, dtype, k_axis, kernel, dy):
    w = _after(kernel, dy).dequantize(dtype)
    return _dot_in(dy, w, precision, 1 - k_axis), None


_frozen_product.defvjp(_frozen_product_fwd, _frozen_product_bwd)


def _frozen_table(mod):
    table = getattr(mod, "embedding", None)
    if table is None and mod.scope is not None and mod.scope.has_variable("params", "embedding"):
        table = mod.scope.get_variable("params", "embedding")
    return table if isinstance(table, (QArray, DoubleQuantArray)) else None


def _embed(next_fun, args, kwargs, ctx):
    """A :class:`QEmbed` whose table is frozen and quantized: lookup of the quantized rows,
    tied head through :func:`_frozen_product`."""
    mod = ctx.module
    if ctx.method_name == "setup":  # skip the param's shape check (packed codes)
        table = _frozen_table(mod)
        if table is None:
            return next_fun(*args, **kwargs)
        if mod.config is not None:
            raise JaxquantError(f"{module_path(mod)}: a quantized frozen embedding needs a float "
                                "layer; build the LoRA model from the float TransformerConfig.")
        mod.embedding = table
        return None
    table = _frozen_table(mod) if ctx.method_name in ("__call__", "attend") else None
    if table is None:
        return next_fun(*args, **kwargs)
    dtype = np.dtype(mod.dtype or table.dtype)
    if ctx.method_name == "__call__":
        q = table.to_qarray() if isinstance(table, DoubleQuantArray) else table
        return gather_rows(q, jnp.asarray(args[0])).dequantize(dtype)
    x = jnp.asarray(args[0]).astype(dtype)
    return _frozen_product(x, table, None, dtype, 1)


def _interceptor(table, lora: LoRAConfig, dropout_key, used: set):
    rate = lora.dropout if dropout_key is not None else 0.0
    scaling = lora.scaling

    def interceptor(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if isinstance(mod, QEmbed):
            return _embed(next_fun, args, kwargs, ctx)
        if ctx.method_name != "__call__" or not isinstance(mod, QDense):
            return next_fun(*args, **kwargs)
        path = module_path(mod)
        kernel = mod.variables.get("params", {}).get("kernel")
        frozen = isinstance(kernel, (QArray, DoubleQuantArray))
        adapter = table.get(path)
        if not frozen and adapter is None:
            return next_fun(*args, **kwargs)
        x = jnp.asarray(args[0])
        if mod.dtype is not None:
            x = x.astype(mod.dtype)
        if frozen:
            if mod.config is not None or mod.use_bias:
                raise JaxquantError(
                    f"{path}: a quantized frozen base needs a float layer (no quantization rules, "
                    "no bias); build the LoRA model from the float TransformerConfig."
                )
            y = _frozen_product(x, kernel, mod.precision, np.dtype(mod.dtype or kernel.dtype), 0)
        else:
            y = next_fun(x, **kwargs)
        if adapter is None:
            return y
        used.add(path)
        a, b = adapter
        xa = x
        if rate > 0.0:
            k = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            keep = jax.random.bernoulli(k, 1.0 - rate, x.shape)
            xa = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        h = jnp.dot(xa, a.astype(xa.dtype), precision=mod.precision)
        delta = jnp.dot(h, b.astype(h.dtype), precision=mod.precision) * scaling
        return y + delta.astype(y.dtype)

    return interceptor


def lora_apply(
    cfg: TransformerConfig,
    base: PyTree,
    adapters: PyTree | None,
    tokens: jax.Array,
    lora: LoRAConfig,
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Logits of the LoRA model: ``Transformer(cfg)`` on ``base`` plus the adapters.

    Args:
      cfg: the float model's config (no quantization rules on the adapted layers).
      base: the frozen base from :func:`quantize_base` (or float params for ``base=None``).
      adapters: from :func:`init_adapters` (None: the base alone).
      tokens: int ``[B, S]``.
      lora: the config (``scaling``, ``dropout``).
      dropout_key: PRNG key for the adapter dropout; None runs deterministically (evaluation).

    Returns:
      ``logits [B, S, V]`` float32.

    Raises:
      ValueError: an adapter whose path is no dense layer of the model.
    """
    table = _adapter_table(adapters) if adapters is not None else {}
    used: set[str] = set()
    with nn.intercept_methods(_interceptor(table, lora, dropout_key, used)):
        logits = Transformer(cfg).apply({"params": base}, tokens)
    unused = sorted(set(table) - used)
    if unused:
        raise ValueError(f"adapters at {unused[:4]} match no dense layer of the model; build them "
                         "with init_adapters from this model's params.")
    return logits


# --- training -----------------------------------------------------------------------------------


class LoRAState(NamedTuple):
    """What a LoRA step updates: the step count, the adapters and their optimizer state."""

    step: jax.Array
    adapters: PyTree
    opt_state: PyTree


def init_lora_state(adapters: PyTree, optimizer: optax.GradientTransformation) -> LoRAState:
    """The initial :class:`LoRAState` (step 0; the optimizer state is adapter-sized)."""
    return LoRAState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters))


class LoRATrainStep:
    """The jitted LoRA step ``(state, tokens [B, S], mask=None) -> (state, metrics)``.

    Made by :func:`make_lora_train_step`. The frozen base is held here and passed to the jitted
    function as an argument on every call (not captured as a constant). ``metrics`` holds
    ``loss`` (before the update), ``grad_norm`` (of the adapter gradient, before clipping) and
    ``n_tokens``. Dropout draws its mask from ``fold_in(key(seed), state.step)``, so a resumed
    run repeats the same masks.

    Attributes:
      base: the frozen base.
      pure: the un-jitted ``(base, state, tokens, mask=None) -> (state, metrics)``, for callers
        that jit it themselves (e.g. with shardings); pass the base as an argument, do not
        close over it (a closed-over base is baked into the executable as constants).
    """

    def __init__(self, cfg, base, optimizer, lora, *, seed=0, jit=True):
        self.cfg, self.base, self.optimizer, self.lora, self.seed = cfg, base, optimizer, lora, seed

        def loss_fn(adapters, base, tokens, mask, key):
            logits = lora_apply(cfg, base, adapters, tokens, lora, dropout_key=key)
            return next_token_loss(logits, tokens, mask)

        def step(base, state, tokens, mask=None):
            key = None
            if lora.dropout > 0:
                key = jax.random.fold_in(jax.random.key(seed), state.step)
            (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.adapters, base, tokens, mask, key
            )
            updates, opt_state = optimizer.update(grads, state.opt_state, state.adapters)
            adapters = optax.apply_updates(state.adapters, updates)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "n_tokens": n}
            return LoRAState(state.step + 1, adapters, opt_state), metrics

        self.pure = step
        self._step = jax.jit(step) if jit else step

    def __call__(self, state: LoRAState, tokens: jax.Array, mask: jax.Array | None = None):
        return self._step(self.base, state, tokens, mask)

    def lower(self, state: LoRAState, tokens: jax.Array, mask: jax.Array | None = None):
        """``jax.jit(step).lower(base, state, tokens, mask)`` (needs ``jit=True``)."""
        if not hasattr(self._step, "lower"):
            raise ValueError("lower() needs a jitted step; make it with jit=True.")
        return self._step.lower(self.base, state, tokens, mask)

    def compiled_memory(self, state: LoRAState, tokens: jax.Array) -> dict:
        """The compiled step's memory analysis (bytes); see :func:`compiled_memory_stats`."""
        return compiled_memory_stats(self.lower(state, tokens).compile())


def make_lora_train_step(
    cfg: TransformerConfig,
    base: PyTree,
    optimizer: optax.GradientTransformation,
    lora: LoRAConfig,
    *,
    seed: int = 0,
    jit: bool = True,
) -> LoRATrainStep:
    """The LoRA training step (a :class:`LoRATrainStep`): ``step(state, tokens) -> (state,
    metrics)``, gradients for the adapters only.

    Args:
      cfg: the float model's config.
      base: the frozen base (:func:`init_lora`).
      optimizer: e.g. :func:`~jaxquant.train.make_optimizer`.
      lora: the config.
      seed: dropout seed (unused when ``lora.dropout == 0``).
      jit: jit the step (default).
    """
    return LoRATrainStep(cfg, base, optimizer, lora, seed=seed, jit=jit)


def make_lora_eval_step(cfg: TransformerConfig, base: PyTree, lora: LoRAConfig):
    """``(adapters, tokens [B, S], mask=None) -> (loss, n_tokens)``, jitted, no dropout."""

    @jax.jit
    def evaluate(base, adapters, tokens, mask=None):
        return next_token_loss(lora_apply(cfg, base, adapters, tokens, lora), tokens, mask)

    return lambda adapters, tokens, mask=None: evaluate(base, adapters, tokens, mask)


# --- merging, saving ----------------------------------------------------------------------------


def merge_adapters(
    base: PyTree, adapters: PyTree | None, lora: LoRAConfig, dtype=jnp.float32
) -> PyTree:
    """Float params with the adapters folded in: ``W + (alpha / r) A B`` per adapted kernel.

    The quantized kernels of ``base`` are dequantized first, so the result is a plain float
    Transformer param tree: re-quantize it for serving with the PTQ pipeline (RTN or GPTQ).

    Returns:
      The float params (``dtype``), same tree as ``Transformer(cfg).init``'s.
    """
    table = _adapter_table(adapters) if adapters is not None else {}
    flat = _flatten_frozen(base)
    kernels = {"/".join(map(str, k[:-1])): k for k in flat if k[-1] == "kernel"}
    missing = sorted(set(table) - set(kernels))
    if missing:
        raise ValueError(f"merge_adapters: adapters at {missing[:4]} have no kernel in base.")
    dtype = np.dtype(dtype)
    out = {}
    for key, leaf in flat.items():
        if isinstance(leaf, (QArray, DoubleQuantArray)):
            leaf = _dequantize(leaf, dtype)
        out[key] = leaf
    for path, (a, b) in table.items():
        key = kernels[path]
        out[key] = _merge_one(out[key], a, b, lora.scaling, dtype)
    return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _merge_one(w, a, b, scaling, dtype):
    """``w + scaling * a @ b`` in float32 (the product at full precision), cast to ``dtype``."""
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    return (jnp.asarray(w, jnp.float32) + scaling * delta).astype(dtype)


def save_adapters(
    directory: str | os.PathLike, adapters: PyTree, lora: LoRAConfig, *, force: bool = False
):
    """Saves the adapters alone (and the :class:`LoRAConfig`) as an Orbax checkpoint.

    The base is not saved: it is rebuilt from the float model with :func:`quantize_base`.
    Returns the absolute path written.
    """
    _adapter_table(adapters)  # validates the tree
    tree = {"format": _FORMAT, "version": _FORMAT_VERSION, "config": lora.to_dict(),
            "adapters": _as_dict(adapters)}
    return _save(directory, tree, force=force)


def load_adapters(directory: str | os.PathLike) -> tuple[PyTree, LoRAConfig]:
    """``(adapters, lora_config)`` saved by :func:`save_adapters`, bit-identical.

    Raises:
      JaxquantError: the directory holds some other checkpoint.
    """
    tree = _restore(directory)
    if not isinstance(tree, Mapping) or tree.get("format") != _FORMAT:
        raise JaxquantError(f"{directory} is not a LoRA adapter checkpoint (written by "
                            "jaxquant.train.lora.save_adapters).")
    return tree["adapters"], LoRAConfig.from_dict(tree["config"])


# --- memory -------------------------------------------------------------------------------------


def _nbytes(x) -> int:
    if isinstance(x, (QArray, DoubleQuantArray)):
        return x.nbytes
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def base_memory(base: PyTree) -> dict:
    """Bytes of the frozen base, from its arrays.

    Returns:
      ``quantized_params`` / ``quantized_bytes`` / ``quantized_bytes_per_param`` (the kernels
      held quantized: codes + 8-bit scales + second-level scales + means), the same for the
      ``float`` leaves (embedding, norms), and ``total_params`` / ``total_bytes`` /
      ``bytes_per_param`` over the whole base.
    """
    qp = qb = fp = fb = 0
    for leaf in _flatten_frozen(base).values():
        if isinstance(leaf, (QArray, DoubleQuantArray)):
            qp += int(np.prod(leaf.shape))
            qb += leaf.nbytes
        else:
            fp += int(np.prod(np.shape(leaf)))
            fb += _nbytes(leaf)
    return {
        "quantized_params": qp,
        "quantized_bytes": qb,
        "quantized_bytes_per_param": qb / qp if qp else None,
        "float_params": fp,
        "float_bytes": fb,
        "total_params": qp + fp,
        "total_bytes": qb + fb,
        "bytes_per_param": (qb + fb) / max(1, qp + fp),
    }


_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_temp_size_in_bytes",
    "peak_memory_in_bytes",
)


def compiled_memory_stats(compiled) -> dict:
    """The fields of ``compiled.memory_analysis()`` present in this jax / backend, as ints, plus
    ``peak_bytes = argument + output - alias + temp``: what the executable needs at once (its
    inputs, its outputs and its temp buffer, in which XLA places every intermediate). The
    backend's own ``peak_memory_in_bytes`` is kept as reported (on CPU it leaves the temp
    buffer out). An empty dict when the backend gives no analysis.

    Example:
      >>> compiled_memory_stats(jax.jit(f).lower(x).compile())["peak_bytes"]  # doctest: +SKIP
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends / versions do not implement it
        return {}
    if isinstance(ma, (list, tuple)):  # some versions: one analysis per device
        ma = ma[0] if ma else None
    if ma is None:
        return {}
    out = {}
    for f in _MEMORY_FIELDS:
        v = getattr(ma, f, None)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
            out[f] = int(v)
    if "temp_size_in_bytes" in out:
        out["peak_bytes"] = (out.get("argument_size_in_bytes", 0)
                             + out.get("output_size_in_bytes", 0)
                             - out.get("alias_size_in_bytes", 0) + out["temp_size_in_bytes"])
    return out


def memory_report(step: LoRATrainStep, state: LoRAState, tokens: jax.Array) -> dict:
    """Memory of a LoRA run: :func:`base_memory`, the adapter and optimizer-state sizes, and the
    compiled step's analysis (``step_memory``, :func:`compiled_memory_stats`) for ``tokens``'
    shape ``[B, S]``."""
    leaves = lambda t: [x for x in jax.tree.leaves(t) if hasattr(x, "dtype")]
    return {
        "base": base_memory(step.base),
        "adapter_params": sum(int(np.prod(np.shape(x))) for x in leaves(state.adapters)),
        "adapter_bytes": sum(_nbytes(x) for x in leaves(state.adapters)),
        "opt_state_bytes": sum(_nbytes(x) for x in leaves(state.opt_state)),
        "tokens_shape": list(np.shape(tokens)),
        "step_memory": step.compiled_memory(state, tokens),
    }
