"""``jq.quantize_model`` against Qwix on a model neither library designed: Flax's MNIST CNN.

The model is the CNN of the Flax docs (``Conv(32) - avg_pool - Conv(64) - avg_pool -
Dense(256) - Dense(10)``), written as those docs write it, on ``16 x 16 x 1`` images (smaller
than MNIST's 28 x 28 so a CPU run takes minutes). No data set can be downloaded here, so the
task is a teacher's: a randomly initialised float copy of the same CNN labels smooth random
images (argmax of its logits, standardized per class over the train set so the ten classes are
about balanced); train and held-out sets are drawn with different seeds.

Rows, per library and format (``w8a8``: int8 weights per output channel and dynamic int8
activations; ``int4``: weight-only int4 per output channel, the one format both libraries give
the same meaning):

* QAT: the student is trained from the same init with the same optax Adam steps and batches,
  quantization-aware; reported: the mean training loss over the last 20 steps and held-out
  accuracy of the model as served (jaxquant: ``to_serving`` params on the quantized model;
  Qwix: its QAT forward);
* PTQ: the float-trained student quantized after training (RTN); reported: the relative error
  of its held-out logits against float, held-out accuracy, and the bytes of the serving params
  against float32 (jaxquant packs int4 two codes a byte; Qwix stores one code a byte).

The user code each library needs is recorded next to the numbers (the exact lines run below).

    python experiments/any_model_vs_qwix.py               # ~minutes on CPU
    python experiments/any_model_vs_qwix.py --steps 20    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn.any_model import to_serving

RESULTS = Path(__file__).resolve().parent / "results" / "any_model_vs_qwix.json"
SIZE, CLASSES = 16, 10

# The user code of each library, exactly as run below (lines counted in the JSON).
USER_CODE = {
    "jaxquant": {
        "qat": [
            "rules = [jq.QuantRule('.*', cfg)]",
            "qmodel = jq.quantize_model(model, rules, x)",
        ],
        "ptq": [
            "rules = [jq.QuantRule('.*', cfg)]",
            "qmodel = jq.quantize_model(model, rules, x)",
            "serving = to_serving(qmodel, variables)",
        ],
    },
    "qwix": {
        "qat": [
            "rules = [qwix.QtRule(module_path='.*', **qt)]",
            "qmodel = qwix.quantize_model(model, qwix.QtProvider(rules))",
        ],
        "ptq": [
            "rules = [qwix.QtRule(module_path='.*', **qt)]",
            "qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))",
            "abstract = jax.eval_shape(qmodel.init, key, x)['params']",
            "serving = {'params': qwix.quantize_params(variables['params'], abstract)}",
        ],
    },
}
FORMATS = {
    "w8a8": (jq.w8a8(), {"weight_qtype": "int8", "act_qtype": "int8"}),
    "int4": (jq.weight_only("int4"), {"weight_qtype": "int4"}),
}


class CNN(nn.Module):
    """The Flax docs' MNIST CNN."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        return nn.Dense(features=CLASSES)(x)


def images(key, n: int) -> jax.Array:
    """Smooth random images ``[n, SIZE, SIZE, 1]``: 4x4 noise upsampled and blurred."""
    coarse = jax.random.normal(key, (n, SIZE // 4, SIZE // 4, 1))
    x = jax.image.resize(coarse, (n, SIZE, SIZE, 1), "bilinear")
    return x + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), x.shape)


def teacher_data(seed: int, n_train: int, n_test: int, teacher=None, make_images=None):
    """``(x, labels)`` train and held-out sets labelled by a random float ``teacher`` (a linen
    module; the CNN by default) on ``make_images(key, n)`` (this file's ``images`` by
    default)."""
    teacher = CNN() if teacher is None else teacher
    draw = images if make_images is None else make_images
    k_t, k_train, k_test = jax.random.split(jax.random.key(seed), 3)
    x0 = draw(k_train, n_train)
    tparams = teacher.init(k_t, x0[:1])
    logits = jax.jit(teacher.apply)
    # standardized per class over the train set, so the classes come out about balanced
    l0 = logits(tparams, x0)
    mean, std = l0.mean(0), l0.std(0)
    label = lambda x: jnp.argmax((logits(tparams, x) - mean) / std, -1)  # noqa: E731
    x1 = draw(k_test, n_test)
    return (x0, label(x0)), (x1, label(x1))


def train(model, params, data, steps: int, batch: int, seed: int):
    """Adam steps on cross-entropy; returns (params, losses)."""
    x, y = data
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], batch)
        params, state, loss = step(params, state, x[idx], y[idx])
        losses.append(float(loss))
    return params, losses


def accuracy(logits, y) -> float:
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def tree_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QArray))
    return int(sum(v.nbytes if isinstance(v, QArray) else np.asarray(v).nbytes for v in leaves))


