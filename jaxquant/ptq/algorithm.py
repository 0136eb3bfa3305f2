"""The protocol of a PTQ algorithm, as the block-by-block driver (:mod:`~jaxquant.ptq.pipeline`)
calls it.

For each decoder block, the driver

1. runs the float block on the calibration inputs and measures, at each input site of the
   model's :class:`~jaxquant.nn.sites.SiteTable`, the statistics ``fold_needs`` asks for (plus
   ``needs`` when the algorithm is not ``sequential``);
2. asks :meth:`PTQAlgorithm.site_scale` for a per-input-channel scale ``s`` of each site that
   has a fold target, and folds it (``x @ W == (x / s) @ (diag(s) W)``; the op before absorbs
   ``1 / s``);
3. quantizes every linear with :meth:`PTQAlgorithm.quantize_linear`, from the float pass's
   statistics, or, when ``sequential``, site by site from inputs recomputed with the earlier
   sites' linears already quantized;
4. runs the quantized block to make the next block's inputs.

An algorithm is a frozen dataclass built from the recipe and the options. A new one is one file
(a subclass) plus one line in :data:`jaxquant.ptq.registry.ALGORITHMS`. Its class attributes
tell the recipe parser which formats it takes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import jax

from jaxquant.core.qarray import QArray
from jaxquant.core.spec import QuantSpec
from jaxquant.nn.sites import Site, SiteTable
from jaxquant.ptq.hessian import InputStats, abs_mean, hessian

if TYPE_CHECKING:
    from jaxquant.ptq.options import PTQOptions
    from jaxquant.ptq.recipe import Recipe


def effective_group(d_in: int, group: int | None) -> int | None:
    """The group size used for a layer with ``d_in`` inputs: ``group`` when it divides ``d_in``,
    else the largest divisor of ``d_in`` below it (SmolLM2's ``d_model = 576`` is not a
    multiple of 128, so its "g128" layers use groups of 96). None stays None."""
    if group is None or d_in % group == 0:
        return group
    return max(g for g in range(1, group) if d_in % g == 0)


class Stat(enum.Enum):
    """Statistics of a site's inputs ``x [tokens, d_in]`` an algorithm can ask for.

    ``ABS_MEAN`` and ``ABS_MAX`` cost nothing extra (every measurement keeps them); ``HESSIAN``
    adds a ``[d_in, d_in]`` accumulator and ``SAMPLE`` keeps up to ``PTQOptions.awq_tokens``
    evenly spaced token rows.
    """

    HESSIAN = "hessian"  # H = 2 X^T X / n, [d_in, d_in]
    ABS_MEAN = "abs_mean"  # mean |x| per channel, [d_in]
    ABS_MAX = "abs_max"  # max |x| per channel, [d_in]
    SAMPLE = "sample"  # token rows of x, [n, d_in]


@dataclasses.dataclass(frozen=True)
class SiteInputs:
    """What the driver measured at one site's inputs, seen as the site's linears read them.

    After a fold with ``scale = s`` the linears read ``x / s``: the accessors return the
    statistics of ``x / s`` computed from those of ``x``.

    Attributes:
      stats: accumulated :class:`~jaxquant.ptq.InputStats` of ``x`` (with the Hessian only
        when asked for), or None when nothing was measured.
      raw_sample: ``[n, d_in]`` token rows of ``x``, or None.
      scale: ``s [d_in]`` folded into the op before the site, or None.
    """

    stats: InputStats | None = None
    raw_sample: jax.Array | None = None
    scale: jax.Array | None = None

    def _inv(self):
        return None if self.scale is None else 1.0 / self.scale

    def hessian(self) -> jax.Array:
        """``H = 2 X^T X / n`` ``[d_in, d_in]`` of the linears' inputs."""
        if self.stats is None:
            raise ValueError("No statistics were measured at this site: ask for Stat.HESSIAN.")
        h = hessian(self.stats)
        inv = self._inv()
        return h if inv is None else h * inv[:, None] * inv[None, :]

    def sample(self) -> jax.Array:
        """``[n, d_in]`` token rows of the linears' inputs."""
        if self.raw_sample is None:
            raise ValueError("No sample was kept at this site: ask for Stat.SAMPLE.")
        inv = self._inv()
        return self.raw_sample if inv is None else self.raw_sample * inv

    def abs_max(self) -> jax.Array:
        """``max |x|`` per input channel ``[d_in]`` of the linears' inputs."""
        inv = self._inv()
        return self.stats.abs_max if inv is None else self.stats.abs_max * inv

    def abs_mean(self) -> jax.Array:
        """``mean |x|`` per input channel ``[d_in]`` of the linears' inputs."""
        inv = self._inv()
        return abs_mean(self.stats) if inv is None else abs_mean(self.stats) * inv


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQAlgorithm:
    """Base of the PTQ algorithms: no statistics, no fold (subclasses quantize).

    Attributes:
      recipe: the :class:`~jaxquant.ptq.Recipe` (format, group size, symmetry, ``alpha``).
      options: the :class:`~jaxquant.ptq.PTQOptions`.

    Class attributes (what a recipe with this method may say):
      quantizes: False for the float "method" (nothing to do).
      activations: int8 weights *and* activations (W8A8): the recipe takes no format options.
      int_only: only ``intN`` weight formats.
    """

    recipe: Recipe
    options: PTQOptions

    quantizes: ClassVar[bool] = True
    activations: ClassVar[bool] = False
    int_only: ClassVar[bool] = False

    def weight_spec(self, d_in: int) -> QuantSpec:
        """The recipe's weight spec for a kernel with ``d_in`` rows (group size from
        :func:`effective_group`)."""
        base = self.recipe.dot_config.rhs
        return dataclasses.replace(base, group_size=effective_group(d_in, base.group_size))

    def check(self, sites: SiteTable) -> None:
        """Raises ValueError when the algorithm (with its options) cannot run on blocks with
        these sites."""
        del sites

    @property
    def fold_needs(self) -> frozenset[Stat]:
        """Statistics of the *float* block's site inputs that :meth:`site_scale` reads."""
        return frozenset()

    @property
    def needs(self) -> frozenset[Stat]:
        """Statistics of the site inputs that :meth:`quantize_linear` reads."""
        return frozenset()

    @property
    def sequential(self) -> bool:
        """Measure ``needs`` site by site on inputs recomputed with the earlier sites' linears
        already quantized (False: once, on the float block, corrected for the folded scales)."""
        return False

    @property
    def calibrated(self) -> bool:
        """Whether the algorithm needs calibration data at all."""
        return bool(self.fold_needs or self.needs or self.sequential)

    def site_scale(
        self, site: Site, inputs: SiteInputs, kernels: Sequence[jax.Array],
        block: Mapping[str, jax.Array],
    ) -> jax.Array | None:
        """The per-input-channel scale ``s [d_in]`` to fold at ``site``, or None for no fold.

        Called only for sites with a fold target, on the float block.

        Args:
          site: the :class:`~jaxquant.nn.sites.Site`.
          inputs: ``fold_needs`` of the float block's inputs at the site.
          kernels: the site's float kernels ``[d_in, d_out_i]``, in ``site.linears`` order.
          block: every float param of the block, by path (``"mlp/down_proj/kernel"``).
        """
        del site, inputs, kernels, block
        return None

    def quantize_linear(
        self, kernel: jax.Array, spec: QuantSpec, inputs: SiteInputs, *, site: Site,
        linear: str,
    ) -> QArray:
        """Quantizes one (folded) kernel ``[d_in, d_out]``.

        Args:
          kernel: the kernel, contracting axis 0.
          spec: the weight operand spec (format, group size after
            :func:`~jaxquant.ptq.effective_group`, symmetry, calibration; no axes).
          inputs: ``needs`` of the linear's inputs.
          site: the linear's site.
          linear: the linear's module path (one of ``site.linears``).

        Returns:
          A :class:`~jaxquant.core.QArray` laid out as ``quantize_operand(kernel, spec, (0,))``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not quantize linears.")


def compose(scaler: type[PTQAlgorithm], quantizer: type[PTQAlgorithm]) -> type[PTQAlgorithm]:
    """The algorithm that folds the scales ``scaler`` picks, then quantizes the folded linears
    as ``quantizer`` does (``compose(AWQ, GPTQ)`` is ``awq+gptq``).

    Example:
      >>> AWQGPTQ = compose(AWQ, GPTQ)  # doctest: +SKIP
    """

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Composed(PTQAlgorithm):
        quantizes: ClassVar[bool] = quantizer.quantizes
        activations: ClassVar[bool] = scaler.activations or quantizer.activations
        int_only: ClassVar[bool] = scaler.int_only or quantizer.int_only

        @property
        def _scaler(self) -> PTQAlgorithm:
            return scaler(recipe=self.recipe, options=self.options)

        @property
        def _quantizer(self) -> PTQAlgorithm:
            return quantizer(recipe=self.recipe, options=self.options)

        def check(self, sites):
            self._scaler.check(sites)
            self._quantizer.check(sites)

        @property
        def fold_needs(self):
            return self._scaler.fold_needs

        @property
        def needs(self):
            return self._quantizer.needs

        @property
        def sequential(self):
            return self._quantizer.sequential

        def site_scale(self, site, inputs, kernels, block):
            return self._scaler.site_scale(site, inputs, kernels, block)

        def quantize_linear(self, kernel, spec, inputs, *, site, linear):
            return self._quantizer.quantize_linear(kernel, spec, inputs, site=site,
                                                   linear=linear)

    Composed.__name__ = Composed.__qualname__ = f"{scaler.__name__}+{quantizer.__name__}"
    return Composed


@dataclasses.dataclass(frozen=True, kw_only=True)
class Float(PTQAlgorithm):
    """``fp32``: nothing is quantized."""

    quantizes: ClassVar[bool] = False
