"""jaxquant's GPTQ against Qwix's GPTQ (``qwix.contrib.gptq``) on the same model and data.

Both run on the same float ``jaxquant.nn.Transformer`` params, the same PTB calibration windows
(those of ``experiments/ptq_table.py``: ``calibration_windows`` on PTB train, 32 x 512, seed 0)
and are scored by the same perplexity code on the same PTB test tokens. Per recipe the rows are:

* ``jaxquant rtn`` and ``jaxquant gptq``: :func:`jaxquant.ptq.pipeline.quantize_model`
  (GPTQ block by block: each block is calibrated on the outputs of the already-quantized blocks);
* ``qwix rtn`` and ``qwix gptq``: Qwix's documented flow run *directly on our Transformer*
  (its interception catches the ``lax.dot_general`` inside our ``QDense``): one float forward
  pass under ``GptqCalibrationProvider`` collects every layer's Hessian at once (one-shot, not
  sequential), then ``gptq.quantize_params`` quantizes each kernel. The same per-layer groups
  as ours (a ``tile_size`` per rule: 96 for SmolLM2's 576 inputs, 128 for ``down_proj``).

Quantization time is wall time from float params + calibration windows to serving params
(QArray trees), with ``block_until_ready``, jit compilation and Hessian collection included.
Qwix's serving params are evaluated by dequantizing its kernels (Qwix's own ``dequantize``) into
the float model: its ``PtqProvider`` cannot serve through our ``QDense``, which casts the kernel
with ``astype`` (unsupported for a Qwix ``QArray``). Weight-only, so this is the same product.

Differences that remain at "the same settings" (each library's own choices, recorded here):

* symmetric grids: Qwix's int4 scale is ``absmax / 7.5`` with codes in ``[-8, 7]``, ours
  ``absmax / 7`` with codes in ``[-7, 7]`` (int3: ``3.5`` and ``[-4, 3]`` against ``3``);
* Qwix's GPTQ always uses blocks of 128 columns and takes a group's scale from the weights as
  they were at the block's start (as the reference code); ours uses blocks holding whole groups
  (96 for 96-groups) and the error-updated weights; ours may also reorder columns (act-order);
* Qwix's GPTQ stores codes in a real ``jnp`` dtype, so ``int3`` GPTQ raises (its RTN has int3);
* Qwix's ``gptq.quantize_params`` runs eagerly, one column at a time (its documented API).

    /tmp/peers/bin/python experiments/ptq_qwix.py --model tiny          # minutes
    /tmp/peers/bin/python experiments/ptq_qwix.py --recipes gptq:int4:g128,gptq:int3:g128
    # re-run some rows (e.g. after a library change) and merge them into the table:
    /tmp/peers/bin/python experiments/ptq_qwix.py --skip gptq:int4:g128/qwix --out new.json
    /tmp/peers/bin/python experiments/ptq_qwix.py --merge experiments/results/ptq_qwix.json \
        new.json --out experiments/results/ptq_qwix.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import data
from jaxquant.eval import tasks
from jaxquant.models.registry import LoadedModel, load
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.pipeline import PTQOptions, effective_group, quantize_model
from jaxquant.ptq.recipe import Recipe, parse_recipe

RECIPES = ("gptq:int4:g128", "gptq:int3:g128")

# Module paths of the block projections (as Qwix sees them) and their input widths.
_LINEARS = {
    "attn/q_proj": "d_model",
    "attn/k_proj": "d_model",
    "attn/v_proj": "d_model",
    "attn/o_proj": "q_dim",
    "mlp/gate_proj": "d_model",
    "mlp/up_proj": "d_model",
    "mlp/down_proj": "ffn_dim",
}


def layer_groups(cfg: TransformerConfig, group: int | None) -> dict[str, int | None]:
    """Group size per block projection, exactly as jaxquant's pipeline picks it."""
    return {lin: effective_group(getattr(cfg, dim), group) for lin, dim in _LINEARS.items()}


