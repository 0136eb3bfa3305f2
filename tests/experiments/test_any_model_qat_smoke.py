"""Smoke test: experiments/any_model_qat.py runs end to end on a few steps (minutes of CPU: both
libraries compile a ViT and an NNX LM per format, so it is marked slow)."""

from __future__ import annotations

import math

import pytest

from tests.experiments.helpers import load_experiment

pytest.importorskip("qwix")

LIBS = ("jaxquant", "qwix")


@pytest.mark.slow
def test_run_few_steps():
    m = load_experiment("any_model_qat")
    result = m.run(steps=3, batch=8, n_train=64, n_test=32)
    assert set(result["models"]) == set(m.MODELS)
    for name, rows in result["models"].items():
        metric = "test_acc" if name == "linen_vit" else "test_loss"
        assert math.isfinite(rows["float"]["train_loss"]) and math.isfinite(rows["float"][metric])
        for fmt in m.FORMATS:
            for lib in LIBS:
                row = rows[fmt][lib]
                assert "error" not in row and "serve_error" not in row, (name, fmt, lib, row)
                assert math.isfinite(row["train_loss"]), (name, fmt, lib)
                assert math.isfinite(row[f"{metric}_served"]), (name, fmt, lib)
        for lib in LIBS:  # quantized from the first step, int4 further from float than w8a8
            assert 0 < rows["w8a8"][lib]["init_rel_err"] < rows["int4"][lib]["init_rel_err"]
        jq_ = {fmt: rows[fmt]["jaxquant"] for fmt in m.FORMATS}
        # jaxquant packs int4 two codes a byte: smaller than int8, smaller than f32
        assert jq_["int4"]["serving_bytes"] < jq_["w8a8"]["serving_bytes"] < rows["f32_bytes"]
        # both libraries store int8 codes a byte and f32 scales: the same bytes at w8a8
        assert rows["w8a8"]["qwix"]["serving_bytes"] == jq_["w8a8"]["serving_bytes"], name
        assert jq_["int4"]["serving_bytes"] < rows["int4"]["qwix"]["serving_bytes"], name
    # the LM's QAT forward is what is served (jaxquant): the same held-out loss
    lm = result["models"]["nnx_lm"]
    for fmt in m.FORMATS:
        jq_row = lm[fmt]["jaxquant"]
        assert jq_row["test_loss_served"] == pytest.approx(jq_row["test_loss_qat"], rel=1e-4)
    # the ViT's int4 patch conv: Qwix's PTQ refuses it (weight-only conv), served float
    assert "conv_general_dilated" in result["models"]["linen_vit"]["int4"]["qwix"]["serve_note"]
    lines = result["user_code_lines"]
    for name in m.MODELS:
        for lib in LIBS:
            assert lines[name][lib]["qat"] == len(m.USER_CODE[name][lib]["qat"]) >= 2
    assert lines["linen_vit"]["jaxquant"] == {"qat": 2, "serve": 1}
