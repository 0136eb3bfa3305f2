"""``jaxquant bench``: the speed and memory a quantized model buys, as ratios against float.

Three parts, one process, one device:

* **dot_general** (:mod:`jaxquant.eval.bench_dot`): f32, bf16 and raw int8 ``lax.dot_general``
  against jaxquant W8A8, weight-only int8 / int4 g128 and fp8.
* **decode** (:mod:`jaxquant.eval.bench_decode`): tokens per second of the SmolLM2-135M-shaped
  transformer for each recipe, KV cache in float and int8, batch 1 and 8, and the bytes held.
* **memory**: bytes per parameter, scales included, of each recipe's serving params (from
  abstract shapes: nothing is allocated).

* **llama.cpp** (:mod:`jaxquant.eval.bench_llama`, when ``llama_cpp`` is importable and the
  device is a CPU): the same model's GGUF in Q8_0, Q4_0 and Q4_1, batch 1, 2 threads: the
  yardstick.

Then the goals of the benchmark issues, each checked against the numbers just measured (the CPU
goals on a CPU, the GPU goals on a GPU).

Example::

    result = run(quick=True)
    print(markdown(result))
"""

from __future__ import annotations

import time

from jaxquant.eval import bench_decode, bench_dot, bench_llama
from jaxquant.nn import TransformerConfig, param_bytes, serving_params_shape

# --quick: small dot shapes; decode 16 steps in 4 rounds after 32 cached (not prefilled) tokens.
QUICK = dict(shapes=bench_dot.QUICK_SHAPES, repeats=5,
             decode=dict(prompt_len=32, decode_steps=16, rounds=4, run_prefill=False))
# Full: the goal shape 2048^3 and the decode-like 8x4096x4096; a 128-token prefill, 128 steps.
FULL = dict(shapes=(bench_dot.FULL_SHAPES[0], bench_dot.FULL_SHAPES[2]), repeats=7,
            decode=dict(prompt_len=128, decode_steps=128, rounds=8, run_prefill=True))


def memory(base: TransformerConfig | None = None, recipes=None) -> list[dict]:
    """Bytes per parameter (codes + scales) of each decode recipe's serving params (default
    ``bench_decode.DEFAULT_RECIPES``; f32 always first)."""
    base = base or TransformerConfig.smollm2_135m()
    n = bench_decode.n_params(base)
    rows = []
    for name in dict.fromkeys(["f32", *(recipes or bench_decode.DEFAULT_RECIPES)]):
        tree = serving_params_shape(bench_decode.recipe_config(base, name, None))
        total = param_bytes(tree)
        rows.append({"recipe": name, "n_params": n, "param_bytes": total,
                     "bytes_per_param": total / n, "bits_per_param": 8 * total / n})
    f32 = rows[0]["param_bytes"]
    for r in rows:
        r["smaller_than_f32"] = f32 / r["param_bytes"]
    return rows


