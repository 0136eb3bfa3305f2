"""Issue 15, experiment 1: QAT vs PTQ on a small model trained from scratch on PTB train.

A small byte-level LLaMA (the ``tiny`` model's byte tokenizer; the default budget, sized for
about 15 minutes of one shared CPU core, is 0.39 M params, 200 steps of 16 x 128 bytes) is trained from one random init on the same batches (PTB train windows, batch
``i`` a pure function of the seed and ``i``) for the same number of steps, once per method:

* ``float``;
* ``qat:w8a8``: int8 weights and activations, both backward products in int8 (AQT style);
* ``qat:int4:g128`` and ``qat:int2:g64``: fake-quantized weights with a straight-through
  gradient;

then float, QAT int4 g128 and QAT int2 g64 continue from the trained float model for
``finetune_steps`` more steps (QAT as a fine-tune), and the float model is quantized
post-training (RTN and GPTQ at int4 g128 and int2 g64, and W8A8), both as trained and after
its own ``finetune_steps`` more steps: "PTQ ... of float+N" is the equal-compute match of the
QAT fine-tunes (fine-tune, then quantize). Every row is scored on the first ``eval_tokens``
bytes of PTB test by the same path (``jaxquant.eval.tasks``; the QAT rows from their saved
serving checkpoints). The training runs go through :func:`jaxquant.eval.finetune.finetune`,
as ``jaxquant finetune`` does.

Usage::

    nice -n 5 python experiments/finetune_small.py              # ~15 min of one CPU core
    python experiments/finetune_small.py --steps 20 --d-model 64 --eval-tokens 4096   # smoke
    python experiments/finetune_small.py --methods float ...   # skip the from-scratch QAT runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_small.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """The experiment's size (recorded in the JSON).

    Attributes:
      steps: optimizer steps of every training run.
      batch_size: windows per step.
      seq_len: bytes per window.
      d_model, n_layers, ffn_dim, n_heads: the model.
      learning_rate: AdamW peak (10% warmup, cosine to 10%).
      eval_tokens: PTB test bytes scored per row.
      calib_windows: GPTQ calibration windows of ``seq_len`` PTB train bytes.
      seed: init and batch seed.
      finetune_steps: then float / QAT int4 g128 / QAT int2 g64 fine-tuned from the trained
        float model for this many more steps (batches of seed + 1, learning rate / 10): QAT as
        a fine-tune, next to the float model fine-tuned as long (0: skip).
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    d_model: int = 96
    n_layers: int = 3
    ffn_dim: int = 288
    n_heads: int = 4
    learning_rate: float = 3e-3
    eval_tokens: int = 16384
    calib_windows: int = 32
    seed: int = 0
    finetune_steps: int = 50


QAT_METHODS = ("float", "qat:w8a8", "qat:int4:g128", "qat:int2:g64")
PTQ_RECIPES = ("w8a8", "rtn:int4:g128", "gptq:int4:g128", "rtn:int2:g64", "gptq:int2:g64")


def small_model(budget: Budget):
    import jax
    import jax.numpy as jnp

    from jaxquant.data import byte_tokenizer
    from jaxquant.models.registry import LoadedModel
    from jaxquant.nn import Transformer, TransformerConfig

    cfg = TransformerConfig.tiny(d_model=budget.d_model, n_layers=budget.n_layers,
                                 ffn_dim=budget.ffn_dim, n_heads=budget.n_heads,
                                 n_kv_heads=budget.n_heads, head_dim=budget.d_model
                                 // budget.n_heads, max_seq_len=budget.seq_len)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(budget.seed),
                                 jnp.zeros((1, 1), jnp.int32))["params"]
    name = f"scratch-d{budget.d_model}-l{budget.n_layers}"
    return LoadedModel(name, cfg, params, byte_tokenizer())