def qwix_rule_specs(cfg: TransformerConfig, recipe: Recipe) -> list[dict]:
    """Keyword arguments of one Qwix rule per distinct group size (regexes over module paths).

    Qwix's ``int4`` / ``int8`` are jnp dtypes; other widths (``int3``) stay strings, which its
    PTQ accepts and its GPTQ rejects.
    """
    by_group: dict[int | None, list[str]] = {}
    for lin, g in layer_groups(cfg, recipe.group_size).items():
        by_group.setdefault(g, []).append(lin)
    method = "absmax" if recipe.symmetric else "minmax"
    qtype = {"int4": jnp.int4, "int8": jnp.int8}.get(recipe.qtype, recipe.qtype)
    return [
        dict(
            module_path=rf"block_\d+/({'|'.join(lins)})",
            weight_qtype=qtype,
            tile_size=g,
            weight_calibration_method=method,
        )
        for g, lins in sorted(by_group.items(), key=lambda kv: kv[0] or 0)
    ]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "flax", "qwix", "jaxquant"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["jaxquant_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "jaxquant"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
            check=True,
        ).stdout.strip()
        out["jaxquant_dirty"] = bool(dirty)  # uncommitted library changes at start
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def _timed(fn):
    """``(result, seconds)`` of ``fn()`` with everything it returns ready."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


# --- Qwix ---------------------------------------------------------------------------------------
def qwix_quantize(
    cfg: TransformerConfig, params, recipe: Recipe, calib: np.ndarray, *, batch_windows: int = 8
) -> dict:
    """Qwix RTN (``method == "rtn"``) or GPTQ on our Transformer; returns Qwix serving params."""
    from qwix._src import model as qwix_model
    from qwix._src.providers import ptq
    from qwix.contrib import gptq

    rules = [gptq.GptqRule(**kw) for kw in qwix_rule_specs(cfg, recipe)]
    model = Transformer(cfg)
    ptq_model = qwix_model.quantize_model(model, ptq.PtqProvider(rules))
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    if recipe.method == "rtn":
        return ptq.quantize_params(params, abstract["params"])
    cal_model = qwix_model.quantize_model(model, gptq.GptqCalibrationProvider(rules))

    @jax.jit
    def first(p, tokens):
        return cal_model.apply({"params": p}, tokens, mutable="quant_stats")[1]["quant_stats"]

    @jax.jit
    def update(p, stats, tokens):
        variables = {"params": p, "quant_stats": stats}
        return cal_model.apply(variables, tokens, mutable="quant_stats")[1]["quant_stats"]

    calib = jnp.asarray(calib, jnp.int32)
    stats = None
    for a in range(0, len(calib), batch_windows):
        batch = calib[a : a + batch_windows]
        stats = first(params, batch) if stats is None else update(params, stats, batch)
    return gptq.quantize_params(params, abstract["params"], stats)


def qwix_dequantized(params):
    """Qwix serving params with every quantized kernel dequantized (float, for our model)."""
    from qwix._src.core import qarray
    from qwix._src.providers import ptq

    return jax.tree.map(
        lambda x: qarray.dequantize(x.array) if isinstance(x, ptq.WithAux) else x,
        params,
        is_leaf=lambda x: isinstance(x, ptq.WithAux),
    )


# --- the table ----------------------------------------------------------------------------------
def run(
    model: str | LoadedModel = "smollm2-135m",
    recipes=RECIPES,
    *,
    eval_tokens: int | None = 8192,
    calib_windows: int = 32,
    calib_len: int = 512,
    seed: int = 0,
    out: str | Path | None = "experiments/results/ptq_qwix.json",
    skip: tuple[str, ...] = (),
    progress: bool = False,
) -> dict:
    """fp32, then per recipe RTN and GPTQ of jaxquant and of Qwix; writes ``out`` after
    every row (a long run keeps what it finished). Rows whose ``"recipe/method"`` starts with
    an entry of ``skip`` (``"gptq:int4:g128/qwix"``) are not run. Returns the result dict."""
    m = load(model) if isinstance(model, str) else model
    budget = tasks.DemoBudget(
        eval_tokens=eval_tokens, calib_windows=calib_windows, calib_len=calib_len
    )
    test = tasks.tokens_for(m, "ptb", "test")
    length = min(calib_len, m.cfg.max_seq_len)  # as tasks.quantize
    calib = data.calibration_windows(
        tasks.tokens_for(m, "ptb", "train"), calib_windows, length, seed
    )
    versions = _versions()
    result = {
        "model": m.name,
        "environment": {**tasks.environment(), **versions, "cpu_count": os.cpu_count()},
        "settings": {
            "dataset": "ptb",
            "calibration": {
                "split": "train",
                "windows": calib_windows,
                "length": length,
                "seed": seed,
            },
            "eval": {"split": "test", "tokens": eval_tokens, "seq_len": budget.seq_len},
            "jaxquant_gptq": dataclasses.asdict(PTQOptions().gptq),
            "qwix_gptq": {"block_size": 128, "damping": 0.01},
        },
        "rows": [],
    }

    def evaluate(cfg, params):
        return tasks.evaluate_params(
            cfg, params, test, seq_len=budget.seq_len, max_tokens=eval_tokens, progress=progress
        )

    def add(recipe: str, method: str, fn, cfg_params, extra=None):
        if any(f"{recipe}/{method}".startswith(k) for k in skip):
            return
        row = {
            "recipe": recipe,
            "method": method,
            "jaxquant_commit": versions.get("jaxquant_commit"),
            "jaxquant_dirty": versions.get("jaxquant_dirty"),
            "load_avg_1m": os.getloadavg()[0],
            **(extra or {}),
        }
        try:
            q, seconds = _timed(fn)
            cfg, params = cfg_params(q)
            ppl = evaluate(cfg, params)
            row.update(
                perplexity=ppl["perplexity"],
                tokens_scored=ppl["tokens_scored"],
                quantize_seconds=seconds,
                eval_seconds=ppl["seconds"],
            )
            base = result["rows"][0].get("perplexity") if result["rows"] else None
            if base:
                row.update(
                    delta=row["perplexity"] - base,
                    delta_pct=100.0 * (row["perplexity"] / base - 1.0),
                )
        except Exception as e:  # noqa: BLE001  (a peer that cannot run a setting is a result)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        result["rows"].append(row)
        result["environment"]["load_avg_end"] = os.getloadavg()
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2))
        print(markdown_table([row], header=len(result["rows"]) == 1), flush=True)

    add("fp32", "fp32", lambda: 0, lambda _: (m.cfg, m.params))
    for text in recipes:
        recipe = parse_recipe(text)
        if recipe.method != "gptq":
            raise ValueError(f"{text!r}: this comparison takes gptq recipes (gptq:int4:g128).")
        rtn = dataclasses.replace(recipe, method="rtn")
        groups = {"groups": layer_groups(m.cfg, recipe.group_size)}
        for r, method in ((rtn, "jaxquant rtn"), (recipe, "jaxquant gptq")):
            add(
                recipe.name,
                method,
                lambda r=r: quantize_model(m.cfg, m.params, r, calib, progress=progress)[:2],
                lambda q: q,
                groups,
            )
        for r, method in ((rtn, "qwix rtn"), (recipe, "qwix gptq")):
            add(
                recipe.name,
                method,
                lambda r=r: qwix_quantize(m.cfg, m.params, r, calib),
                lambda q: (m.cfg, qwix_dequantized(q)),
                groups,
            )
    return result


def merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s rows replacing (or adding) the same ``(recipe, method)``.

    Each row keeps the jaxquant commit and GPTQ settings it ran with; replaced rows move to
    ``replaced_rows``, and both environments are kept. The model, data and evaluation
    settings must be equal.
    """

    def stamped(result):
        env = result["environment"]
        stamp = {k: env.get(k) for k in ("jaxquant_commit", "jaxquant_dirty")}
        stamp["jaxquant_gptq"] = result["settings"].get("jaxquant_gptq")
        return [{**stamp, **r} for r in result["rows"]]

    def shared(result):
        return result["model"], {
            k: v for k, v in result["settings"].items() if k != "jaxquant_gptq"
        }

    if shared(base) != shared(update):
        raise ValueError("Only results of the same model and settings can be merged.")
    new = {(r["recipe"], r["method"]): r for r in stamped(update)}
    rows, replaced = [], list(base.get("replaced_rows", []))
    for r in stamped(base):
        key = (r["recipe"], r["method"])
        if key in new:
            replaced.append(r)
        rows.append(new.pop(key, r))
    envs = base.get("environments", [base["environment"]]) + [update["environment"]]
    return {
        **base,
        "environment": update["environment"],
        "environments": envs,
        "settings": update["settings"],
        "rows": rows + list(new.values()),
        "replaced_rows": replaced,
    }


