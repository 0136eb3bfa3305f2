"""QAT on models neither library designed: ``jq.quantize_model`` against Qwix on a ViT and an
NNX LM.

The models are those of ``any_model_ptq.py``, written as their library's docs write them:

* ``linen_vit``: a small ViT (``Conv`` patch embedding, ``nn.MultiHeadDotProductAttention``
  with ``nn.DenseGeneral`` query / key / value / out, an ``nn.Einsum`` MLP up-projection,
  ``nn.Dense`` down-projection and head) on ``32 x 32 x 3`` smooth random images. No data set
  can be downloaded here, so the task is a teacher's (as in ``any_model_vs_qwix.py``): a
  randomly initialised float ViT labels the images (argmax of its logits standardized per
  class, so the ten classes are about balanced); train and held-out sets use other seeds.
* ``nnx_lm``: an NNX decoder-only LM (``nnx.Embed``, ``nnx.MultiHeadAttention`` with a causal
  mask, ``nnx.Linear`` MLP and head): next-token cross-entropy on windows of a fixed random
  Markov chain; held out: windows drawn with another seed.

Rows, per model: float, and per library and format QAT from the same init with the same optax
Adam steps and batches (``any_model_vs_qwix.train``). Formats (the settings both libraries give
the same meaning): ``w8a8``, int8 weights per output channel and dynamic int8 activations per
token (both libraries also give the attention products ``q . k`` and ``attn . v`` int8 x int8
under it); ``int4``, weight-only int4 per output channel (Qwix's sub-channel ``tile_size``
refuses convolutions, and it tiles the last contraction axis only, where jaxquant groups the
flattened contraction, so groups of 32 would not mean the same on the ViT); the grids differ
by one code: jaxquant's symmetric int4 uses the codes -7..7 with a scale of absmax / 7, Qwix's
-8..7 with absmax / 7.5 (absmax itself clipped half a step). The LM's embedding
lookup stays float in both: Qwix intercepts products, and a table lookup has none, so
jaxquant's rules leave ``embed`` float too.

Reported: the mean training loss over the last 20 steps; the held-out metric of the model as
trained (QAT forward) and as served (jaxquant: ``to_serving``; Qwix: its PTQ path,
``PtqProvider``, on the QAT-trained params); the serving bytes against float32 (jaxquant packs
int4 two codes a byte; Qwix stores one code a byte); the user code of each library, exactly
as run below (lines counted in the JSON). A Qwix failure is recorded as its one-line error.

    python experiments/any_model_qat.py                          # two seeds, ~8 minutes of CPU
    python experiments/any_model_qat.py --steps 5 --seeds 0      # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxquant as jq
from jaxquant.nn.any_model import to_serving

sys.path.insert(0, str(Path(__file__).resolve().parent))
import any_model_ptq as ptq  # noqa: E402
from any_model_ptq import LM, ViT, images, markov_tokens  # noqa: E402
from any_model_vs_qwix import _qwix_ptq, accuracy, qwix_bytes, teacher_data, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "any_model_qat.json"
MODELS = ("linen_vit", "nnx_lm")
FORMATS = {
    "w8a8": (jq.w8a8(), {"weight_qtype": "int8", "act_qtype": "int8"}),
    "int4": (jq.weight_only("int4"), {"weight_qtype": "int4"}),
}

# The user code of each library, exactly as run below (lines counted in the JSON): "qat" makes
# the model quantization-aware (it then trains as the float model does), "serve" turns the
# trained params into the served model.
USER_CODE = {
    "linen_vit": {
        "jaxquant": {
            "qat": [
                "rules = [jq.QuantRule('.*', cfg)]",
                "qmodel = jq.quantize_model(model, rules, x)",
            ],
            "serve": ["serving = to_serving(qmodel, variables)"],
        },
        "qwix": {
            "qat": [
                "rules = [qwix.QtRule(module_path='.*', **qt)]",
                "qmodel = qwix.quantize_model(model, qwix.QtProvider(rules))",
            ],
            "serve": [
                "qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))",
                "abstract = jax.eval_shape(qmodel.init, key, x)['params']",
                "serving = {'params': qwix.quantize_params(variables['params'], abstract)}",
            ],
        },
    },
    "nnx_lm": {
        "jaxquant": {
            "qat": [
                "rules = [jq.QuantRule('^embed$', None), jq.QuantRule('.*', cfg)]",
                "qmodel = jq.quantize_model(model, rules, x)",
            ],
            "serve": ["served = to_serving(qmodel)"],
        },
        "qwix": {
            "qat": [
                "rules = [qwix.QtRule(module_path='.*', **qt)]",
                "qmodel = qwix.quantize_model(model, qwix.QtProvider(rules), x)",
            ],
            "serve": ["served = qwix.quantize_model(qmodel, qwix.PtqProvider(rules), x)"],
        },
    },
}
# Qwix's PTQ refuses weight-only int4 convolutions: the retry leaves the ViT's patch conv float.
QWIX_PTQ_FALLBACK = {"linen_vit": r"(?!embedding$).*", "nnx_lm": None}


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _row(losses, seconds, **metrics) -> dict:
    return {"train_loss": float(np.mean(losses[-20:])), **metrics, "seconds": round(seconds, 1)}


# --- the ViT (linen) ---------------------------------------------------------------------------


def _vit_rows(steps: int, batch: int, seed: int, n_train: int, n_test: int) -> dict:
    import qwix

    def draw(key, n):  # any_model_ptq's images, seeded from the key
        return images(int(jax.random.randint(key, (), 0, 2**31 - 1)), n, 32, 3)

    (xtr, ytr), (xte, yte) = teacher_data(seed, n_train, n_test, ViT(), draw)
    model, x, key = ViT(), xtr[:batch], jax.random.key(seed + 1)
    variables = jax.jit(model.init)(key, x)
    f32 = ptq.tree_bytes(variables)
    ref = jax.jit(model.apply)(variables, xte)  # the float init, held out
    t0 = time.time()
    p, losses = train(model, variables["params"], (xtr, ytr), steps, batch, seed)
    out = {
        "majority_class_acc": float(jnp.max(jnp.bincount(yte, length=10)) / yte.shape[0]),
        "f32_bytes": f32,
        "float": _row(losses, time.time() - t0,
                      test_acc=accuracy(jax.jit(model.apply)({"params": p}, xte), yte)),
    }
    for fmt, (cfg, qt) in FORMATS.items():
        t0 = time.time()
        rules = [jq.QuantRule(".*", cfg)]
        qmodel = jq.quantize_model(model, rules, x)
        init_err = ptq.rel_err(jax.jit(qmodel.apply)(variables, xte), ref)
        p, losses = train(qmodel, variables["params"], (xtr, ytr), steps, batch, seed)
        serving = to_serving(qmodel, {"params": p})
        jq_row = _row(
            losses, time.time() - t0, init_rel_err=init_err,
            test_acc_qat=accuracy(jax.jit(qmodel.apply)({"params": p}, xte), yte),
            test_acc_served=accuracy(jax.jit(qmodel.apply)(serving, xte), yte),
            serving_bytes=ptq.tree_bytes(serving), vs_f32=ptq.tree_bytes(serving) / f32)
        out[fmt] = {"jaxquant": jq_row, "qwix": _qwix_vit(qwix, model, qt, key, x, variables,
                                                          (xtr, ytr), (xte, yte), ref, steps,
                                                          batch, seed, f32)}
    return out


def _qwix_vit(qwix, model, qt, key, x, variables, train_set, test_set, ref, steps, batch, seed,
              f32):
    t0 = time.time()
    xte, yte = test_set
    try:
        rules = [qwix.QtRule(module_path=".*", **qt)]
        qmodel = qwix.quantize_model(model, qwix.QtProvider(rules))
        init_err = ptq.rel_err(jax.jit(qmodel.apply)(variables, xte), ref)
        p, losses = train(qmodel, variables["params"], train_set, steps, batch, seed)
        row = _row(losses, time.time() - t0, init_rel_err=init_err,
                   test_acc_qat=accuracy(jax.jit(qmodel.apply)({"params": p}, xte), yte))
    except Exception as e:  # noqa: BLE001 -- a refusal is a result: recorded, not raised
        return {"error": _first_line(e)}
    row["serve_note"] = None
    try:
        try:
            serving, logits = _qwix_ptq(qwix, model, ".*", qt, key, x, {"params": p}, xte)
        except ValueError as e:  # Qwix's PTQ refuses weight-only conv: serve the conv float
            row["serve_note"] = f"{_first_line(e)} -> patch conv left float"
            serving, logits = _qwix_ptq(qwix, model, QWIX_PTQ_FALLBACK["linen_vit"], qt, key,
                                        x, {"params": p}, xte)
    except Exception as e:  # noqa: BLE001
        row["serve_error"] = _first_line(e)
        return row
    row.update(test_acc_served=accuracy(logits, yte), serving_bytes=qwix_bytes(serving),
               vs_f32=qwix_bytes(serving) / f32)
    return row


# --- the LM (NNX) ------------------------------------------------------------------------------


class Functional:
    """An NNX module under the linen calling convention ``any_model_vs_qwix.train`` uses:
    ``apply({"params": params}, x)``, with ``params`` the module's ``nnx.Param`` state."""

    def __init__(self, module):
        self.graphdef, self.params, self.rest = nnx.split(module, nnx.Param, ...)

    def apply(self, variables, x):
        return nnx.merge(self.graphdef, variables["params"], self.rest)(x)

    def module(self, params):
        return nnx.merge(self.graphdef, params, self.rest)