def run(budget: Budget, work: Path, on_row=None, methods=QAT_METHODS) -> dict:
    """Trains and scores every row; ``on_row(result)`` after each (to write partial JSON).
    ``methods``: the from-scratch runs (float first, always)."""
    if not methods or methods[0] != "float" or set(methods) - set(QAT_METHODS):
        raise ValueError(f"methods must start with 'float' and be among {QAT_METHODS}; "
                         f"got {methods}.")
    import jax
    import numpy as np

    from jaxquant.eval import finetune as ft
    from jaxquant.eval import tasks
    from jaxquant.models.registry import LoadedModel
    from jaxquant.models.saved import load_quantized
    from jaxquant.ptq.recipe import parse_recipe

    base = small_model(budget)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(base.params)))
    rows: list[dict] = []
    result = {"experiment": "finetune_small (issue 15, experiment 1)", "model": base.name,
              "params": n_params, "budget": dataclasses.asdict(budget),
              "tokens_per_run": budget.steps * budget.batch_size * budget.seq_len,
              "rows": rows, "environment": tasks.environment()}
    test = tasks.tokens_for(base, "ptb", "test")

    def score(cfg, params):
        return tasks.evaluate_params(cfg, params, test, seq_len=budget.seq_len,
                                     max_tokens=budget.eval_tokens, progress=False)

    trained_float = finetuned_float = None
    for method in methods:
        config = ft.FinetuneConfig(method=ft.parse_method(method), steps=budget.steps,
                                   batch_size=budget.batch_size, seq_len=budget.seq_len,
                                   learning_rate=budget.learning_rate,
                                   checkpoint_every=budget.steps, seed=budget.seed)
        out = work / method.replace(":", "_")
        r = ft.finetune(base, config, out, eval_seq_len=budget.seq_len,
                        eval_max_tokens=budget.eval_tokens)
        rows.append({"row": method, "kind": "float" if method == "float" else "QAT",
                     "bits_per_weight": r["bits_per_weight"], "perplexity": r["perplexity"],
                     "final_train_loss": r["final_train_loss_mean"],
                     "loss_curve": r["loss_curve"], "train_seconds": r["train_seconds"]})
        if method == "float":
            _, params, _ = load_quantized(out)
            trained_float = LoadedModel(base.name + "-float", base.cfg, params,
                                        base.tokenizer)
        print(f"{method}: ppl {r['perplexity']:.3f}, final train loss "
              f"{r['final_train_loss_mean']:.4f}, {r['train_seconds']:.0f} s", flush=True)
        if on_row:
            on_row(result)
    for method in ("float", "qat:int4:g128", "qat:int2:g64") if budget.finetune_steps else ():
        config = ft.FinetuneConfig(method=ft.parse_method(method), steps=budget.finetune_steps,
                                   batch_size=budget.batch_size, seq_len=budget.seq_len,
                                   learning_rate=budget.learning_rate / 10,
                                   checkpoint_every=budget.finetune_steps, seed=budget.seed + 1)
        out = work / ("ft-" + method.replace(":", "_"))
        r = ft.finetune(trained_float, config, out, eval_seq_len=budget.seq_len,
                        eval_max_tokens=budget.eval_tokens)
        rows.append({"row": f"{method} from float (+{budget.finetune_steps} steps)",
                     "kind": "fine-tune", "bits_per_weight": r["bits_per_weight"],
                     "perplexity": r["perplexity"],
                     "final_train_loss": r["final_train_loss_mean"],
                     "loss_curve": r["loss_curve"], "train_seconds": r["train_seconds"]})
        if method == "float":
            _, params, _ = load_quantized(out)
            finetuned_float = LoadedModel(base.name + "-float-ft", base.cfg, params,
                                          base.tokenizer)
        print(f"{method} from float: ppl {r['perplexity']:.3f}", flush=True)
        if on_row:
            on_row(result)
    ptq_of = [("float", trained_float)]
    if finetuned_float is not None:
        ptq_of.append((f"float+{budget.finetune_steps}", finetuned_float))
    for name, model in ptq_of:
        for text in PTQ_RECIPES:
            recipe = parse_recipe(text)
            cfg, params, info = tasks.quantize(model, recipe, calib_windows=budget.calib_windows,
                                               calib_len=budget.seq_len, seed=budget.seed,
                                               progress=False)
            ppl = score(cfg, params)
            rows.append({"row": f"PTQ {recipe.name} of {name}", "kind": "PTQ",
                         "bits_per_weight": tasks.weight_stats(params)["bits_per_weight"],
                         "perplexity": ppl["perplexity"],
                         "quantize_seconds": info["quantize_seconds"]})
            print(f"PTQ {recipe.name} of {name}: ppl {ppl['perplexity']:.3f}", flush=True)
            if on_row:
                on_row(result)
    result["goals"] = goals(rows)
    return result


