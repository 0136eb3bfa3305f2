"""Shared by the core quantize and calibration tests: the formats and layouts they sweep, and
the scale grid as an independent numpy reference (which elements share each scale entry)."""

from __future__ import annotations

import itertools

import numpy as np

import jaxquant as jq

EPS32 = float(np.finfo(np.float32).eps)

# (qtype, symmetric): every format the library supports.
INT_FORMATS = [(f"int{n}", sym) for n in range(2, 9) for sym in (True, False)]
FLOAT_FORMATS = [("fp8_e4m3", True), ("fp8_e5m2", True)]
CODEBOOK_FORMATS = [("nf4", True), ("fp4_e2m1", True)]
ALL_FORMATS = INT_FORMATS + FLOAT_FORMATS + CODEBOOK_FORMATS
FORMAT_IDS = [f"{q}-{'sym' if s else 'asym'}" for q, s in ALL_FORMATS]

# (shape, layout kwargs): per tensor, per channel, groups with and without channel axes, 2-D
# and 3-D tensors, negative axes. Few distinct layouts: each one compiles its own XLA ops.
LAYOUTS = [
    ((8, 6), dict()),
    ((8, 6), dict(channel_axes=(-1,))),
    ((8, 6), dict(channel_axes=(1,), group_size=4)),  # group axis inferred (the only shared one)
    ((2, 8, 3), dict(channel_axes=(0,), group_size=4, group_axis=1)),
    ((2, 8, 3), dict(group_size=2, group_axis=-2)),  # two shared axes, no channel axes
    ((2, 8, 3), dict(channel_axes=(0, 1))),  # packed along the axis of 3: padding for all
]
# Every format with absmax; the other calibrations on one format of each kind (int symmetric
# and asymmetric, float, codebook) to keep the suite fast.
_SUBSET = [("int2", True), ("int4", False), ("fp8_e4m3", True), ("nf4", True)]
CALIBRATION_CASES = [(q, s, "absmax") for q, s in ALL_FORMATS] + [
    (q, s, c) for c in ("minmax", "percentile", "mse") for q, s in _SUBSET
]


# --- independent numpy reference -----------------------------------------------------------------
def _resolved(shape, kw):
    nd = len(shape)
    channel = {a % nd for a in kw.get("channel_axes", ())}
    g = kw.get("group_size")
    ga = kw.get("group_axis")
    if g is not None and ga is None:
        (ga,) = [a for a in range(nd) if a not in channel]
    ga = None if ga is None else ga % nd
    return channel, ga, g


def group_slices(shape, kw):
    """Index tuples, one per scale entry, selecting the elements that share it."""
    channel, ga, g = _resolved(shape, kw)
    ranges = []
    for a, n in enumerate(shape):
        if a in channel:
            ranges.append([slice(i, i + 1) for i in range(n)])
        elif a == ga:
            ranges.append([slice(j * g, (j + 1) * g) for j in range(n // g)])
        else:
            ranges.append([slice(None)])
    return list(itertools.product(*ranges))


def spec_for(qtype, symmetric, kw, **extra):
    return jq.QuantSpec(qtype=qtype, symmetric=symmetric, **kw, **extra)