def qwix_bytes(tree) -> int:
    return int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(tree)))


def run(
    steps: int = 300, batch: int = 64, seed: int = 0, n_train: int = 4096, n_test: int = 1024
) -> dict:
    import qwix

    (xtr, ytr), (xte, yte) = teacher_data(seed, n_train, n_test)
    model = CNN()
    x = xtr[:batch]
    key = jax.random.key(seed + 1)
    variables = model.init(key, x)
    f32_bytes = tree_bytes(variables)
    out: dict = {"qat": {}, "ptq": {}}

    t0 = time.time()
    fparams, losses = train(model, variables["params"], (xtr, ytr), steps, batch, seed)
    flogits = jax.jit(model.apply)({"params": fparams}, xte)
    out["majority_class_acc"] = float(jnp.max(jnp.bincount(yte, length=CLASSES)) / yte.shape[0])
    out["float"] = {
        "train_loss": float(np.mean(losses[-20:])),
        "test_acc": accuracy(flogits, yte),
        "param_bytes": f32_bytes,
        "seconds": time.time() - t0,
    }
    for fmt, (cfg, qt) in FORMATS.items():
        # --- QAT ---------------------------------------------------------------------------
        t0 = time.time()
        rules = [jq.QuantRule(".*", cfg)]
        qmodel = jq.quantize_model(model, rules, x)
        p, losses = train(qmodel, variables["params"], (xtr, ytr), steps, batch, seed)
        serving = to_serving(qmodel, {"params": p})
        jq_row = {
            "train_loss": float(np.mean(losses[-20:])),
            "test_acc": accuracy(jax.jit(qmodel.apply)(serving, xte), yte),
            "seconds": time.time() - t0,
        }
        t0 = time.time()
        rules = [qwix.QtRule(module_path=".*", **qt)]
        qwmodel = qwix.quantize_model(model, qwix.QtProvider(rules))
        p, losses = train(qwmodel, variables["params"], (xtr, ytr), steps, batch, seed)
        qw_row = {
            "train_loss": float(np.mean(losses[-20:])),
            "test_acc": accuracy(jax.jit(qwmodel.apply)({"params": p}, xte), yte),
            "seconds": time.time() - t0,
        }
        out["qat"][fmt] = {"jaxquant": jq_row, "qwix": qw_row}
        # --- PTQ (RTN) of the float-trained model -------------------------------------------
        fvars = {"params": fparams}
        rules = [jq.QuantRule(".*", cfg)]
        qmodel = jq.quantize_model(model, rules, x)
        serving = to_serving(qmodel, fvars)
        jlogits = jax.jit(qmodel.apply)(serving, xte)
        qw_note = None
        try:
            qserving, qlogits = _qwix_ptq(qwix, model, ".*", qt, key, x, fvars, xte)
        except ValueError as e:  # Qwix's PTQ refuses weight-only conv: quantize the Dense only
            qw_note = f"{str(e).splitlines()[0]} -> rule 'Dense_.*' only (convs left float)"
            qserving, qlogits = _qwix_ptq(qwix, model, "Dense_.*", qt, key, x, fvars, xte)
        rel = lambda lg: float(jnp.linalg.norm(lg - flogits) / jnp.linalg.norm(flogits))  # noqa: E731
        out["ptq"][fmt] = {
            "jaxquant": {
                "rel_logit_error": rel(jlogits),
                "test_acc": accuracy(jlogits, yte),
                "param_bytes": tree_bytes(serving),
                "vs_f32": tree_bytes(serving) / f32_bytes,
            },
            "qwix": {
                "note": qw_note,
                "rel_logit_error": rel(qlogits),
                "test_acc": accuracy(qlogits, yte),
                "param_bytes": qwix_bytes(qserving),
                "vs_f32": qwix_bytes(qserving) / f32_bytes,
            },
        }
    out["user_code_lines"] = {
        lib: {k: len(v) for k, v in d.items()} for lib, d in USER_CODE.items()
    }
    out["user_code"] = USER_CODE
    return out


def _qwix_ptq(qwix, model, pattern, qt, key, x, fvars, xte):
    rules = [qwix.QtRule(module_path=pattern, **qt)]
    qwmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(qwmodel.init, key, x)["params"]
    serving = {"params": qwix.quantize_params(fvars["params"], abstract)}
    return serving, jax.jit(qwmodel.apply)(serving, xte)


def environment() -> dict:
    from jaxquant.eval import tasks

    env = tasks.environment()
    env["load_average"] = os.getloadavg()
    env["qwix"] = version("qwix")
    env["flax"] = version("flax")
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    return env


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = {
        "config": {"steps": args.steps, "batch": args.batch, "seed": args.seed, "image": SIZE},
        **run(args.steps, args.batch, args.seed),
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("float", "qat", "ptq")}, indent=1))
    return result


if __name__ == "__main__":
    main()
