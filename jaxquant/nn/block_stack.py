"""A model as block-by-block post-training quantization sees it: an input stage, then a stack of
blocks that share one :class:`~jaxquant.nn.sites.SiteTable`.

The PTQ driver (:func:`jaxquant.ptq.quantize_blocks`) knows no architecture: it asks a
:class:`BlockStack` for the first block's inputs, for a block module to run in float (to capture
its sites' inputs) and quantized (to make the next block's inputs), and for the served model's
config. An architecture plugs into GPTQ / AWQ / SmoothQuant with norm folding and sequential
calibration by subclassing it once; jaxquant's LLaMA is
:class:`~jaxquant.nn.transformer.TransformerStack`.

Lingo: ``n`` calibration windows of ``length`` tokens, hidden width ``D``; "rules" are
:class:`~jaxquant.nn.rules.QuantRule` s matched against module paths inside a block (``^``
anchored at the block) or inside the whole model (:attr:`BlockStack.block_prefix` in front).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxquant.nn.modes import QuantMode
from jaxquant.nn.rules import QuantRule
from jaxquant.nn.sites import SiteTable


class BlockStack(abc.ABC):
    """How to run a model block by block (subclass once per architecture).

    A block module's ``apply({"params": block_params}, h, *extras)`` returns the next hidden
    states ``[n, length, D]``, or a tuple whose first element they are (a block that also returns
    its KV cache). Its params are ``params[key]`` for ``key`` in :attr:`block_keys`, and the
    paths of its linears are those of :attr:`sites`.
    """

    @property
    @abc.abstractmethod
    def block_keys(self) -> tuple[str, ...]:
        """Top-level param keys of the blocks, in execution order (``("block_0", ...)``)."""

    @property
    @abc.abstractmethod
    def sites(self) -> SiteTable:
        """The input sites of one block (paths relative to the block's params)."""

    @property
    @abc.abstractmethod
    def block_prefix(self) -> str:
        r"""Regex of a block's module path inside the whole model, ending in ``/``
        (``r"(^|/)block_\d+/"``): block rules are this plus the linear's path."""

    @abc.abstractmethod
    def block_inputs(self, params: Mapping, tokens: jax.Array) -> tuple[jax.Array, tuple]:
        """``(h, extras)``: the first block's input ``h [n, length, D]`` for windows ``tokens
        [n, length]``, and the other arguments every block takes (arrays with leading axis
        ``n``: the driver slices them with ``h``; e.g. positions ``[n, length]``)."""

    @abc.abstractmethod
    def block(self, rules: Sequence[QuantRule] | None, mode: QuantMode) -> nn.Module:
        """A block module in ``mode`` quantized by ``rules`` (paths relative to the block);
        ``None``: the model's own rules (what its float forward uses)."""

    @abc.abstractmethod
    def serving(self, rules: Sequence[QuantRule] | None) -> Any:
        """The served model's config: the model's own, with ``rules`` (paths inside the whole
        model) quantizing the block linears; None: the model's own config unchanged."""


def block_output(out) -> jax.Array:
    """The hidden states of a block's output (the first element of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


__all__ = ["BlockStack", "block_output"]