def goals(rows: list[dict]) -> dict:
    """The issue's goals for experiment 1, measured."""
    by = {r["row"]: r for r in rows}

    def ppl(name):
        return by[name]["perplexity"] if name in by else None

    out = {}
    if "float" in by and "qat:w8a8" in by:
        f, q = by["float"]["final_train_loss"], by["qat:w8a8"]["final_train_loss"]
        out["qat_w8a8_final_loss_vs_float_pct"] = 100 * (q / f - 1)
        out["qat_w8a8_at_most_1pct_above_float"] = q / f - 1 <= 0.01  # the goal
        out["qat_w8a8_within_1pct_either_way"] = abs(q / f - 1) <= 0.01
    if ppl("qat:w8a8") and ppl("float"):
        out["qat_w8a8_ppl_vs_float_pct"] = 100 * (ppl("qat:w8a8") / ppl("float") - 1)
    if ppl("qat:int4:g128") and ppl("PTQ gptq:int4:g128 of float"):
        out["qat_int4_beats_gptq_int4"] = ppl("qat:int4:g128") < ppl("PTQ gptq:int4:g128 of float")
    for q in ("int4:g128", "int2:g64"):
        ftq = next((r for r in rows if r["row"].startswith(f"qat:{q} from float")), None)
        if ftq is not None and ppl(f"PTQ gptq:{q} of float"):
            out[f"qat_{q.replace(':', '_')}_from_float_vs_gptq_ppl_ratio"] = (
                ftq["perplexity"] / ppl(f"PTQ gptq:{q} of float"))
        # Equal compute: the QAT fine-tune against GPTQ of the float model fine-tuned as long.
        gq = next((r for r in rows if r["row"].startswith(f"PTQ gptq:{q} of float+")), None)
        if ftq is not None and gq is not None:
            key = f"qat_{q.replace(':', '_')}_from_float_vs_gptq_of_float_ft"
            out[key + "_ppl_ratio"] = ftq["perplexity"] / gq["perplexity"]
            out[key.replace("_vs_", "_beats_")] = ftq["perplexity"] < gq["perplexity"]
    if ppl("qat:int2:g64") and ppl("PTQ gptq:int2:g64 of float"):
        out["gptq_int2_over_qat_int2_ppl_ratio"] = (ppl("PTQ gptq:int2:g64 of float")
                                                    / ppl("qat:int2:g64"))
    return out


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [f"{result['model']} ({result['params'] / 1e6:.2f} M params), {b['steps']} steps x "
             f"{b['batch_size']} x {b['seq_len']} bytes = {result['tokens_per_run']} training "
             f"tokens per run, seed {b['seed']}; PTB test: first {b['eval_tokens']} bytes.",
             "", "| row | bits/weight | PTB test ppl (bytes) | final train loss |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        loss = f"{r['final_train_loss']:.4f}" if "final_train_loss" in r else "-"
        lines.append(f"| {r['row']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} | "
                     f"{loss} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Budget):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--methods", default=",".join(QAT_METHODS),
                   help="the from-scratch runs, comma list starting with float")
    args = p.parse_args(argv)
    budget = Budget(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)})
    t0 = time.time()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()

    def write(result):
        result["commit"] = commit
        result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        result["wall_seconds"] = time.time() - t0
        result["load_average"] = os.getloadavg()
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="finetune_small-") as work:
        result = run(budget, Path(work), on_row=write, methods=tuple(args.methods.split(",")))
    write(result)
    print("\n" + markdown(result))
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
