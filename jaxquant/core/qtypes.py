"""Numeric formats: what a quantized code can hold.

Three kinds of format:

* ``int``: signed integers ``int2`` .. ``int8``, codes in ``[-2**(N-1), 2**(N-1) - 1]``.
  Symmetric quantization uses the symmetric range ``[-qmax, qmax]`` (``qmax = 2**(N-1) - 1``)
  so that zero is exact and the grid is mirror-symmetric (or, with ``full_range``, every code);
  asymmetric quantization uses the full range with a zero point. Two sub-2-bit int formats
  have their own code sets and are symmetric only:

  - ``ternary``: codes ``{-1, 0, +1}`` (BitNet b1.58), stored in 2 bits, four per byte;
  - ``binary``: sign codes ``{-1, +1}`` (no zero), stored in 1 bit, eight per byte.

  Both default to the ``absmean`` calibration: ``scale = mean |x|`` per group.
* ``float``: ``fp8_e4m3`` and ``fp8_e5m2``, stored in the jnp float8 dtypes. The scale maps
  the calibrated range onto the format's largest finite value.
* ``codebook``: ``nf4`` (the 16 normal quantiles of QLoRA) and ``fp4_e2m1``. Codes are
  unsigned 4-bit indices into a fixed table of values in ``[-1, 1]``.

Sub-byte formats (``bits <= 4``) are packed: two 4-bit, four 2-bit or eight 1-bit codes per
byte.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
import numpy as np

# The NF4 table of QLoRA (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised
# to [-1, 1], with an exact zero. 7 negative values, zero, 8 positive values.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# The 15 distinct values of fp4 e2m1 (OCP MX spec), divided by its max 6 so the table spans
# [-1, 1]; -0 is dropped, so the 16th entry repeats the max (+1) and is never produced.
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
FP4_CODEBOOK = np.concatenate([-_E2M1[:0:-1], _E2M1, [6.0]]) / 6.0
FP4_CODEBOOK = FP4_CODEBOOK.astype(np.float32)


class QKind(str, enum.Enum):
    """The kind of a numeric format; it decides how codes map to values.

    * ``INT``: signed integer codes, ``value = (code - zero_point) * scale``.
    * ``FLOAT``: fp8 codes stored in a float8 dtype, ``value = code * scale``.
    * ``CODEBOOK``: unsigned indices into a fixed table (nf4, fp4),
      ``value = table[code] * scale``.

    A ``str`` enum: ``QKind.INT == "int"`` holds, and ``str(QKind.INT)`` is ``"int"``.
    """

    INT = "int"
    FLOAT = "float"
    CODEBOOK = "codebook"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class QType:
    """A numeric format.

    Attributes:
      name: canonical name, e.g. ``"int4"``.
      kind: a :class:`QKind`.
      bits: bits per code.
      storage_dtype: dtype of the stored codes before packing (``int8`` for int and codebook,
        the float8 dtype for fp8).
      max_value: largest finite magnitude of the code grid (``qmax`` for ints, the format's
        max for fp8, 1.0 for codebooks).
      codes: for int formats with their own code set (``ternary``, ``binary``), the
        ``(qmin, qmax)`` of the codes; None: the two's complement range of ``bits``.
      has_zero: whether 0 is a code (False only for ``binary``, whose codes are ``{-1, +1}``).
      default_calibration: the :class:`~jaxquant.core.spec.QuantSpec` calibration used when
        none is given (``"absmean"`` for ternary and binary, ``"absmax"`` otherwise).
    """

    name: str
    kind: QKind
    bits: int
    storage_dtype: object
    max_value: float
    codes: tuple[int, int] | None = None
    has_zero: bool = True
    default_calibration: str = "absmax"

    @property
    def packed(self) -> bool:
        """Whether codes are packed several to a byte."""
        return self.bits <= 4 and self.kind is not QKind.FLOAT

    @property
    def storage_bits(self) -> int:
        """Bits each code occupies once packed (int3 rides in a 4-bit nibble)."""
        if not self.packed:
            return 8
        if self.bits <= 2:
            return self.bits
        return 4

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.storage_bits

    @property
    def qmin(self) -> int:
        """Smallest integer code (ints: ``-2**(N-1)``, ternary/binary: -1; codebooks: 0)."""
        if self.codes is not None:
            return self.codes[0]
        if self.kind is QKind.INT:
            return -(2 ** (self.bits - 1))
        return 0

    @property
    def qmax(self) -> int:
        """Largest integer code (ints: ``2**(N-1) - 1``, ternary/binary: 1; codebooks: 15)."""
        if self.codes is not None:
            return self.codes[1]
        if self.kind is QKind.INT:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def has_full_range(self) -> bool:
        """Whether a symmetric grid can use one more negative code (``qmin < -qmax``): true for
        ``int2`` .. ``int8``, false for ternary and binary (already mirror-symmetric)."""
        return self.kind is QKind.INT and self.qmin < -self.qmax

    @property
    def codebook(self) -> np.ndarray | None:
        if self.name == "nf4":
            return NF4_CODEBOOK
        if self.name == "fp4_e2m1":
            return FP4_CODEBOOK
        return None


def _build_registry() -> dict[str, QType]:
    reg = {}
    for n in range(2, 9):
        reg[f"int{n}"] = QType(f"int{n}", QKind.INT, n, jnp.int8, float(2 ** (n - 1) - 1))
    # Sub-2-bit: symmetric only, scale = mean |x| per group by default (BitNet b1.58's absmean;
    # for sign codes it is also the L2-optimal scale, argmin_s ||x - s sign(x)||).
    reg["ternary"] = QType("ternary", QKind.INT, 2, jnp.int8, 1.0, codes=(-1, 1),
                           default_calibration="absmean")
    reg["binary"] = QType("binary", QKind.INT, 1, jnp.int8, 1.0, codes=(-1, 1), has_zero=False,
                          default_calibration="absmean")
    reg["fp8_e4m3"] = QType(
        "fp8_e4m3", QKind.FLOAT, 8, jnp.float8_e4m3fn, float(jnp.finfo(jnp.float8_e4m3fn).max)
    )
    reg["fp8_e5m2"] = QType(
        "fp8_e5m2", QKind.FLOAT, 8, jnp.float8_e5m2, float(jnp.finfo(jnp.float8_e5m2).max)
    )
    reg["nf4"] = QType("nf4", QKind.CODEBOOK, 4, jnp.int8, 1.0)
    reg["fp4_e2m1"] = QType("fp4_e2m1", QKind.CODEBOOK, 4, jnp.int8, 1.0)
    return reg


QTYPES: dict[str, QType] = _build_registry()

_DTYPE_ALIASES = {
    np.dtype(jnp.int8): "int8",
    np.dtype(jnp.int4): "int4",
    np.dtype(jnp.int2): "int2",
    np.dtype(jnp.float8_e4m3fn): "fp8_e4m3",
    np.dtype(jnp.float8_e5m2): "fp8_e5m2",
}
# No "int1" for binary: intN names the two's complement grid -2**(N-1)..2**(N-1)-1, and a sign
# code {-1, +1} is not the 1-bit one ({-1, 0}).
_NAME_ALIASES = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "fp8": "fp8_e4m3", "fp4": "fp4_e2m1"}


def canonical_qtype(qtype) -> str:
    """Returns the canonical name of ``qtype`` (a name or a jnp dtype).

    Raises:
      ValueError: if ``qtype`` is not a supported format.
    """
    if isinstance(qtype, QType):
        return qtype.name
    if isinstance(qtype, str):
        name = _NAME_ALIASES.get(qtype.lower(), qtype.lower())
        if name in QTYPES:
            return name
    else:
        try:
            dt = np.dtype(qtype)
        except TypeError:
            dt = None
        if dt in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[dt]
    raise ValueError(
        f"Unsupported qtype {qtype!r}. Use one of {sorted(QTYPES)} "
        "or the dtypes jnp.int8, jnp.int4, jnp.int2, jnp.float8_e4m3fn, jnp.float8_e5m2."
    )


def get_qtype(qtype) -> QType:
    """Looks up a :class:`QType` by name or jnp dtype."""
    return QTYPES[canonical_qtype(qtype)]