@jax.jit
def _next_token_loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_call = nnx.jit(lambda module, x: module(x))


def _heldout(module, test_set) -> float:
    x, y = test_set
    return float(_next_token_loss(_call(module, x), y))


def _lm_rows(steps: int, batch: int, seed: int, n_train: int, n_test: int,
             length: int = 32) -> dict:
    import qwix

    tr = markov_tokens(seed, n_train, length + 1)
    te = markov_tokens(seed + 999, n_test, length + 1)
    train_set, test_set = (tr[:, :-1], tr[:, 1:]), (te[:, :-1], te[:, 1:])
    model = LM(rngs=nnx.Rngs(seed))
    x = train_set[0][:batch]
    f32 = ptq.tree_bytes(ptq.nnx_tree(model))
    init = Functional(model).params
    ref = _call(model, test_set[0])  # the float init, held out

    def fit(module):
        fn = Functional(module)
        p, losses = train(fn, init, train_set, steps, batch, seed)
        return fn.module(p), losses

    t0 = time.time()
    trained, losses = fit(model)
    loss = _heldout(trained, test_set)
    out = {"f32_bytes": f32, "float": _row(losses, time.time() - t0, test_loss=loss,
                                           test_ppl=float(np.exp(loss)))}
    for fmt, (cfg, qt) in FORMATS.items():
        t0 = time.time()
        rules = [jq.QuantRule("^embed$", None), jq.QuantRule(".*", cfg)]
        qmodel = jq.quantize_model(model, rules, x)
        init_err = ptq.rel_err(_call(qmodel, test_set[0]), ref)
        qmodel, losses = fit(qmodel)
        served = to_serving(qmodel)
        loss = _heldout(served, test_set)
        jq_row = _row(losses, time.time() - t0, init_rel_err=init_err,
                      test_loss_qat=_heldout(qmodel, test_set), test_loss_served=loss,
                      test_ppl_served=float(np.exp(loss)),
                      serving_bytes=ptq.tree_bytes(ptq.nnx_tree(served)),
                      vs_f32=ptq.tree_bytes(ptq.nnx_tree(served)) / f32)
        out[fmt] = {"jaxquant": jq_row, "qwix": _qwix_lm(qwix, model, qt, x, fit, test_set, ref,
                                                        f32)}
    return out


