"""`Recipe`: what a PTQ run does, and the command line's recipe strings.

A recipe string is ``METHOD:QTYPE[:gSIZE][:asym|:full|:narrow][:mse][:a8]`` (``rtn:int4:g128``,
``gptq:int3:g128``, ``awq:int4:g128``, ``rtn:int4:g32:asym``, ``rtn:int8``,
``gptq:ternary:g64``, ``rtn:binary:g64``, ``rtn:int4:g128:narrow``, ``gptq:int4:g128:a8``).
``:a8`` serves the quantized weights with dynamic int8 activations (a scale per token), so the
products are integer (W4A8: :mod:`jaxquant.core.w4a8`); without it activations stay float. The grid of a symmetric
``int2`` .. ``int8`` recipe is ``full`` (codes ``-2**(N-1) .. 2**(N-1) - 1``, llama.cpp's and
Qwix's grid, scale ``= signed extreme / qmin``) or ``narrow`` (codes ``-qmax .. qmax``, scale
``= absmax / qmax``); :data:`FULL_RANGE_DEFAULT` says which one a recipe without either token
gets, and :attr:`Recipe.name` writes only the other one. Ternary and binary recipes have one
grid and take their ``absmean`` scale. A llama.cpp block grid can stand in place of
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

# The grid a symmetric int2..int8 weight recipe gets when it names none (``:full`` / ``:narrow``).
# Full range won RTN on SmolLM2-135M, PTB test perplexity 73.64 -> 63.07 at int4 g128 and
# 1215 -> 302 at int3 g128, held-out texts alike (experiments/results/full_range_grid.json).
# QuantSpec's own default (API.md) stays narrow.
FULL_RANGE_DEFAULT = True
GRID_TOKENS = {"full": True, "narrow": False}

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
        ``qtype``, ``group_size``, ``symmetric`` and ``full_range``.
      int8_activations: serve with dynamic int8 activations, one scale per token (``:a8``;
        W4A8 / W3A8 / W2A8 for symmetric int weights). The weights are found as without it.
      full_range: the symmetric int grid (``int2`` .. ``int8``): True uses every code
        ``qmin .. qmax`` (``QuantSpec.full_range``), False ``-qmax .. qmax``. None (the default)
        resolves to :data:`FULL_RANGE_DEFAULT` for those recipes and to False for the others
        (asymmetric, ternary, binary, float formats, fixed-format methods), where True is an
        error.
    """

    method: str = "rtn"
    qtype: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    mse_clip: bool = False
    alpha: float = 0.5
    grid: str | None = None
    full_range: bool | None = None
    int8_activations: bool = False

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
            if self.full_range is not None and self.full_range != g.get("full_range", False):
                raise ValueError(f"the {self.grid} grid fixes full_range="
                                 f"{g.get('full_range', False)}; leave full_range unset.")
            for k in ("qtype", "group_size", "symmetric"):
                object.__setattr__(self, k, g[k])
            object.__setattr__(self, "full_range", g.get("full_range", False))
        object.__setattr__(self, "qtype", canonical_qtype(self.qtype))
        qt = get_qtype(self.qtype)
        if alg.activations and self.qtype != "int8":
            raise ValueError(f"{self.method} is int8 weights and activations; got {self.qtype}.")
        if self.int8_activations and (_fixed(self.method) or qt.kind is not QKind.INT
                                      or not self.symmetric):
            raise ValueError(
                f":a8 (int8 activations) is for symmetric int weight recipes (W4A8); got "
                f"{self.method} with {self.qtype}{'' if self.symmetric else ' asym'}.")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}.")
        if alg.int_only and qt.kind is not QKind.INT:
            raise ValueError(f"{self.method} here supports int formats, got {self.qtype}.")
        if not self.symmetric and qt.codes is not None:
            raise ValueError(f"{self.qtype} is symmetric only (codes {qt.qmin}..{qt.qmax} times "
                             "a scale); drop :asym.")
        if self.grid is None:
            gridded = (self.symmetric and qt.has_full_range and alg.quantizes
                       and not alg.activations)
            if self.full_range is None:
                object.__setattr__(self, "full_range", gridded and FULL_RANGE_DEFAULT)
            elif not isinstance(self.full_range, bool):
                raise ValueError(f"full_range must be True, False or None, got "
                                 f"{self.full_range!r}.")
            elif self.full_range and not gridded:
                raise ValueError(
                    f"full_range (:full) is a grid of symmetric int2..int8 weight recipes; "
                    f"{self.method} with {self.qtype}"
                    f"{'' if self.symmetric else ' asym'} has none. Drop :full.")

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
        cal = "mse" if self.mse_clip else None  # None: the format's own (absmax, absmean)
        if self.grid is not None:
            cfg = DotGeneralConfig(rhs=QuantSpec(calibration=cal, **GGUF_GRIDS[self.grid]))
        else:
            cfg = weight_only(self.qtype, self.group_size, symmetric=self.symmetric,
                              calibration=cal)
        if self.full_range and self.grid is None:
            cfg = dataclasses.replace(cfg, rhs=dataclasses.replace(cfg.rhs, full_range=True))
        if self.int8_activations:
            cfg = dataclasses.replace(cfg, lhs=QuantSpec(qtype="int8"))
        return cfg

    @property
    def name(self) -> str:
        if _fixed(self.method):
            return self.method
        a8 = ["a8"] if self.int8_activations else []
        if self.grid is not None:
            return ":".join([self.method, self.grid] + (["mse"] if self.mse_clip else []) + a8)
        parts = [self.method, self.qtype]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        elif get_qtype(self.qtype).has_full_range and self.full_range != FULL_RANGE_DEFAULT:
            parts.append("full" if self.full_range else "narrow")
        if self.mse_clip:
            parts.append("mse")
        return ":".join(parts + a8)


def parse_recipe(text: str) -> Recipe:
    """Parses ``"gptq:int4:g128"`` and the like into a :class:`Recipe`.

    Raises:
      ValueError: naming the part that is wrong and the accepted form.
    """
    form = (f"METHOD:QTYPE[:gSIZE][:asym|:full|:narrow][:mse][:a8] with METHOD in "
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
        if bad := [p for p in parts[2:] if p not in ("mse", "a8")]:
            raise ValueError(f"{parts[1]} fixes groups of 32 and its own zero point; drop "
                             f"{':'.join(bad)!r} from {text!r} (only :mse, :a8 may follow).")
    for p in parts[2:]:
        if p.startswith("g") and p[1:].isdigit():
            kw["group_size"] = int(p[1:])
        elif p == "asym":
            kw["symmetric"] = False
        elif p in GRID_TOKENS:
            kw["full_range"] = GRID_TOKENS[p]
        elif p == "mse":
            kw["mse_clip"] = True
        elif p == "a8":
            kw["int8_activations"] = True
        else:
            raise ValueError(f"Unknown recipe option {p!r} in {text!r}; expected {form}.")
    if "full_range" in kw and not kw.get("symmetric", True):
        raise ValueError(f"{text!r}: :asym has a zero point and no symmetric grid; drop "
                         f":{'full' if kw['full_range'] else 'narrow'}.")
    return Recipe(**kw)