def _row(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _speedup(rows, recipe, batch, ref="f32"):
    r = _row(rows, recipe=recipe, kv_cache="float", batch=batch)
    return r and r.get(f"speedup_vs_{ref}")


def goals(result: dict) -> list[dict]:
    """The issues' goals for this device, each with the measured figure and whether it is met."""
    out = []

    def add(goal, target, measured, what):
        met = None if measured is None else measured >= target
        out.append({"goal": goal, "target": target, "measured": measured, "met": met,
                    "shortfall": None if met in (None, True) else target - measured,
                    "measured_as": what})

    def dot_speedup(m, k, n, op, ref):
        shape = next((s for s in result["dot_general"]["shapes"]
                      if (s["m"], s["k"], s["n"]) == (m, k, n)), None)
        r = shape and shape["results"].get(op)
        return r and r[f"speedup_vs_{ref}"]

    rows = result["decode"]["rows"]
    tok = "tok/s ratio at batch 1, both with a float KV cache"
    if result.get("device") != "cpu":
        for size in (2048, 8192):
            add(f"W8A8 at {size}^3 vs bf16 (speedup)", 1.6,
                dot_speedup(size, size, size, "jq_w8a8", "bf16"), "jq_w8a8 median / bf16 median")
        add("int4 g128 weight-only decode, batch 1, vs bf16", 2.5,
            _speedup(rows, "int4_g128_wo", 1, "bf16"), tok)
        add("W4A8 g128 decode, batch 1, vs bf16", 2.5, _speedup(rows, "w4a8_g128", 1, "bf16"), tok)
        return out
    add("W8A8 at 2048^3 vs f32 (speedup)", 1.5, dot_speedup(2048, 2048, 2048, "jq_w8a8", "f32"),
        "jq_w8a8 median / f32 median")
    add("int8 weight-only decode, batch 1, vs f32 (tok/s ratio)", 1.0,
        _speedup(rows, "int8_wo", 1), tok)
    add("int4 g128 weight-only decode, batch 1, vs f32", 1.5, _speedup(rows, "int4_g128_wo", 1),
        tok)
    add("W4A8 g128 decode, batch 1, vs f32", 1.5, _speedup(rows, "w4a8_g128", 1), tok)
    add("W8A8 decode, batch 1, vs f32", 2.0, _speedup(rows, "w8a8", 1), tok)
    for recipe, target in (("int8_wo", 3.5), ("int4_g128_wo", 6.0)):
        ratios = [x["memory_reduction_vs_f32"] for x in rows
                  if x["recipe"] == recipe and x["kv_cache"] == "int8"]
        add(f"{recipe}: params + KV cache smaller than f32 (every batch)", target,
            min(ratios) if ratios else None,
            "f32 bytes / recipe bytes (int8 KV vs f32's float KV), the smallest over the batches")
    llama = {r["format"]: r for r in result.get("llama_cpp", {}).get("rows", []) if "error" not in r}
    four = [r for r in rows if r["batch"] == 1 and r["kv_cache"] == "float"
            and r["recipe"] in ("int4_g128_wo", "w4a8_g128")]
    best = max(four, key=lambda r: r["tokens_per_s"], default=None)
    add("fastest 4-bit jaxquant recipe, batch 1, vs llama.cpp Q4_0 (2 threads)", 0.75,
        best["tokens_per_s"] / llama["q4_0"]["tokens_per_s"] if best and "q4_0" in llama
        else None,
        f"tok/s ratio ({best['recipe'] if best else 'none'} / llama.cpp Q4_0)" if llama
        else "not measured (llama_cpp not importable)")
    return out


def run(*, quick: bool = False, progress: bool = True, dot_shapes=None,
        decode_kwargs: dict | None = None, llama: bool = True) -> dict:
    """All parts and the goals; ``dot_shapes`` / ``decode_kwargs`` override the presets.

    ``llama=False`` skips the llama.cpp rows (they run only on a CPU device anyway).
    """
    preset = QUICK if quick else FULL
    t0 = time.time()
    result = {"benchmark": "jaxquant bench", "quick": quick, **bench_dot.environment(),
              "load_average_before": bench_dot.loadavg()}
    result["dot_general"] = bench_dot.run(
        dot_shapes or preset["shapes"], preset["repeats"], progress=progress)
    kw = {**preset["decode"], **(decode_kwargs or {})}
    result["decode"] = bench_decode.run(progress=progress, **kw)
    result["memory"] = memory(kw.get("base"), kw.get("recipes"))
    if llama and result["device"] == "cpu":
        steps = kw.get("decode_steps", 64)
        result["llama_cpp"] = bench_llama.run(prompt_len=kw.get("prompt_len", 32),
                                              decode_steps=max(steps, 32))
    result["goals"] = goals(result)
    result["load_average_after"] = bench_dot.loadavg()
    result["seconds"] = time.time() - t0
    return result


def markdown(result: dict) -> str:
    """The three tables and the goals, as markdown."""
    mem = ["| recipe | params MB | bytes / param | bits / param | smaller than f32 |",
           "|---|---:|---:|---:|---:|"]
    for r in result["memory"]:
        mem.append(f"| {r['recipe']} | {r['param_bytes'] / 1e6:.1f} | {r['bytes_per_param']:.3f} |"
                   f" {r['bits_per_param']:.2f} | {r['smaller_than_f32']:.2f}x |")
    g = ["| goal | target | measured | met |", "|---|---:|---:|---|"]
    for x in result["goals"]:
        m = "n/a" if x["measured"] is None else f"{x['measured']:.2f}x"
        if x["met"] is None:
            met = "not measured"
        else:
            met = "met" if x["met"] else f"not met (short by {x['shortfall']:.2f}x)"
        g.append(f"| {x['goal']} | {x['target']:.2f}x | {m} | {met} |")
    return "\n\n".join([
        "dot_general (speedup of the median vs f32):",
        bench_dot.markdown_table(result["dot_general"]),
        "decode (tokens/s; bytes held = serving params + KV cache at capacity):",
        bench_decode.markdown_table(result["decode"]),
        "llama.cpp (the same model's GGUF, batch 1):",
        bench_llama.markdown_table(result["llama_cpp"]) if "llama_cpp" in result
        else "llama.cpp: not run (not a CPU device, or skipped)",
        "memory (serving params, scales included):",
        "\n".join(mem),
        "goals:",
        "\n".join(g),
    ])