def _qwix_lm(qwix, model, qt, x, fit, test_set, ref, f32):
    t0 = time.time()
    try:
        rules = [qwix.QtRule(module_path=".*", **qt)]
        qmodel = qwix.quantize_model(model, qwix.QtProvider(rules), x)
        init_err = ptq.rel_err(_call(qmodel, test_set[0]), ref)
        qmodel, losses = fit(qmodel)
        row = _row(losses, time.time() - t0, init_rel_err=init_err,
                   test_loss_qat=_heldout(qmodel, test_set))
    except Exception as e:  # noqa: BLE001 -- a refusal is a result: recorded, not raised
        return {"error": _first_line(e)}
    try:
        served = qwix.quantize_model(qmodel, qwix.PtqProvider(rules), x)
        loss = _heldout(served, test_set)
        stored = qwix_bytes(nnx.state(served, nnx.Not(nnx.RngState)))
    except Exception as e:  # noqa: BLE001
        row["serve_error"] = _first_line(e)
        return row
    row.update(test_loss_served=loss, test_ppl_served=float(np.exp(loss)),
               serving_bytes=stored, vs_f32=stored / f32)
    return row


# --- the run -----------------------------------------------------------------------------------


def run(steps: int = 300, batch: int = 32, seed: int = 0, n_train: int = 2048,
        n_test: int = 512, models=MODELS) -> dict:
    out = {}
    for name in models:
        t0 = time.time()
        if name == "linen_vit":
            rows = _vit_rows(steps, batch, seed, n_train, n_test)
        elif name == "nnx_lm":
            rows = _lm_rows(steps, batch, seed, n_train, n_test)
        else:
            raise ValueError(f"unknown model {name!r}; pick from {', '.join(MODELS)}.")
        out[name] = {"api": name.split("_")[0], **rows, "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(rows), flush=True)
    return {
        "models": out,
        "user_code_lines": {
            name: {lib: {k: len(v) for k, v in d.items()} for lib, d in USER_CODE[name].items()}
            for name in models
        },
        "user_code": {name: USER_CODE[name] for name in models},
    }


def mean_over_seeds(runs: list[dict]) -> dict:
    """The rows of several runs with each number averaged (strings kept when all agree, else
    listed)."""

    def mean(*xs):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs):
            return float(np.mean(xs))
        return xs[0] if all(v == xs[0] for v in xs) else list(xs)

    return jax.tree.map(mean, *runs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="data, init and batch-order seeds; rows are averaged over them")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = {**ptq.environment(), "qwix": version("qwix")}  # the load at the start
    t0 = time.time()
    runs = {seed: run(args.steps, args.batch, seed) for seed in args.seeds}
    first = runs[args.seeds[0]]
    result = {
        "config": {"steps": args.steps, "batch": args.batch, "seeds": args.seeds,
                   "optimizer": "optax.adam(1e-3)", "train_loss": "mean of the last 20 steps",
                   "models": "mean over the seeds (per_seed: each seed's rows)",
                   "formats": {"w8a8": "int8 weights per output channel, dynamic int8 "
                                       "activations per token",
                               "int4": "weight-only int4 per output channel"}},
        "models": mean_over_seeds([r["models"] for r in runs.values()]),
        "per_seed": {str(seed): r["models"] for seed, r in runs.items()},
        "user_code_lines": first["user_code_lines"],
        "user_code": first["user_code"],
        "seconds": round(time.time() - t0, 1),
        "environment": env,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
