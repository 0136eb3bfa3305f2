"""Quantized linen layers: `QDense`, `QDenseGeneral`, `QEinsum` and `QEmbed`.

Lingo: the layer input ``x`` is the **lhs** and the kernel the **rhs** of a ``dot_general``;
the kernel's **contracting** axes are its input axes (axis 0 of a ``[in, out]`` Dense kernel).
Each layer takes ``config`` (a :class:`~jaxquant.core.dot_config.DotGeneralConfig`, None for
float) and ``mode`` (:class:`~jaxquant.nn.modes.QuantMode`):

* ``TRAIN``: ``dot_general(x, kernel, config=config)`` on the float kernel (QAT).
* ``CALIBRATE``: float forward; the input's :class:`~jaxquant.nn.modes.ActStats` are updated in
  ``quant_stats/<path>/lhs``.
* ``CONVERT``: the kernel is replaced in ``params`` by ``quantize_operand(kernel, config.rhs,
  contracting_axes)``, and a static activation scale is added when asked for.
* ``SERVE``: the kernel param *is* that QArray (``init`` in SERVE mode builds one, so
  ``jax.eval_shape`` gives the serving tree); with ``static_activation`` the input is quantized
  with the stored ``lhs_scale`` before the (integer) product.

With a float kernel and ``config=None`` every mode is a plain float layer.

With ``learned_scale=True`` (LSQ QAT) TRAIN keeps the weight scale as a param ``kernel_scale``
(shape of ``quantize_operand(kernel, config.rhs, contracting_axes).scale``, initialised to that
RTN scale) and multiplies by ``lsq_fake_quant(kernel, kernel_scale, spec)``: the kernel gets the
straight-through gradient and the scale LSQ's. CONVERT quantizes the kernel with that scale
(the codes ``round(clip(kernel / scale))`` TRAIN used), so SERVE reproduces TRAIN's forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import QArray, gather_rows, quantize
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import dot_general, einsum, operand_spec, quantize_operand
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.core.fake_quant import lsq_fake_quant
from jaxquant.nn.modes import (
    LEARNED_SCALE,
    STATS_COLLECTION,
    QuantMode,
    StaticActivation,
    act_stats_init,
    act_stats_update,
    static_activation_method,
    static_scale,
)
from jaxquant.nn.rules import check_learned_scale

Initializer = Callable[..., jax.Array]
default_kernel_init = nn.initializers.lecun_normal()


def _kw(default):
    """A keyword-only field: the shared fields of :class:`QuantizedLinear` come first in the
    dataclass (Flax puts inherited fields first), so keyword-only keeps ``QDense(16, ...)``."""
    return dataclasses.field(default=default, kw_only=True)


class QuantizedLinear(nn.Module):
    """Base of the quantized linear layers: their shared (keyword-only) fields and the mode
    machinery. Subclasses give the kernel shape and the dimension numbers and call
    :meth:`_apply`.

    Attributes:
      config: :class:`DotGeneralConfig` or None (float).
      mode: :class:`QuantMode`.
      static_activation: None, or a :class:`~jaxquant.nn.modes.StaticActivation` (or its
        value, ``"absmax"`` / ``"percentile"``; see :class:`~jaxquant.nn.rules.QuantRule`).
      dtype: compute dtype (None: the input's).
      param_dtype: dtype of the float kernel.
      precision: passed to the float products.
      kernel_init: initializer of the float kernel.
      stats_percentile: ``p`` of the running percentile in CALIBRATE mode (None skips it).
      learned_scale: LSQ: train the weight scale as the param ``kernel_scale`` (TRAIN) and
        quantize with it (CONVERT); needs ``config.rhs`` a symmetric int2..int8 spec (see
        :func:`~jaxquant.nn.rules.check_learned_scale`).
    """

    config: DotGeneralConfig | None = _kw(None)
    mode: QuantMode = _kw(QuantMode.TRAIN)
    static_activation: StaticActivation | str | None = _kw(None)
    dtype: Any = _kw(None)
    param_dtype: Any = _kw(jnp.float32)
    precision: Any = _kw(None)
    kernel_init: Initializer = _kw(default_kernel_init)
    stats_percentile: float | None = _kw(99.99)
    learned_scale: bool = _kw(False)

    def kernel_contracting_axes(self, *_) -> tuple[int, ...]:
        """The kernel's contracting axes (what ``quantize_operand`` gets)."""
        raise NotImplementedError

    def _kernel(self, shape, k_contract):
        """The kernel param: float, or in SERVE mode (with a quantizing config) a QArray."""
        spec = self.config.rhs if self.config is not None else None
        if self.mode == QuantMode.SERVE and spec is not None:

            def init(key, shape, dtype):
                w = self._cast(self.kernel_init(key, shape, dtype))
                return quantize_operand(w, spec, k_contract)

            return self.param("kernel", init, shape, self.param_dtype)
        return self.param("kernel", self.kernel_init, shape, self.param_dtype)

    def _static_lhs(self, x, x_contract, method: StaticActivation):
        """In CONVERT / SERVE with ``static_activation``: ``x`` quantized with the stored scale."""
        spec = operand_spec(self.config.lhs, x.ndim, x_contract)
        if self.mode == QuantMode.CONVERT:
            if not self.has_variable(STATS_COLLECTION, "lhs"):
                raise ValueError(
                    f"{'/'.join(self.path)} uses static_activation={method.value!r} but "
                    "no quant_stats were given: run jaxquant.nn.calibrate_model(...) first and "
                    "pass quant_stats= to convert."
                )
            stats = self.get_variable(STATS_COLLECTION, "lhs")
            scale, zp = static_scale(stats, self.config.lhs, method)
            self.put_variable("params", "lhs_scale", scale)
            if zp is not None:
                self.put_variable("params", "lhs_zero_point", zp)
        else:
            scale = self.param("lhs_scale", nn.initializers.ones, (), jnp.float32)
            zp = None
            if not self.config.lhs.symmetric:
                zp = self.param("lhs_zero_point", nn.initializers.zeros, (), jnp.float32)
        sshape = tuple(1 if a in x_contract else n for a, n in enumerate(x.shape))
        scale = jnp.broadcast_to(scale.astype(spec.scale_dtype), sshape)
        if zp is not None:
            zp = jnp.broadcast_to(zp.astype(spec.scale_dtype), sshape)
        return quantize(x, spec, scale=scale, zero_point=zp)

    def _learned_kernel(self, kernel, k_contract):
        """TRAIN: ``(lsq_fake_quant(kernel, kernel_scale), config without rhs)``; CONVERT: the
        kernel quantized with ``kernel_scale`` (stored in ``params``) and the config."""
        cfg = self.config
        w = self._cast(kernel)
        spec = operand_spec(cfg.rhs, w.ndim, k_contract)

        def rtn_scale(_key):  # the scale plain QAT / RTN would use for this kernel
            q = quantize_operand(jax.lax.stop_gradient(w), cfg.rhs, k_contract, pack=False)
            return q.scale.astype(jnp.float32)

        scale = self.param(LEARNED_SCALE, rtn_scale)
        # A step trained to (near) 0 would divide by 0: held at float32's smallest normal, as
        # compute_scale holds RTN's (the same value in TRAIN and CONVERT).
        tiny = float(jnp.finfo(jnp.float32).tiny)
        scale = jnp.where(jnp.abs(scale) < tiny, jnp.where(scale < 0, -tiny, tiny), scale)
        if self.mode == QuantMode.CONVERT:
            q = quantize(w, spec, scale=scale.astype(spec.scale_dtype))
            self.put_variable("params", "kernel", q)
            return q, cfg
        rest = dataclasses.replace(cfg, rhs=None)
        keep = rest.lhs is not None or rest.dlhs is not None or rest.drhs is not None
        return lsq_fake_quant(w, scale, spec), (rest if keep else None)

    def _apply(self, x, kernel_shape, x_contract, k_contract, product):
        """Runs ``product(x, kernel, config)`` according to the mode."""
        x = jnp.asarray(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        kernel = self._kernel(kernel_shape, k_contract)
        cfg = self.config
        check_learned_scale(self.learned_scale, cfg, f"layer {'/'.join(self.path) or self.name}")
        static = static_activation_method(self.static_activation, cfg)
        if self.mode == QuantMode.CALIBRATE:
            xc = jnp.moveaxis(x, x_contract, tuple(range(x.ndim - len(x_contract), x.ndim)))
            chan = tuple(x.shape[a] for a in x_contract)
            stats = self.variable(STATS_COLLECTION, "lhs", act_stats_init, chan)
            if not self.is_initializing():
                stats.value = act_stats_update(
                    stats.value, xc, n_channel_axes=len(chan), percentile=self.stats_percentile
                )
            return product(x, self._cast(kernel), None)
        if self.learned_scale and self.mode in (QuantMode.TRAIN, QuantMode.CONVERT):
            kernel, cfg = self._learned_kernel(kernel, k_contract)
        elif self.mode == QuantMode.CONVERT and cfg is not None and cfg.rhs is not None:
            # Quantize what TRAIN quantizes: the kernel cast to the compute dtype.
            kernel = quantize_operand(self._cast(kernel), cfg.rhs, k_contract)
            self.put_variable("params", "kernel", kernel)
        if static is not None and self.mode in (QuantMode.CONVERT, QuantMode.SERVE):
            x = self._static_lhs(x, x_contract, static)
        return product(x, self._cast(kernel), cfg)


    def _cast(self, kernel):
        if self.dtype is None:
            return kernel
        if isinstance(kernel, QArray):
            return dataclasses.replace(kernel, dtype=np.dtype(self.dtype))
        return kernel.astype(self.dtype)


class QDense(QuantizedLinear):
    """A Dense layer (no bias by default) whose product is a quantized ``dot_general``.

    ``kernel``: ``[in, features]``, contracting axis 0. Input ``[..., in]`` -> ``[..., features]``.
    The other fields (``config``, ``mode``, ``static_activation``, ...) are keyword-only; see
    :class:`QuantizedLinear`.

    Attributes:
      features: output size.
      use_bias: add a float bias (kept float in every mode).
      bias_init: initializer of the bias.

    Example:
      >>> layer = QDense(16, config=w8a8())
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 8)))["params"]
    """

    features: int
    use_bias: bool = False
    bias_init: Initializer = nn.initializers.zeros

    def kernel_contracting_axes(self, *_) -> tuple[int, ...]:
        return (0,)

    def dimension_numbers(self, ndim: int) -> tuple:
        """The ``dot_general`` dimension numbers of an input of rank ``ndim`` with the kernel."""
        return ((ndim - 1,), (0,)), ((), ())

    @nn.compact
    def __call__(self, x):
        if self.features <= 0:
            raise ValueError(f"QDense needs features > 0, got {self.features}.")
        nd = jnp.ndim(x)
        dims = self.dimension_numbers(nd)

        def product(x, k, cfg):
            return dot_general(x, k, dims, self.precision, config=cfg)

        y = self._apply(x, (jnp.shape(x)[-1], self.features), (nd - 1,), (0,), product)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(
                y.dtype
            )
        return y


class QDenseGeneral(QuantizedLinear):
    """A DenseGeneral: contracts the input's ``axis`` with the kernel's leading axes.

    ``kernel``: ``[*x.shape[axis], *features]``. Output: the input's other axes, then ``features``.

    Attributes:
      features: int or tuple of output sizes.
      axis: int or tuple of input axes to contract (default the last).
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1

    def _axes(self, ndim):
        axis = self.axis if isinstance(self.axis, Sequence) else (self.axis,)
        return tuple(sorted(a % ndim for a in axis))

    def kernel_contracting_axes(self, x=None) -> tuple[int, ...]:
        n = len(self.axis) if isinstance(self.axis, Sequence) else 1
        return tuple(range(n))

    def dimension_numbers(self, ndim: int) -> tuple:
        """The ``dot_general`` dimension numbers of an input of rank ``ndim`` with the kernel."""
        xa = self._axes(ndim)
        return (xa, tuple(range(len(xa)))), ((), ())

    @nn.compact
    def __call__(self, x):
        feats = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
        if not feats or any(f <= 0 for f in feats):
            raise ValueError(f"QDenseGeneral needs positive features, got {self.features!r}.")
        nd = jnp.ndim(x)
        dims = self.dimension_numbers(nd)
        (xa, ka), _ = dims
        shape = tuple(jnp.shape(x)[a] for a in xa) + feats

        def product(x, k, cfg):
            return dot_general(x, k, dims, self.precision, config=cfg)

        return self._apply(x, shape, xa, ka, product)


class QEinsum(QuantizedLinear):
    """An einsum ``"lhs,rhs->out"`` of the input with a kernel of shape ``shape``.

    The kernel's contracting axes are its indices that appear in the input but not the output.

    Attributes:
      shape: the kernel's shape.
      einsum_str: ``"lhs,rhs->out"`` (lhs the input, rhs the kernel).

    Example:
      >>> layer = QEinsum(shape=(8, 4, 16), einsum_str="bsd,dhk->bshk", config=w8a8())
    """

    shape: Sequence[int]
    einsum_str: str

    def kernel_contracting_axes(self, *_) -> tuple[int, ...]:
        return parse_einsum(self.einsum_str).rhs_contracting

    def dimension_numbers(self, ndim: int) -> tuple:
        """The einsum's contracting and batch axes as ``dot_general`` dimension numbers, for an
        input of rank ``ndim``."""
        return parse_einsum(self.einsum_str, ndim).dimension_numbers

    @nn.compact
    def __call__(self, x):
        spec = parse_einsum(self.einsum_str, jnp.ndim(x))
        if len(spec.rhs) != len(self.shape):
            raise ValueError(
                f"einsum_str {self.einsum_str!r} has {len(spec.rhs)} kernel axes, shape {self.shape}."
            )

        def product(x, k, cfg):
            return einsum(self.einsum_str, x, k, config=cfg, precision=self.precision)

        return self._apply(
            x, tuple(self.shape), spec.lhs_contracting, spec.rhs_contracting, product
        )


class QEmbed(nn.Module):
    """Token embedding ``[V, D]`` that can also be the (tied) output head.

    With a quantizing ``config`` the table is quantized as the rhs of the head product
    ``x [.., D] . E [V, D]`` (contracting axis 1: a scale per row, or groups along D). The
    lookup uses the same quantized rows in every mode (TRAIN: fake-quantized with a
    straight-through gradient), so TRAIN and SERVE agree.

    Attributes:
      num_embeddings, features: ``V`` and ``D``.
      config, mode: as for :class:`QDense`.
      dtype: output dtype of the lookup.
    """

    num_embeddings: int
    features: int
    config: DotGeneralConfig | None = None
    mode: QuantMode = QuantMode.TRAIN
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

    def setup(self):
        shape = (self.num_embeddings, self.features)
        spec = self._spec
        if self.mode == QuantMode.SERVE and spec is not None:

            def init(key, shape, dtype):
                return quantize_operand(
                    self._cast(self.embedding_init(key, shape, dtype)), spec, (1,)
                )

            self.embedding = self.param("embedding", init, shape, self.param_dtype)
        else:
            self.embedding = self.param("embedding", self.embedding_init, shape, self.param_dtype)

    def kernel_contracting_axes(self, *_) -> tuple[int, ...]:
        return (1,)  # the table is the rhs of the head product x . E^T

    @property
    def _spec(self):
        return self.config.rhs if self.config is not None else None

    def _cast(self, e):
        if self.dtype is None:
            return e
        if isinstance(e, QArray):
            return dataclasses.replace(e, dtype=np.dtype(self.dtype))
        return e.astype(self.dtype)

    def _table(self):
        """The table in the compute dtype; a QArray in CONVERT (stored) and SERVE."""
        e = self._cast(self.embedding)
        if self.mode == QuantMode.CONVERT and self._spec is not None:
            e = quantize_operand(e, self._spec, (1,))
            self.put_variable("params", "embedding", e)
        return e

    def __call__(self, tokens):
        """``tokens [...]`` int -> ``[..., D]``."""
        e = self._table()
        if isinstance(e, QArray):
            return gather_rows(e, tokens).dequantize(e.dtype)
        rows = jnp.take(e, tokens, axis=0)
        if self._spec is not None and self.mode == QuantMode.TRAIN:
            # Per-row quantization of the gathered rows equals that of the whole table.
            q = quantize_operand(jax.lax.stop_gradient(rows), self._spec, (rows.ndim - 1,))
            rows = rows + jax.lax.stop_gradient(q.dequantize(rows.dtype) - rows)
        return rows

    def attend(self, x):
        """The tied head: ``x [..., D] -> [..., V]`` through the quantized ``dot_general``."""
        e = self._table()
        if self.dtype is not None:
            x = x.astype(self.dtype)
        cfg = None if self.mode == QuantMode.CALIBRATE else self.config
        return dot_general(x, e, (((x.ndim - 1,), (1,)), ((), ())), config=cfg)


def init_learned_scales(model: nn.Module, params: Any, *example_args: Any) -> Any:
    """``params`` plus the ``kernel_scale`` of every ``learned_scale`` layer that lacks one,
    each the RTN scale of its kernel (so the LSQ model starts as plain QAT / RTN does).

    Existing scales are kept (e.g. GPTQ's, set beforehand). ``example_args``: one input to trace
    with (omit it for models with ``example_inputs()``, as the Transformer).

    Example:
      >>> params = init_learned_scales(Transformer(lsq_cfg), float_params)  # doctest: +SKIP
    """
    if not example_args:
        if not hasattr(model, "example_inputs"):
            raise ValueError(f"init_learned_scales needs an example input for "
                             f"{type(model).__name__}: pass it after params.")
        example_args = tuple(model.example_inputs())
    return _init_scales_apply(model.clone(mode=QuantMode.TRAIN), params, tuple(example_args))


@functools.partial(jax.jit, static_argnums=0)
def _init_scales_apply(model, params, args):
    _, new = model.apply({"params": params}, *args, mutable=["params"],
                         rngs={"params": jax.random.key(0)})
    had = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    added = [k for p, _ in jax.tree_util.tree_leaves_with_path(new["params"])
             if (k := jax.tree_util.keystr(p)) not in had and LEARNED_SCALE not in k]
    if added:  # a param other than a scale was missing: it would be a random init
        raise ValueError(f"init_learned_scales: params lack {added[:4]}; pass the model's full "
                         "float params.")
    return new["params"]
