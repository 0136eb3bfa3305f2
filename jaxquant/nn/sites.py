"""Input sites of a block: which linears read the same input, and where a scale of it can fold.

Post-training algorithms (:mod:`jaxquant.ptq`) calibrate on the inputs of a block's linears and
may rescale those inputs per channel (SmoothQuant, AWQ: ``x @ W == (x / s) @ (diag(s) W)``), the
``1 / s`` being absorbed by the op before. A :class:`SiteTable` says this once, for one block of
one architecture; the PTQ driver reads it and knows no layer names. The LLaMA block's table is
:func:`jaxquant.nn.transformer.block_sites`; another architecture writes its own.

Lingo: paths are ``/``-joined names relative to the block's params (``"attn/q_proj"`` is the
module whose param ``"kernel"`` is ``[d_in, d_out]``; ``"attn_norm/scale"`` is a param).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Site:
    """Linears of a block that read one input ``x [..., d_in]``.

    Attributes:
      name: the site's name (``"attn_in"``), unique in its table.
      linears: module paths of the linears (``("attn/q_proj", "attn/k_proj")``), in execution
        order; each has a param ``kernel [d_in, d_out]``.
      d_in: the input width (every linear of the site has ``d_in`` rows).
      fold_into: path of the param of the op before the site whose last axis is the site's input
        channels, dividing which by ``s [d_in]`` divides ``x`` by ``s`` (an RMSNorm
        ``"attn_norm/scale" [d_in]``, or a linear ``"mlp/up_proj/kernel" [.., d_in]`` feeding the
        site through an elementwise product); None when no such op exists.
      bilinear: linears whose outputs are multiplied with each other's (attention's q and k), so
        their own output error is not the block's (AWQ skips their clip search).
      output: ``output(kernels, x, block) -> y``: what the site feeds, given the site's kernels
        (in ``linears`` order), its input ``x [n, d_in]`` and all float params of the block
        (path -> array); AWQ's search target. None: the linears' own outputs.
    """

    name: str
    linears: tuple[str, ...]
    d_in: int
    fold_into: str | None = None
    bilinear: tuple[str, ...] = ()
    output: Callable[[Sequence[jax.Array], jax.Array, Mapping[str, jax.Array]], jax.Array] | None = (
        None
    )

    def __post_init__(self):
        if not self.linears:
            raise ValueError(f"Site {self.name!r} has no linears; list the module paths it feeds.")
        if self.d_in < 1:
            raise ValueError(f"Site {self.name!r}: d_in must be positive, got {self.d_in}.")
        if bad := [b for b in self.bilinear if b not in self.linears]:
            raise ValueError(f"Site {self.name!r}: bilinear {bad} are not among its linears.")

    @property
    def kernels(self) -> tuple[str, ...]:
        """Param paths of the site's kernels (``"attn/q_proj/kernel"``)."""
        return tuple(f"{lin}/kernel" for lin in self.linears)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiteTable:
    """The input sites of one block, in execution order (a later site's input depends on the
    outputs of the earlier sites' linears: GPTQ's "true sequential" order).

    Example:
      >>> from jaxquant.nn.transformer import block_sites
      >>> [s.name for s in block_sites(TransformerConfig.tiny()).sites]
      ['attn_in', 'o_in', 'mlp_in', 'down_in']
    """

    sites: tuple[Site, ...]

    def __post_init__(self):
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"Site names must be unique; got {names}.")
        if len(set(self.linears)) != len(self.linears):
            raise ValueError(f"A linear belongs to one site only; got {self.linears}.")

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear's module path, in execution order."""
        return tuple(lin for s in self.sites for lin in s.linears)

    def __getitem__(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"No site {name!r}; the sites are {[s.name for s in self.sites]}.")

    def __iter__(self):
        return iter(self.sites)