def markdown_table(rows, header: bool = True) -> str:
    """The rows as a markdown table (perplexity, delta vs fp32, quantization time)."""
    lines = (
        ["| recipe | method | perplexity | delta | PTQ time (s) |", "|---|---|---:|---:|---:|"]
        if header
        else []
    )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['method']} | unsupported: {r['error'][:80]} | | |")
            continue
        delta = f"{r['delta']:+.3f} ({r['delta_pct']:+.2f}%)" if "delta" in r else "-"
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['perplexity']:.3f} | {delta} | "
            f"{r['quantize_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated gptq recipes")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/ptq_qwix.json")
    p.add_argument("--skip", default="", help="comma-separated 'recipe/method' prefixes to skip")
    p.add_argument(
        "--merge",
        nargs=2,
        metavar=("BASE", "UPDATE"),
        help="merge two result files into --out (UPDATE's rows win) and stop",
    )
    a = p.parse_args()
    if a.merge:
        base, update = (json.loads(Path(f).read_text()) for f in a.merge)
        r = merge(base, update)
        Path(a.out).write_text(json.dumps(r, indent=2))
        print(markdown_table(r["rows"]))
        return
    r = run(
        a.model,
        a.recipes.split(","),
        eval_tokens=a.eval_tokens,
        calib_windows=a.calib_windows,
        calib_len=a.calib_len,
        seed=a.seed,
        out=a.out,
        skip=tuple(k for k in a.skip.split(",") if k),
    )
    print()
    print(markdown_table(r["rows"]))


if __name__ == "__main__":
    main()
