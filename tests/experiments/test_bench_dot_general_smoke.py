"""Smoke test of ``experiments/bench_dot_general.py``: ``run()`` on tiny shapes, one repeat."""

from __future__ import annotations

import json

import pytest

from tests.experiments.helpers import load_experiment


@pytest.fixture(scope="module")
def bench():
    return load_experiment("bench_dot_general")


def test_run_writes_complete_json(bench, tmp_path):
    result = bench.run([(8, 128, 32)], repeats=1, warmup=1, progress=False)
    path = bench.write(result, tmp_path / "bench.json")
    data = json.loads(path.read_text())
    for field in ("device", "jax_version", "date", "repeats", "peers", "shapes"):
        assert field in data, field
    assert data["device"] == "cpu" and data["peers"] == {"requested": False}
    (entry,) = data["shapes"]
    assert (entry["m"], entry["k"], entry["n"]) == (8, 128, 32)
    expected_ops = {
        "f32",
        "bf16",
        "int8_raw",
        "jq_w8a8",
        "jq_wo_int8",
        "jq_wo_int4_g128",
        "jq_w4a8_g128",
        "jq_fp8",
    }
    assert set(entry["results"]) == expected_ops
    for name, r in entry["results"].items():
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 1, name
        assert r["speedup_vs_f32"] == pytest.approx(
            entry["results"]["f32"]["median_ms"] / r["median_ms"]
        )
        assert r["speedup_vs_bf16"] > 0
    f32 = entry["results"]["f32"]
    assert f32["speedup_vs_f32"] == 1.0 and f32["rel_error"] == 0.0
    # Errors are ordered as the formats: int8 well under int4, both nonzero.
    assert (
        0
        < entry["results"]["jq_w8a8"]["rel_error"]
        < entry["results"]["jq_wo_int4_g128"]["rel_error"]
        < 0.5
    )
    table = bench.markdown_table(data)
    assert table.count("\n") == 1 + len(expected_ops) and "jq_w8a8" in table


def test_peers_status_recorded(bench):
    result = bench.run(
        [(8, 128, 32)], repeats=1, warmup=0, peers=True, ops=["jq_w8a8"], progress=False
    )
    peers = result["peers"]
    assert peers["requested"] is True
    for name in ("aqtp", "qwix"):
        assert isinstance(peers[name]["available"], bool)
        assert peers[name]["available"] or peers[name]["error"]


def test_cli_quick_shapes_parse(bench, tmp_path):
    out = tmp_path / "cli.json"
    result = bench.main(
        [
            "--shapes",
            "8x32x16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--ops",
            "jq_w8a8",
            "--out",
            str(out),
        ]
    )
    assert set(result["shapes"][0]["results"]) == {"f32", "bf16", "jq_w8a8"}
    assert json.loads(out.read_text())["shapes"][0]["n"] == 16
