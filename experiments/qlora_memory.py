"""Memory of (Q)LoRA fine-tuning on SmolLM2-135M's shapes: the frozen base and the compiled step.

No weights are needed: the base, the adapters and the optimizer state are abstract
(``jax.eval_shape``), and each step is compiled for a ``[B, S]`` token batch and read from
XLA's memory analysis (:func:`jaxquant.train.lora.compiled_memory_stats`:
``peak_bytes = arguments + outputs - aliased + temp``). Rows:

* ``qlora``: NF4 + double quantization on the seven projections (bitsandbytes' choice), the
  embedding / tied head float;
* ``qlora_all``: the embedding (tied head) in NF4 + DQ too (``base_targets=ALL_WEIGHTS``);
* ``qlora_dequant_all``: the same base as ``qlora`` with every kernel dequantized by a plain
  ``dequantize`` (what the per-layer dependency in ``lora._frozen_product`` avoids);
* ``lora``: float LoRA (frozen float32 base);
* ``full``: full float fine-tuning with AdamW (params + moments + gradients).

    python experiments/qlora_memory.py                 # SmolLM2-135M, B=8, S=256
    python experiments/qlora_memory.py --layers 2      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxquant.train.lora as L
from jaxquant.eval.tasks import environment
from jaxquant.nn import Transformer, TransformerConfig
from jaxquant.train import TrainState, make_optimizer, make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "qlora_memory.json"


def _plain_frozen_product(x, kernel, precision, dtype, k_axis=0):
    return L._dot_in(x, kernel.dequantize(dtype), precision, k_axis)


def lora_row(cfg, pshape, tokens, opt, lora, *, plain=False) -> dict:
    base = jax.eval_shape(lambda p: L.quantize_base(p, lora), pshape)
    adapters = jax.eval_shape(lambda p: L.init_adapters(p, lora, jax.random.key(0)), pshape)
    state = jax.eval_shape(lambda a: L.init_lora_state(a, opt), adapters)
    saved = L._frozen_product
    if plain:
        L._frozen_product = _plain_frozen_product
    t0 = time.perf_counter()
    try:
        step = L.make_lora_train_step(cfg, base, opt, lora)
        report = L.memory_report(step, state, tokens)
    finally:
        L._frozen_product = saved
    report["compile_seconds"] = time.perf_counter() - t0
    report["lora"] = lora.to_dict()
    return report


def full_row(cfg, pshape, tokens, opt) -> dict:
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, opt.init(p)), pshape)
    t0 = time.perf_counter()
    step = jax.jit(make_train_step(Transformer(cfg), opt, jit=False))
    mem = L.compiled_memory_stats(step.lower(state, tokens).compile())
    n = sum(x.size for x in jax.tree.leaves(pshape))
    return {"params": n, "param_bytes": 4 * n, "step_memory": mem,
            "compile_seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="n_layers (default: the model's 30)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    over = {} if args.layers is None else {"n_layers": args.layers}
    cfg = TransformerConfig.smollm2_135m(**over)
    pshape = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=1, total_steps=10)
    rows = {
        "qlora": lora_row(cfg, pshape, tokens, opt, L.LoRAConfig(rank=args.rank)),
        "qlora_all": lora_row(cfg, pshape, tokens, opt,
                              L.LoRAConfig(rank=args.rank, base_targets=L.ALL_WEIGHTS)),
        "qlora_dequant_all": lora_row(cfg, pshape, tokens, opt, L.LoRAConfig(rank=args.rank),
                                      plain=True),
        "lora": lora_row(cfg, pshape, tokens, opt, L.LoRAConfig(rank=args.rank, base=None)),
        "full": full_row(cfg, pshape, tokens, opt),
    }
    for name, r in rows.items():
        mem = r["step_memory"]
        base = r.get("base", {})
        print(f"{name:18s} base {base.get('total_bytes', r.get('param_bytes', 0)) / 2**20:8.1f} MiB "
              f"({base.get('bytes_per_param', 4.0):.3f} B/param; quantized part "
              f"{base.get('quantized_bytes_per_param') or 0:.4f})  step peak "
              f"{mem.get('peak_bytes', 0) / 2**20:8.1f} MiB (temp "
              f"{mem.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB)")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"model": "smollm2-135m shapes", "n_layers": cfg.n_layers, "batch": args.batch,
              "seq_len": args.seq, "rank": args.rank, "rows": rows, "commit": commit,
              "load_average": os.getloadavg(), "environment": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
