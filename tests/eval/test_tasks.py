"""The demo table's bookkeeping: RTN loss removed, incremental rows, the markdown table."""

import pytest

from jaxquant.eval import tasks


def _rows():
    return [{"recipe": r, "perplexity": p, "bits_per_weight": 4.0, "model_bytes": 1e6,
             "quantize_seconds": 1.0}
            for r, p in (("fp32", 10.0), ("rtn:int4:g128", 30.0), ("gptq:int4:g128", 15.0),
                         ("awq:int4:g128", 32.0), ("gptq:int3:g128", 50.0),
                         ("rtn:int4:g32:asym", 10.0), ("gptq:int4:g32:asym", 11.0))]


def test_recovery_is_against_the_rtn_row_of_the_same_format():
    rows = _rows()
    tasks.add_recovery(rows)
    by = {r["recipe"]: r for r in rows}
    assert by["gptq:int4:g128"]["recovered"] == pytest.approx(0.75)
    assert by["awq:int4:g128"]["recovered"] == pytest.approx(-0.1)  # worse than RTN
    # No RTN row at int3, and no loss to recover for the asymmetric g32: left out.
    assert "recovered" not in by["gptq:int3:g128"]
    assert "recovered" not in by["gptq:int4:g32:asym"]
    assert "recovered" not in by["rtn:int4:g128"] and "recovered" not in by["fp32"]
    table = tasks.markdown_table(rows)
    assert "| 75.0% |" in table and "| -10.0% |" in table
    assert len(table.splitlines()) == 2 + len(rows)


def test_environment_records_the_checkout_commit_without_a_subprocess(monkeypatch):
    import subprocess
    from pathlib import Path

    root = Path(tasks.__file__).resolve().parents[2]
    want = None
    if (root / ".git").exists():
        want = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    tasks.environment()  # platform.processor() runs `uname` once per process; cached after
    tasks.head_commit.cache_clear()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no subprocess"))
    env = tasks.environment()
    assert env["commit"] == want
    assert env["load_avg_1m"] >= 0
