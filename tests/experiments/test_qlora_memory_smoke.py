"""Smoke test: experiments/qlora_memory.py runs end to end on one SmolLM2-shaped block (slow:
five step compiles)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.experiments.helpers import load_experiment


@pytest.mark.slow
def test_run_one_block(tmp_path, monkeypatch):
    m = load_experiment("qlora_memory")
    out = tmp_path / "qlora_memory.json"
    monkeypatch.setattr(sys, "argv", ["qlora_memory.py", "--layers", "1", "--batch", "1",
                                      "--seq", "16", "--rank", "4", "--out", str(out)])
    m.main()
    r = json.loads(out.read_text())
    assert {"device", "jax", "date"} <= set(r["environment"]) and r["n_layers"] == 1
    rows = r["rows"]
    assert rows["qlora"]["base"]["quantized_bytes_per_param"] <= 0.56
    assert rows["qlora_all"]["base"]["bytes_per_param"] <= 0.56  # the whole frozen base
    assert rows["lora"]["base"]["bytes_per_param"] == 4.0
    peak = {k: v["step_memory"].get("peak_bytes") for k, v in rows.items()}
    if all(peak.values()):  # backends without a memory analysis report nothing
        assert peak["qlora"] < peak["lora"] < peak["full"]
        assert peak["qlora"] < peak["qlora_dequant_all"]
