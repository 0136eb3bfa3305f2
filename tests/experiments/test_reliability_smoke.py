"""experiments/reliability.py on a few trials of its in-process faults (the subprocess ones,
fetch and save under kill -9 and concurrency, are covered by tests/models/test_fetch.py and
tests/models/test_saved.py)."""

import pytest

from tests.experiments.helpers import load_experiment


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_and_gguf_faults_are_clear_errors_or_survived(tmp_path):
    rel = load_experiment("reliability")
    rows = rel.checkpoint_faults(tmp_path, 2) + rel.gguf_faults(tmp_path, 2)
    for r in rows:
        assert sum(r["outcomes"].values()) == r["trials"] == 2
        assert rel.WRONG not in r["outcomes"], r
        assert not any(k.startswith("crash") for k in r["outcomes"]), r
    checkpoint_rows = [r for r in rows if r["target"].startswith("checkpoint")]
    assert all(set(r["outcomes"]) <= {rel.CLEAR, rel.SURVIVED} for r in checkpoint_rows)
    table = rel.markdown({"faults": rows})
    assert table.count("\n") == len(rows) + 1
