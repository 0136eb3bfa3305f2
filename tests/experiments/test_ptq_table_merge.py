"""experiments/ptq_table.py: every row records the commit that measured it (issue 13)."""

import json

from tests.experiments.helpers import load_experiment


def test_rows_record_their_commit_and_merge_keeps_it(tmp_path, monkeypatch):
    ptq_table = load_experiment("ptq_table")
    commits = iter(["aaaa111", "bbbb222"])
    monkeypatch.setattr(
        ptq_table, "measured_by", lambda: {"commit": next(commits), "load_avg_1m": 0.5}
    )
    monkeypatch.setattr(ptq_table, "plot_ppl_vs_size", lambda *a, **k: None)
    kw = dict(eval_tokens=600, calib_windows=2, calib_len=64, out_dir=tmp_path, progress=False)
    ptq_table.run("tiny", ["fp32", "rtn:int8"], **kw)
    ptq_table.run("tiny", ["rtn:int8"], merge=True, **kw)
    rows = json.loads((tmp_path / "ptq_table.json").read_text())["rows"]
    assert [(r["recipe"], r["environment"]["commit"]) for r in rows] == [
        ("fp32", "aaaa111"),
        ("rtn:int8", "bbbb222"),
    ]
    assert all("load_avg_1m" in r["environment"] for r in rows)


def test_rows_from_before_commits_were_recorded_are_marked(tmp_path):
    ptq_table = load_experiment("ptq_table")
    env = {"date": "2026-01-01"}
    old = {"rows": [{"recipe": "fp32", "perplexity": 10.0}], "environment": env}
    new = {
        "rows": [{"recipe": "rtn:int8", "perplexity": 11.0}],
        "environment": {"commit": "cccc333"},
    }
    rows = ptq_table._merged(old, new)["rows"]
    assert [r["environment"]["commit"] for r in rows] == ["unrecorded", "cccc333"]
