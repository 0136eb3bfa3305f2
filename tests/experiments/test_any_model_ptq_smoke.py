"""Smoke test: experiments/any_model_ptq.py runs end to end on one small calibration batch
(about a minute of CPU: GPTQ compiles per kernel shape, so it is marked slow)."""

from __future__ import annotations

import pytest

from tests.experiments.helpers import load_experiment


@pytest.mark.slow
def test_run_one_batch():
    m = load_experiment("any_model_ptq")
    result = m.run(n_batches=1, batch=8, models=("linen_vit", "nnx_lm"))
    assert result["user_code_lines"] == {"linen": 3, "nnx": 3}
    for name, rows in result["models"].items():
        int4, int8 = rows["int4"], rows["int8"]
        # GPTQ and RTN serve the same layout: the same bytes
        assert int4["serving_bytes"] == int4["rtn_bytes"], name
        assert int4["serving_bytes"] < int8["serving_bytes"] < int8["f32_bytes"], name
        # int8 is closer to float than int4 for both methods
        assert int8["rtn_rel_err"] < int4["rtn_rel_err"], name
        assert int8["gptq_rel_err"] < int4["gptq_rel_err"], name
        # GPTQ beats RTN at int4 on held-out draws of the calibration distribution
        assert int4["gptq_rel_err"] < int4["rtn_rel_err"], name
        assert int4["gptq_sequential_rel_err"] < int4["rtn_rel_err"], name
        assert int8["gptq_sequential_rel_err"] is None, name  # sequential: int4 rows only
        # int4-compact: 16-bit group scales and the LM's table int4 too: smaller than int4.
        # Its quantized tensors cost 4 + 16/g bits per weight, int4's 4 + 32/g, with g = 32
        # or the largest divisor below it (the ViT's 48-input patch conv: 24), so under
        # 4.8 and 5.6 bits.
        compact = rows["int4-compact"]
        assert compact["serving_bytes"] < int4["serving_bytes"], name
        q_c, q_4 = (r["bytes"]["quantized_vs_their_f32"] for r in (compact, int4))
        assert 4 / 32 < q_c < min(q_4, 4.8 / 32), name
        assert q_4 < 5.6 / 32, name
        assert compact["gptq_rel_err"] < compact["rtn_rel_err"], name
