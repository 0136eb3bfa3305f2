"""Held-out scoring and calibration mixes in the eval tasks (issue 19)."""

import numpy as np
import pytest

from jaxquant.eval import tasks
from jaxquant.models.registry import load


def _row(recipe, ppl, kjv, shakespeare):
    return {
        "recipe": recipe,
        "perplexity": ppl,
        "heldout": {"kjv": kjv, "shakespeare": shakespeare},
        "bits_per_weight": 4.0,
        "model_bytes": 1e6,
        "quantize_seconds": 1.0,
    }


def test_recovery_is_computed_per_held_out_text_against_its_own_rtn_row():
    rows = [
        _row("fp32", 10, 20, 30),
        _row("rtn:int4:g128", 14, 30, 40),
        _row("gptq:int4:g128", 12, 27.5, 39),
        _row("rtn:int3:g128", 20, 50, 50),
        _row("awq:int3:g128", 15, 50, 60),
    ]
    tasks.add_recovery(rows)
    gptq, awq = rows[2], rows[4]
    assert gptq["recovered"] == pytest.approx(0.5)
    assert gptq["recovered_heldout"] == pytest.approx({"kjv": 0.25, "shakespeare": 0.1})
    assert gptq["recovered_heldout_mean"] == pytest.approx(0.175)
    # int3 rows compare with the int3 RTN row; worse than RTN is a negative share.
    assert awq["recovered_heldout"] == pytest.approx({"kjv": 0.0, "shakespeare": -0.5})
    table = tasks.markdown_table(rows)
    assert "| kjv | shakespeare | held-out RTN loss removed |" in table
    assert "| 27.500 | 39.000 | 17.5% |" in table


def test_calibration_mix_splits_windows_over_sources_and_records_them(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
    model = load("tiny")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400)
    b.write_text("b" * 400)
    windows, info = tasks.calibration_set(model, f"{a}+{b}", windows=5, length=16, seed=3)
    assert windows.shape == (5, 16)
    ids_a = set(model.tokenizer.encode("a"))
    assert [bool(set(w.tolist()) <= ids_a) for w in windows] == [True, True, True, False, False]
    assert [s["windows"] for s in info["sources"]] == [3, 2]
    assert [s["seed"] for s in info["sources"]] == [3, 4]
    with pytest.raises(ValueError, match="held-out slice"):
        tasks.calibration_set(model, "ptb:test", windows=4, length=16, seed=0)


def test_evaluate_scores_held_out_texts_with_the_same_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tasks.data.DATASETS, "other", lambda split: "to be or not to be " * 40)
    model = load("tiny")
    result = tasks.evaluate(
        model,
        heldout=("other",),
        max_tokens=256,
        seq_len=64,
        progress=False,
        dataset="other",
        split="test",
    )
    assert result["heldout"] == {}  # the scored data set itself is not repeated
    result = tasks.evaluate(
        model,
        heldout=("other",),
        max_tokens=256,
        seq_len=64,
        progress=False,
        dataset=str(_write(tmp_path)),
        split="test",
    )
    assert np.isfinite(result["heldout"]["other"]) and result["heldout"]["other"] > 1


def _write(tmp_path):
    path = tmp_path / "in_domain.txt"
    path.write_text("the quick brown fox " * 40)
    return path


def _scored(recipe, bits, ppl, heldout=None, size=1.0):
    return {"recipe": recipe, "bits_per_weight": bits, "perplexity": ppl, "model_bytes": size,
            **({"heldout": heldout} if heldout is not None else {})}


def test_recommendation_ranks_by_held_out_text_not_the_calibration_domain():
    rows = [
        _scored("fp32", 32.0, 40.0, {"a": 30.0, "b": 10.0}),      # too many bits
        _scored("gptq:int4:g128", 4.5, 50.0, {"a": 48.0, "b": 15.0}),   # best in-domain only
        _scored("rtn:int4:g128", 4.5, 60.0, {"a": 45.0, "b": 14.0}),    # best held out
        _scored("rtn:int3:g128", 3.5, 300.0, {"a": 150.0, "b": 90.0}),
    ]
    best = tasks.recommend(rows)
    assert best["recipe"] == "rtn:int4:g128"
    assert best["score"] == pytest.approx(np.sqrt(45.0 * 14.0))
    assert "held-out" in best["by"]
    # Without held-out scores it falls back to the in-domain split, and says so.
    plain = [{k: v for k, v in r.items() if k != "heldout"} for r in rows]
    best = tasks.recommend(plain)
    assert best["recipe"] == "gptq:int4:g128" and "in-domain" in best["by"]
    # A NaN perplexity is never recommended; nothing under the bit budget gives None.
    rows[2]["heldout"]["a"] = float("nan")
    assert tasks.recommend(rows)["recipe"] == "gptq:int4:g128"
    assert tasks.recommend(rows, max_bits=2.0) is None
