"""`Recipe`: what a PTQ run does, and the command line's recipe strings.

A recipe string is ``METHOD:QTYPE[:gSIZE][:asym]`` (``rtn:int4:g128``, ``gptq:int3:g128``,
``awq:int4:g128``, ``rtn:int4:g32:asym``, ``rtn:int8``), a llama.cpp block grid in place of
``QTYPE:...`` (``gptq:q4_0``, ``rtn:q8_0``, ``awq:q4_1``: see :data:`GGUF_GRIDS`), or a method
with a fixed format: ``fp32``, ``w8a8`` (dynamic int8 weights and activations) and
``smoothquant`` (SmoothQuant folding, then W8A8). Methods are the keys of
:data:`jaxquant.ptq.registry.ALGORITHMS`; what each accepts is said by its algorithm class. A
string is parsed once, at the command line's edge, into a frozen :class:`Recipe`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jaxquant.core.dot_config import DotGeneralConfig, w8a8, weight_only
from jaxquant.core.qtypes import QKind, canonical_qtype, get_qtype
from jaxquant.core.spec import QuantSpec
from jaxquant.ptq.registry import ALGORITHMS, ALIASES

if TYPE_CHECKING:
    from jaxquant.ptq.algorithm import PTQAlgorithm
    from jaxquant.ptq.options import PTQOptions

METHODS = tuple(ALGORITHMS)

# llama.cpp block formats a recipe can target exactly: the QuantSpec fields that put the weights
# on the format's grid (blocks of 32 inputs, f16 scales chosen before the codes), so that
# `jaxquant export --format gguf` hands over the very weights jaxquant evaluated.
GGUF_GRIDS = {
    # d = max / -8 (the signed extreme lands on code -8), codes -8..7.
    "q4_0": dict(qtype="int4", group_size=32, symmetric=True, full_range=True,
                 fp16_scales=True, scale_dtype="float16"),
    # d = (max - min) / 15, m = min, both f16; codes 0..15 (stored -8..7 with a zero point).
    "q4_1": dict(qtype="int4", group_size=32, symmetric=False, fp16_scales=True),
    # d = absmax / 127, codes -127..127.
    "q8_0": dict(qtype="int8", group_size=32, symmetric=True, fp16_scales=True,
                 scale_dtype="float16"),
}


def _fixed(method: str) -> bool:
    """Whether ``method`` has a fixed format (no qtype / group options)."""
    alg = ALGORITHMS[method]
    return not alg.quantizes or alg.activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A post-training quantization recipe.

    Attributes:
      method: one of ``METHODS`` (a key of :data:`~jaxquant.ptq.registry.ALGORITHMS`).
      qtype: weight format (ignored for fp32; int8 for w8a8/smoothquant).
      group_size: None (per output channel) or the group size along the input axis.
      symmetric: False adds a zero point per group.
      mse_clip: RTN with the MSE clip search.
      alpha: SmoothQuant's migration strength.
      grid: None, or a llama.cpp block grid of :data:`GGUF_GRIDS` (``"q4_0"``): it fixes
        ``qtype``, ``group_size`` and ``symmetric``.
    """

    method: str = "rtn"
    qtype: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    mse_clip: bool = False
    alpha: float = 0.5
    grid: str | None = None

    def __post_init__(self):
        if self.method not in ALGORITHMS:
            raise ValueError(f"Unknown method {self.method!r}; use one of {METHODS}.")
        alg = ALGORITHMS[self.method]
        if self.grid is not None:
            if self.grid not in GGUF_GRIDS:
                raise ValueError(f"Unknown grid {self.grid!r}; use one of {sorted(GGUF_GRIDS)}.")
            if _fixed(self.method):
                raise ValueError(f"{self.method} cannot target the {self.grid} grid; use one of "
                                 f"{', '.join(m for m in METHODS if not _fixed(m))}.")
            g = GGUF_GRIDS[self.grid]
            for k in ("qtype", "group_size", "symmetric"):
                object.__setattr__(self, k, g[k])
        object.__setattr__(self, "qtype", canonical_qtype(self.qtype))
        if alg.activations and self.qtype != "int8":
            raise ValueError(f"{self.method} is int8 weights and activations; got {self.qtype}.")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}.")
        if alg.int_only and get_qtype(self.qtype).kind is not QKind.INT:
            raise ValueError(f"{self.method} here supports int formats, got {self.qtype}.")

    def algorithm(self, options: PTQOptions) -> PTQAlgorithm:
        """The registered algorithm of ``method``, set up with this recipe and ``options``."""
        return ALGORITHMS[self.method](recipe=self, options=options)

    @property
    def dot_config(self) -> DotGeneralConfig | None:
        """The ``dot_general`` config the quantized model serves with."""
        alg = ALGORITHMS[self.method]
        if not alg.quantizes:
            return None
        if alg.activations:
            return w8a8()
        cal = "mse" if self.mse_clip else "absmax"
        if self.grid is not None:
            return DotGeneralConfig(rhs=QuantSpec(calibration=cal, **GGUF_GRIDS[self.grid]))
        return weight_only(self.qtype, self.group_size, symmetric=self.symmetric, calibration=cal)

    @property
    def name(self) -> str:
        if _fixed(self.method):
            return self.method
        if self.grid is not None:
            return ":".join([self.method, self.grid] + (["mse"] if self.mse_clip else []))
        parts = [self.method, self.qtype]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        if self.mse_clip:
            parts.append("mse")
        return ":".join(parts)


def parse_recipe(text: str) -> Recipe:
    """Parses ``"gptq:int4:g128"`` and the like into a :class:`Recipe`.

    Raises:
      ValueError: naming the part that is wrong and the accepted form.
    """
    form = (f"METHOD:QTYPE[:gSIZE][:asym][:mse] with METHOD in "
            f"{'|'.join(m for m in METHODS if not _fixed(m))}, "
            f"or {' | '.join(m for m in METHODS if _fixed(m))}")
    parts = [p for p in text.strip().lower().split(":") if p]
    if not parts:
        raise ValueError(f"Empty recipe; expected {form}.")
    method = parts[0]
    name = ALIASES.get(method, method)
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown method {method!r} in {text!r}; expected {form}.")
    alg = ALGORITHMS[name]
    if not alg.quantizes:
        return Recipe(method=name)
    if alg.activations:
        if len(parts) > 1 and parts[1:] != ["int8"]:
            raise ValueError(f"{method} takes no options (it is int8); got {text!r}.")
        return Recipe(method=name)
    if len(parts) < 2:
        raise ValueError(f"Recipe {text!r} lacks a qtype (e.g. {method}:int4:g128).")
    kw = dict(method=method, qtype=parts[1])
    if parts[1] in GGUF_GRIDS:
        kw = dict(method=method, grid=parts[1])
        if bad := [p for p in parts[2:] if p != "mse"]:
            raise ValueError(f"{parts[1]} fixes groups of 32 and its own zero point; drop "
                             f"{':'.join(bad)!r} from {text!r} (only :mse may follow).")
    for p in parts[2:]:
        if p.startswith("g") and p[1:].isdigit():
            kw["group_size"] = int(p[1:])
        elif p == "asym":
            kw["symmetric"] = False
        elif p == "mse":
            kw["mse_clip"] = True
        else:
            raise ValueError(f"Unknown recipe option {p!r} in {text!r}; expected {form}.")
    return Recipe(**kw)
