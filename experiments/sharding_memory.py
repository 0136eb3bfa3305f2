"""Per-device bytes of params + optimizer state + KV cache across mesh shapes, from XLA.

For a LLaMA-shaped model (d_model 1024, 8 layers, 16 heads, 8 KV heads, ffn 4096, vocab
32000, untied head: 191 M params) and each mesh, the script compiles, on abstract inputs (nothing is
allocated):

* ``train_f32``: the AdamW training step (f32 params + two moments), batch 8 x 256;
* ``serve_f32`` / ``serve_int8`` / ``serve_int4``: one decode step, batch 8 with a
  1024-token KV cache (float for f32, int8 for the quantized rows), int8 per channel or int4
  in groups of 64;

and records ``compiled.memory_analysis()`` per device (arguments = what stays resident: params,
optimizer state or cache, the batch) next to the sharded arrays' own byte count split into
params / optimizer / cache. Step time on fake CPU devices is not a scaling result; none is
reported.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python experiments/sharding_memory.py          # -> experiments/results/sharding_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

OUT = Path(__file__).resolve().parent / "results" / "sharding_memory.json"
MESHES = ("data=1", "data=8", "fsdp=8", "tensor=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
ROWS = ("train_f32", "serve_f32", "serve_int8", "serve_int4")
BATCH, TRAIN_LEN, CACHE_LEN = 8, 256, 1024


def model_config(small: bool = False):
    from jaxquant.nn import TransformerConfig

    if small:  # the smoke test's size
        return TransformerConfig.tiny(n_heads=8, n_kv_heads=8, head_dim=8)
    return TransformerConfig(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16,
                             n_kv_heads=8, head_dim=64, ffn_dim=4096, rope_theta=10000.0,
                             rms_eps=1e-5, tie_embeddings=False, rope_layout="half",
                             max_seq_len=CACHE_LEN)


def _abstract(tree, mesh):
    from jaxquant.nn.mesh import abstract_on, param_shardings

    return abstract_on(tree, param_shardings(tree, mesh, strict=False))


def _bytes(tree) -> int:
    from jaxquant.train.sharding import per_device_bytes

    return per_device_bytes(tree)


def _report(compiled) -> dict:
    ma = compiled.memory_analysis()
    return {"argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes)}


def train_row(cfg, mesh, batch: int, seq: int) -> dict:
    import jax
    import numpy as np

    from jaxquant.nn import Transformer
    from jaxquant.nn.mesh import batch_sharding
    from jaxquant.train import init_train_state, make_optimizer, make_train_step

    model = Transformer(cfg)
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=100)
    tok = jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=batch_sharding(mesh))
    state = _abstract(jax.eval_shape(
        lambda: init_train_state(model, opt, jax.random.key(0), np.zeros((1, 8), np.int32))), mesh)
    compiled = jax.jit(make_train_step(model, opt, jit=False),
                       out_shardings=(jax.tree.map(lambda s: s.sharding, state), None)
                       ).lower(state, tok).compile()
    return {**_report(compiled), "params_bytes": _bytes(state.params),
            "optimizer_bytes": _bytes(state.opt_state), "cache_bytes": 0,
            "batch_bytes": _bytes(tok)}


def serve_row(cfg, mesh, qtype: str | None, batch: int, cache_len: int) -> dict:
    import jax
    import numpy as np

    import jaxquant as jq
    from jaxquant.nn import QuantMode, Transformer, init_kv_cache, serving_params_shape
    from jaxquant.nn.mesh import batch_sharding

    if qtype is not None:
        wcfg = jq.weight_only(qtype, group_size=64 if qtype == "int4" else None)
        cfg = cfg.with_quantization(wcfg, head=wcfg)
    model = Transformer(cfg, mode=QuantMode.SERVE if qtype else QuantMode.TRAIN)
    params = _abstract(serving_params_shape(cfg), mesh)
    cache = _abstract(jax.eval_shape(lambda: init_kv_cache(
        cfg, batch, cache_len, qtype="int8" if qtype else None)), mesh)
    tok = jax.ShapeDtypeStruct((batch, 1), np.int32, sharding=batch_sharding(mesh))

    def decode(p, t, c):
        return model.apply({"params": p}, t, cache=c)

    compiled = jax.jit(decode, out_shardings=(None, jax.tree.map(lambda s: s.sharding, cache))
                       ).lower(params, tok, cache).compile()
    return {**_report(compiled), "params_bytes": _bytes(params), "optimizer_bytes": 0,
            "cache_bytes": _bytes(cache), "batch_bytes": _bytes(tok)}


def run(meshes=MESHES, rows=ROWS, *, small: bool = False) -> dict:
    import jax

    from jaxquant.eval.tasks import environment
    from jaxquant.nn.mesh import make_mesh, parse_mesh_spec

    cfg = model_config(small)
    batch, seq, cache_len = (8, 16, 32) if small else (BATCH, TRAIN_LEN, CACHE_LEN)
    results = []
    for spec in meshes:
        n = 1
        for v in parse_mesh_spec(spec).values():
            n *= v
        mesh = make_mesh(spec, devices=jax.devices()[:n])
        for row in rows:
            if row == "train_f32":
                r = train_row(cfg, mesh, batch, seq)
            else:
                qtype = {"serve_f32": None, "serve_int8": "int8", "serve_int4": "int4"}[row]
                r = serve_row(cfg, mesh, qtype, batch, cache_len)
            r = {"mesh": spec, "devices": n, "row": row, **r}
            r["resident_bytes"] = r["params_bytes"] + r["optimizer_bytes"] + r["cache_bytes"]
            results.append(r)
            print(f"{spec:>24} {row:>10}: XLA arguments {r['argument_bytes'] / 2**20:8.1f} MiB/"
                  f"device (params {r['params_bytes'] / 2**20:.1f}, optimizer "
                  f"{r['optimizer_bytes'] / 2**20:.1f}, cache {r['cache_bytes'] / 2**20:.1f}), "
                  f"temp {r['temp_bytes'] / 2**20:.1f}", flush=True)
    env = environment()
    env["commit"] = _commit()
    env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"model": {k: v for k, v in cfg.to_dict().items() if k != "quant_rules"},
            "batch": batch, "train_seq_len": seq, "cache_len": cache_len,
            "rows": results, "environment": env,
            "note": "per-device bytes from compiled.memory_analysis() on abstract inputs; "
                    "fake CPU devices: no timing is a scaling result"}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict) -> str:
    """The RESULTS.md table: MiB per device (XLA's argument bytes), and the fraction of one
    device's."""
    by = {(r["mesh"], r["row"]): r for r in result["rows"]}
    meshes = list(dict.fromkeys(r["mesh"] for r in result["rows"]))
    rows = list(dict.fromkeys(r["row"] for r in result["rows"]))
    base = {row: by[(meshes[0], row)]["argument_bytes"] for row in rows}
    lines = ["| mesh | devices | " + " | ".join(rows) + " |", "|---" * (2 + len(rows)) + "|"]
    for m in meshes:
        cells = [f"{by[(m, row)]['argument_bytes'] / 2**20:.1f} "
                 f"({by[(m, row)]['argument_bytes'] / base[row]:.2f})" for row in rows]
        lines.append(f"| {m} | {by[(m, rows[0])]['devices']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meshes", help="mesh specs separated by '/', e.g. data=1/fsdp=8 "
                                    f"(default: {'/'.join(MESHES)})")
    p.add_argument("--small", action="store_true", help="the tiny model (smoke test)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    meshes = tuple(args.meshes.split("/")) if args.meshes else MESHES
    result = run(meshes, small=args.small)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n" + markdown(result) + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
