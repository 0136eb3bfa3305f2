"""Smoke test: experiments/any_model_vs_qwix.py runs end to end on a few steps (minutes of CPU:
both libraries compile a CNN several times, so it is marked slow)."""

from __future__ import annotations

import pytest

from tests.experiments.helpers import load_experiment

pytest.importorskip("qwix")


@pytest.mark.slow
def test_run_few_steps():
    m = load_experiment("any_model_vs_qwix")
    result = m.run(steps=3, batch=16, n_train=256, n_test=128)
    assert set(result["qat"]) == set(result["ptq"]) == set(m.FORMATS)
    ptq = result["ptq"]
    # int4 packs two codes a byte: at most 0.16x of f32 (f32 biases and scales included)
    assert ptq["int4"]["jaxquant"]["vs_f32"] <= 0.16
    assert ptq["int4"]["jaxquant"]["param_bytes"] < ptq["int4"]["qwix"]["param_bytes"]
    for lib in ("jaxquant", "qwix"):  # int8 is closer to float than int4
        assert ptq["w8a8"][lib]["rel_logit_error"] < ptq["int4"][lib]["rel_logit_error"]
    assert result["user_code_lines"]["jaxquant"] == {"qat": 2, "ptq": 3}
