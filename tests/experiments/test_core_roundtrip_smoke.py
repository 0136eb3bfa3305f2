"""Smoke test: experiments/core_roundtrip.py runs end to end on a tiny weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxquant as jq
from tests.experiments.helpers import load_experiment


@pytest.fixture(scope="module")
def core_roundtrip():
    return load_experiment("core_roundtrip")


def test_run_tiny(core_roundtrip, tmp_path):
    m = core_roundtrip
    rows, cols = 256, 16
    formats = [f for f in m.FORMATS if f[0] in ("int8", "int4", "int2", "int4 asym")]
    grans = [("per-channel", None), ("g128", 128)]
    out = tmp_path / "core_roundtrip.json"
    result = m.run(rows, cols, granularities=grans, formats=formats, out=out)
    assert json.loads(out.read_text()) == result
    assert {"device", "jax_version", "date"} <= set(result)

    storage = {(r["format"], r["granularity"]): r["bytes"] for r in result["storage"]}
    assert storage[("f32", "-")] == 4 * rows * cols and storage[("bf16", "-")] == 2 * rows * cols
    # Packed codes (half / quarter / one byte per weight) plus one float32 scale per column.
    assert storage[("int4", "per-channel")] == rows * cols // 2 + 4 * cols
    assert storage[("int2", "per-channel")] == rows * cols // 4 + 4 * cols
    assert storage[("int8", "g128")] == rows * cols + 4 * cols * rows // 128
    assert storage[("int4 asym", "g128")] == rows * cols // 2 + 8 * cols * rows // 128

    err = {(r["format"], r["granularity"]): r for r in result["errors"]}
    assert len(err) == len(formats) * len(grans)
    qt = {label: (jq.get_qtype(q), sym) for label, q, sym in formats}
    for dist in ("gaussian", "student_t3"):
        rms = {k: r[f"{dist}_rel_rms"] for k, r in err.items()}
        # Fewer bits, more error.
        assert (
            rms[("int8", "per-channel")]
            < rms[("int4", "per-channel")]
            < rms[("int2", "per-channel")]
        )
        for (label, _), r in err.items():
            t, sym = qt[label]
            if t.kind != "int":
                continue
            # Half a step of the widest group: absmax / qmax, or (max - min) / (2**N - 1).
            amax = r[f"{dist}_absmax"]
            step = amax / t.qmax if sym else 2 * amax / (2**t.bits - 1)
            slack = 8 * float(np.finfo(np.float32).eps) * amax  # float32 rounding
            assert 0 < r[f"{dist}_max_abs_err"] <= 0.5 * step + slack
            assert 0 < rms[(label, r["granularity"])] < 1

    md = m.markdown(result)
    assert md.count("\n|") >= len(result["storage"]) + len(result["errors"])
