"""``jaxquant bench`` at tiny sizes: the JSON is complete and every ratio comes from the
measured numbers; the served recipes really hold packed codes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import QArray, cli
from jaxquant.eval import bench, bench_decode
from jaxquant.nn import TransformerConfig, kv_cache_bytes, param_bytes

TINY = TransformerConfig.tiny()
DECODE = dict(base=TINY, batches=(1,), prompt_len=8, decode_steps=4, rounds=2)


@pytest.fixture(scope="module")
def result():
    return bench.run(quick=True, progress=False, dot_shapes=[(8, 128, 32)], decode_kwargs=DECODE,
                     llama=False)


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
def test_json_is_complete_and_serialisable(result, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    data = json.loads(path.read_text())
    for field in ("device", "jax_version", "date", "commit", "load_average_before",
                  "dot_general", "decode", "memory", "goals"):
        assert field in data, field
    combos = {(r["recipe"], r["kv_cache"], r["batch"]) for r in data["decode"]["rows"]}
    assert combos == {(n, kv, b) for n in bench_decode.DEFAULT_RECIPES
                      for kv in ("float", "int8") for b in (1,)}
    assert "jq_w4a8_g128" in data["dot_general"]["shapes"][0]["results"]


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
def test_decode_ratios_come_from_the_measured_numbers(result):
    rows = result["decode"]["rows"]
    base = {(r["recipe"], r["kv_cache"], r["batch"]): r for r in rows}
    for r in rows:
        assert len(r["step_ms"]) == DECODE["decode_steps"]
        assert r["median_step_ms"] == pytest.approx(float(np.median(r["step_ms"])))
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["median_step_ms"] / 1e3))
        for ref in ("f32", "bf16"):
            b = base[ref, "float", r["batch"]]
            assert r[f"speedup_vs_{ref}"] == pytest.approx(r["tokens_per_s"] / b["tokens_per_s"])
            assert r[f"memory_reduction_vs_{ref}"] == pytest.approx(
                b["total_bytes"] / r["total_bytes"])
        kv = None if r["kv_cache"] == "float" else r["kv_cache"]
        cfg = bench_decode.recipe_config(TINY, r["recipe"], kv)
        assert r["kv_cache_bytes"] == kv_cache_bytes(cfg, r["batch"], 8 + 4 + 1, qtype=kv)
        assert r["total_bytes"] == r["param_bytes"] + r["kv_cache_bytes"]
    assert base["f32", "float", 1]["speedup_vs_f32"] == 1.0


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
def test_memory_and_goals(result):
    mem = {r["recipe"]: r for r in result["memory"]}
    assert mem["f32"]["bytes_per_param"] == 4.0 and mem["bf16"]["bytes_per_param"] == 2.0
    # int8: one byte plus a float32 scale per output channel; int4 g32: half a byte plus 4 / 32.
    assert 1.0 < mem["int8_wo"]["bytes_per_param"] < 1.1
    assert mem["int4_g128_wo"]["bytes_per_param"] == pytest.approx(0.5 + 4 / 64, rel=0.02)
    goals = {g["goal"]: g for g in result["goals"]}
    w8a8 = next(g for name, g in goals.items() if name.startswith("W8A8"))
    assert w8a8["measured"] is None and w8a8["met"] is None  # 2048^3 not in this run
    for g in goals.values():
        if g["measured"] is not None:
            assert g["met"] == (g["measured"] >= g["target"])
    table = bench.markdown(result)
    assert "| int4_g128_wo | int8 | 1 |" in table and "goals:" in table
    assert "| w4a8_g128 | float | 1 |" in table
    llama = next(g for name, g in goals.items() if "llama.cpp" in name)
    assert llama["measured"] is None and llama["met"] is None  # llama=False in this run


def test_served_int4_params_stay_packed():
    cfg = bench_decode.recipe_config(TINY, "int4_g128_wo", "int8")
    model, params = bench_decode.serving_params(cfg)
    kernels = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    q = [k for k in kernels if isinstance(k, QArray)]
    assert len(q) == 7 * TINY.n_layers + 1  # every projection and the tied embedding
    for k in q:
        assert k.qvalue.dtype == jnp.uint8 and k.qtype == "int4"
        a = k.pack_axis
        assert k.qvalue.shape[a] * 2 == k.shape[a]
    assert param_bytes(params) < sum(int(np.prod(k.shape)) for k in q) * 0.6 + 4 * 3 * 64


@pytest.mark.parametrize("name", sorted(bench_decode.INT8_ACTIVATIONS))
def test_w_a8_recipes_quantize_every_activation_to_int8(name):
    cfg = bench_decode.recipe_config(TINY, name, None)
    qtype = bench_decode.RECIPES[name][1].qtype
    assert cfg.quant_rules
    for rule in cfg.quant_rules:
        assert rule.config.lhs is not None and rule.config.lhs.qtype == "int8"
        assert rule.config.rhs.qtype == qtype and rule.config.rhs.group_size is not None


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
def test_goals_compare_the_fastest_4bit_row_with_llama_q4_0(result):
    fake = dict(result, llama_cpp={"rows": [{"format": "q4_0", "tokens_per_s": 10.0}]})
    rows = [r for r in result["decode"]["rows"] if r["batch"] == 1 and r["kv_cache"] == "float"
            and r["recipe"] in ("int4_g128_wo", "w4a8_g128")]
    best = max(r["tokens_per_s"] for r in rows)
    g = next(g for g in bench.goals(fake) if "llama.cpp" in g["goal"])
    assert g["measured"] == pytest.approx(best / 10.0)
    assert g["met"] == (best / 10.0 >= 0.75)


def test_cli_bench_quick(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.QUICK, "shapes", [(4, 128, 16)])
    monkeypatch.setattr(bench, "run", _tiny_run(bench.run))
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--quick", "--no-llama", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["dot_general"]["shapes"][0]["m"] == 4
    assert "goals:" in capsys.readouterr().out


def _tiny_run(run):
    def tiny(**kw):
        kw.pop("decode_kwargs", None)
        return run(**kw, decode_kwargs=dict(DECODE, batches=(1,), kv_caches=(None,)))

    return tiny
