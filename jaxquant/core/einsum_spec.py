"""The one parser of two-operand einsum strings (``"bsd,dh->bsh"``) into dot_general terms.

Lingo: each index letter of ``"lhs,rhs->out"`` is one of

* **contracting**: in both operands, not in the output (summed over);
* **batch**: in both operands and in the output (paired, kept);
* **free**: in one operand and in the output.

An index in one operand only that is not in the output would be a sum over a single operand;
it is rejected (sum it beforehand), as are ellipses and repeated indices.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
    """A parsed ``"lhs,rhs->out"`` einsum. Build it with :func:`parse_einsum`.

    Attributes:
      lhs, rhs, out: the index letters of each operand and of the output.
    """

    lhs: str
    rhs: str
    out: str

    @property
    def contracting(self) -> tuple[str, ...]:
        """Contracting labels, in rhs order (the rhs is the kernel of a layer)."""
        return tuple(c for c in self.rhs if c in self.lhs and c not in self.out)

    @property
    def batch(self) -> tuple[str, ...]:
        """Batch labels, in lhs order."""
        return tuple(c for c in self.lhs if c in self.rhs and c in self.out)

    @property
    def lhs_contracting(self) -> tuple[int, ...]:
        """Axes of the lhs that are contracted, paired with :attr:`rhs_contracting`."""
        return tuple(self.lhs.index(c) for c in self.contracting)

    @property
    def rhs_contracting(self) -> tuple[int, ...]:
        """Axes of the rhs that are contracted, ascending."""
        return tuple(self.rhs.index(c) for c in self.contracting)

    @property
    def dimension_numbers(self):
        """``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` for
        ``dot_general``, with the contracting pairs in lhs order."""
        contract = [c for c in self.lhs if c in self.contracting]
        return (
            (
                tuple(self.lhs.index(c) for c in contract),
                tuple(self.rhs.index(c) for c in contract),
            ),
            (
                tuple(self.lhs.index(c) for c in self.batch),
                tuple(self.rhs.index(c) for c in self.batch),
            ),
        )

    @property
    def output_perm(self) -> tuple[int, ...]:
        """Permutation from ``dot_general``'s output ``[batch, lhs free, rhs free]`` to ``out``."""
        produced = (
            list(self.batch)
            + [c for c in self.lhs if c not in self.rhs]
            + [c for c in self.rhs if c not in self.lhs]
        )
        return tuple(produced.index(c) for c in self.out)

    def rhs_in_output(self, rhs_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(shape, broadcast_shape)`` of a per-feature term of the rhs (e.g. a bias).

        ``shape`` keeps the rhs sizes of the rhs labels that reach the output, in output order;
        ``broadcast_shape`` has the output's rank, those sizes in place and 1 elsewhere.

        Example:
          >>> parse_einsum("bhk,hkf->bf").rhs_in_output((2, 8, 4))
          ((4,), (1, 4))
        """
        if len(rhs_shape) != len(self.rhs):
            raise ValueError(
                f"einsum rhs {self.rhs!r} has {len(self.rhs)} axes, the array {len(rhs_shape)}."
            )
        size = {c: int(n) for c, n in zip(self.rhs, rhs_shape, strict=True)}
        shape = tuple(size[c] for c in self.out if c in size)
        bshape = tuple(size.get(c, 1) for c in self.out)
        return shape, bshape


def parse_einsum(
    subscripts: str, lhs_ndim: int | None = None, rhs_ndim: int | None = None
) -> EinsumSpec:
    """Parses a two-operand einsum string.

    Args:
      subscripts: ``"lhs,rhs->out"``; spaces are ignored.
      lhs_ndim, rhs_ndim: the operands' ranks, checked when given.

    Returns:
      An :class:`EinsumSpec`.

    Raises:
      ValueError: for an ellipsis, a number of operands other than two, a missing output, a
        rank mismatch, a repeated index, or an index summed within one operand.

    Example:
      >>> parse_einsum("bsd,dh->bsh").dimension_numbers
      (((2,), (0,)), ((), ()))
    """
    s = subscripts.replace(" ", "")
    if "..." in s:
        raise ValueError("einsum: ellipsis ('...') is not supported; spell out the axes.")
    if "->" not in s or s.count(",") != 1:
        raise ValueError(f"einsum needs 'lhs,rhs->out' with two operands, got {subscripts!r}.")
    ins, out = s.split("->")
    la, ra = ins.split(",")
    if (lhs_ndim is not None and len(la) != lhs_ndim) or (
        rhs_ndim is not None and len(ra) != rhs_ndim
    ):
        raise ValueError(
            f"einsum {subscripts!r} does not match operand ranks {lhs_ndim}, {rhs_ndim}."
        )
    for name, t in (("lhs", la), ("rhs", ra), ("out", out)):
        if len(set(t)) != len(t):
            raise ValueError(f"einsum: repeated index in {name} {t!r} is not supported.")
    for c in out:
        if c not in la and c not in ra:
            raise ValueError(f"einsum: output index {c!r} is in neither operand.")
    for t, name in ((la, "lhs"), (ra, "rhs")):
        for c in t:
            if c not in out and (c not in la or c not in ra):
                raise ValueError(f"einsum: {name} index {c!r} is summed alone; sum it beforehand.")
    return EinsumSpec(la, ra, out)
