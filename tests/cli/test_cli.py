"""The command line on the tiny model: every command runs and writes honest JSON."""

import json

import pytest

from jaxquant import cli


def _run(*argv):
    return cli.main(list(argv))


def test_eval_tiny_w8a8_writes_json(tmp_path):
    out = tmp_path / "out.json"
    assert _run("eval", "--model", "tiny", "--quant", "w8a8", "--json", str(out),
                "--max-tokens", "1500", "--seq-len", "128") == 0
    r = json.loads(out.read_text())
    assert r["recipe"] == "w8a8" and r["dataset"] == "ptb" and r["split"] == "test"
    assert r["tokens_scored"] == (1500 // 128) * 127
    # A random byte-level model is near-uniform over 256 bytes, never better than ~50.
    assert 50 < r["perplexity"] < 1000
    assert 8.0 < r["bits_per_weight"] < 9.0  # int8 codes + one f32 scale per column


def test_ptq_checkpoint_then_eval_matches_on_the_fly(tmp_path):
    ck = tmp_path / "ck"
    common = ("--model", "tiny", "--calib-windows", "4", "--calib-len", "64")
    assert _run("ptq", *common, "--method", "rtn", "--qtype", "int4", "--group-size", "32",
                "--out", str(ck)) == 0
    assert (ck / "jaxquant.json").is_file()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ev = ("--max-tokens", "1000", "--seq-len", "128")
    assert _run("eval", "--model", "tiny", "--checkpoint", str(ck), "--json", str(a), *ev) == 0
    assert _run("eval", "--model", "tiny", "--quant", "rtn:int4:g32", "--json", str(b), *ev) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["perplexity"] == pytest.approx(rb["perplexity"], rel=1e-6)
    assert ra["model_bytes"] == rb["model_bytes"]
    # A second save without --force refuses and leaves the first intact.
    assert _run("ptq", *common, "--method", "rtn", "--qtype", "int4", "--group-size", "32",
                "--out", str(ck)) == 2
    assert _run("eval", "--model", "tiny", "--checkpoint", str(ck), *ev) == 0


def test_ptq_gptq_options_reach_the_algorithm(tmp_path, capsys):
    out = tmp_path / "p.json"
    common = ("--model", "tiny", "--calib-windows", "3", "--calib-len", "32", "--method", "gptq",
              "--qtype", "int4", "--group-size", "32")
    assert _run("ptq", *common, "--mse", "--no-act-order", "--no-true-sequential",
                "--damp", "0.05", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["recipe"] == "gptq:int4:g32:mse"
    assert r["options"]["gptq"] == {"damp": 0.05, "block_size": 128, "act_order": False}
    assert r["options"]["true_sequential"] is False
    # No --calib-data: the default mix, one train split per domain, never a test slice.
    assert [(s["data"], s["split"]) for s in r["calibration"]["sources"]] == [
        ("ptb", "train"), ("shakespeare", "train"), ("kjv", "train")]
    assert _run("ptq", *common, "--damp", "1.5") == 2
    assert "damp must be in [0, 1)" in capsys.readouterr().err


def test_generate_and_bad_recipe(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert _run("generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "4",
                "--kv-cache", "int8", "--json", str(out)) == 0
    assert len(json.loads(out.read_text())["tokens"]) == 4
    assert _run("eval", "--model", "tiny", "--quant", "gptq:int9") == 2
    assert "Unsupported qtype" in capsys.readouterr().err


def test_demo_on_tiny(tmp_path):
    assert _run("demo", "--model", "tiny", "--max-tokens", "600", "--calib-windows", "4",
                "--calib-len", "64", "--recipes", "fp32,rtn:int4:g32,gptq:int4:g32",
                "--out-dir", str(tmp_path)) == 0
    r = json.loads((tmp_path / "demo.json").read_text())
    assert [row["recipe"] for row in r["rows"]] == ["fp32", "rtn:int4:g32", "gptq:int4:g32"]
    assert r["rows"][0]["delta"] == 0.0
    assert r["rows"][1]["model_bytes"] < r["rows"][0]["model_bytes"]
    assert (tmp_path / "demo.png").stat().st_size > 1000
