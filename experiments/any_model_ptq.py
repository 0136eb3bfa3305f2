"""GPTQ on models jaxquant did not design: RTN vs GPTQ through ``jq.quantize_model``.

Three small randomly initialised models, written as their library's docs write them:

* ``linen_cnn``: the Flax docs' MNIST CNN (``Conv(32) - avg_pool - Conv(64) - avg_pool -
  Dense(256) - Dense(10)``) on ``28 x 28 x 1`` smooth random images;
* ``linen_vit``: a small ViT (``Conv`` patch embedding, ``nn.MultiHeadDotProductAttention``
  whose query / key / value / out are ``nn.DenseGeneral`` with N-D kernels, an ``nn.Einsum``
  MLP up-projection, ``nn.Dense`` down-projection and head) on ``32 x 32 x 3`` images;
* ``nnx_lm``: an NNX decoder-only LM (``nnx.Embed``, ``nnx.MultiHeadAttention`` with a causal
  mask, ``nnx.Linear`` MLP and head) on token windows of a fixed random Markov chain.

For each, int4 (groups of 32 inputs; the attention output projection, which contracts two
axes, per output channel) and int8 (per output channel), weight-only: the relative error of
the outputs against the float model on held-out inputs drawn from the calibration
distribution (images / chains with other seeds), for RTN (``to_serving``) and GPTQ
(``calibrate_and_convert``, one float pass over the calibration batches), at int4 also
sequential GPTQ over the repeated blocks (``blocks=``: each block calibrated on inputs computed
with the blocks before it quantized) and AWQ / AWQ+GPTQ (``method="awq"`` / ``"awq+gptq"``: a
per-input-channel scale searched per layer, kept by the served layer as its ``input_scale``),
the serving bytes against float32, and the user lines of code of the PTQ (the exact lines run
below). Embedding tables stay float (GPTQ has no matrix
product to calibrate for a lookup) except in ``int4-compact``, which also stores 16-bit group
scales: the serving size of llama.cpp's Q4_0 (4.5 bits per weight). ``bytes`` splits each
serving tree into its quantized tensors (against their own float32 size) and its float
leftovers (biases, norms, position tables).

    python experiments/any_model_ptq.py            # ~3 minutes of CPU
"""

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn.any_model import to_serving
from jaxquant.ptq.any_model import calibrate_and_convert

RESULTS = Path(__file__).resolve().parent / "results" / "any_model_ptq.json"

# The user code of the PTQ, exactly as run below (the lines are counted in the JSON).
USER_CODE = {
    "linen": [
        "qmodel = jq.quantize_model(model, rules, x)",
        "serving = calibrate_and_convert(qmodel, variables, batches)",
        "y = qmodel.apply(serving, x_test)",
    ],
    "nnx": [
        "qmodel = jq.quantize_model(model, rules, x)",
        "served = calibrate_and_convert(qmodel, batches)",
        "y = served(x_test)",
    ],
}


# The formats measured: name -> (weight qtype, group size, scale dtype, LM embedding quantized).
# "int4" and "int8" are the library's defaults; "int4-compact" is the serving-size setting of
# llama.cpp's Q4_0 (groups of 32, 16-bit scales) with the LM's embedding table int4 too.
FORMATS = {
    "int4": ("int4", 32, "float32", False),
    "int8": ("int8", None, "float32", False),
    "int4-compact": ("int4", 32, "bfloat16", True),
}


def rules_for(name: str, fmt: str) -> list:
    """The format's rules: weight-only, the attention output projection (contracting two axes)
    per output channel at int4, the LM's embedding table float unless the format says not."""
    qtype, group, scale_dtype, embed = FORMATS[fmt]

    def cfg(group_size):
        return jq.DotGeneralConfig(rhs=jq.QuantSpec(qtype=qtype, group_size=group_size,
                                                    scale_dtype=scale_dtype))

    rules = [jq.QuantRule(r"^embed$", None)] if name == "nnx_lm" and not embed else []
    if name != "linen_cnn" and group is not None:
        rules.append(jq.QuantRule(r"(^|/)out$", cfg(None)))
    return [*rules, jq.QuantRule(r".*", cfg(group))]


# --- the models, as the docs write them -------------------------------------------------------


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
        return nn.Dense(features=10)(x)


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.Einsum((d, self.mlp_dim), "bnd,df->bnf", name="up")(x)
        return nn.Dense(d, name="down")(nn.gelu(h))


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(y, y)
        return x + MlpBlock(self.mlp_dim, name="mlp")(nn.LayerNorm()(x))


class ViT(nn.Module):
    """A small Vision Transformer (patch embedding, class token, learned positions)."""

    patch: int = 4
    hidden: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        p = self.patch
        x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, c))
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="encoder_norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, mlp: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class LM(nnx.Module):
    """A decoder-only NNX language model."""

    def __init__(self, vocab=256, d=64, heads=4, mlp=256, depth=2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, mlp, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


# --- data: the calibration distribution and held-out draws from it ----------------------------


def images(seed: int, n: int, size: int, channels: int) -> jax.Array:
    """Smooth random images ``[n, size, size, channels]``: 4x4 blocks of noise, a little pixel
    noise, channels mixed (correlated, anisotropic inputs)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, size // 4, size // 4, channels), dtype=np.float32)
    x = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    x = x + 0.2 * rng.standard_normal(x.shape, dtype=np.float32)
    mix = np.random.default_rng(7).standard_normal((channels, channels)).astype(np.float32)
    return jnp.asarray(x @ (np.eye(channels, dtype=np.float32) + 0.5 * mix))


def markov_tokens(seed: int, n: int, length: int, vocab: int = 256) -> jax.Array:
    """Windows ``[n, length]`` of a fixed random Markov chain (peaked transitions)."""
    trans = np.random.default_rng(11).dirichlet(np.full(vocab, 0.05), size=vocab)
    cum = np.cumsum(trans, axis=1)
    rng = np.random.default_rng(seed)
    out = np.empty((n, length), np.int32)
    out[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        out[:, t] = np.minimum((u > cum[out[:, t - 1]]).sum(axis=1), vocab - 1)
    return jnp.asarray(out)


def tree_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QArray))
    return int(sum(v.nbytes if isinstance(v, QArray) else np.asarray(v).nbytes for v in leaves))


def bytes_breakdown(tree, f32: int) -> dict:
    """Where a serving tree's bytes go, as fractions of the float32 model's ``f32`` bytes:
    the quantized tensors against their own float32 size, and the float leftovers (biases,
    norms, position tables, float embeddings) against the whole model's."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QArray))
    qarrays = [v for v in leaves if isinstance(v, QArray)]
    q_bytes = sum(v.nbytes for v in qarrays)
    q_f32 = sum(4 * int(np.prod(v.shape)) for v in qarrays)
    rest = sum(np.asarray(v).nbytes for v in leaves if not isinstance(v, QArray))
    return {"quantized_vs_their_f32": q_bytes / q_f32, "float_leftovers_vs_f32": rest / f32,
            "quantized_share_of_f32": q_f32 / f32}


def nnx_tree(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.RngState)))


def rel_err(y, ref) -> float:
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


# --- the runs ----------------------------------------------------------------------------------


# The scaled methods run per format (int4 only: at int8 every method is close to float).
AWQ_METHODS = {"int4": ("awq", "awq+gptq"), "int8": (), "int4-compact": ()}
# The regex naming each model's repeated blocks (sequential GPTQ); the CNN has none.
BLOCKS = {"linen_cnn": None, "linen_vit": r"block_\d+", "nnx_lm": r"blocks/\d+"}


def _linen_rows(name, model, make_x, n_batches: int, batch: int, seed: int) -> dict:
    x = make_x(seed, 2)
    variables = jax.jit(model.init)(jax.random.key(seed), x)
    batches = [(make_x(seed + 100 + i, batch),) for i in range(n_batches)]
    x_test = make_x(seed + 999, 4 * batch)
    ref = jax.jit(model.apply)(variables, x_test)
    f32 = tree_bytes(variables)
    rows = {}
    for fmt in FORMATS:
        rules = rules_for(name, fmt)
        t0 = time.time()
        qmodel = jq.quantize_model(model, rules, x)
        serving = calibrate_and_convert(qmodel, variables, batches)
        y = jax.jit(qmodel.apply)(serving, x_test)
        t_gptq = time.time() - t0
        rtn = to_serving(qmodel, variables)
        seq = None
        if BLOCKS[name] and fmt == "int4":
            seq_serving = calibrate_and_convert(qmodel, variables, batches, blocks=BLOCKS[name])
            seq = rel_err(jax.jit(qmodel.apply)(seq_serving, x_test), ref)
        awq = {m: rel_err(jax.jit(qmodel.apply)(calibrate_and_convert(
            qmodel, variables, batches, method=m), x_test), ref) for m in AWQ_METHODS[fmt]}
        rows[fmt] = {
            "rtn_rel_err": rel_err(jax.jit(qmodel.apply)(rtn, x_test), ref),
            "gptq_rel_err": rel_err(y, ref),
            "gptq_sequential_rel_err": seq,
            "awq_rel_err": awq.get("awq"),
            "awq_gptq_rel_err": awq.get("awq+gptq"),
            "serving_bytes": tree_bytes(serving),
            "f32_bytes": f32,
            "vs_f32": tree_bytes(serving) / f32,
            "rtn_bytes": tree_bytes(rtn),
            "bytes": bytes_breakdown(serving, f32),
            "gptq_seconds": round(t_gptq, 1),
        }
    return rows


def _nnx_rows(name, n_batches: int, batch: int, seed: int, length: int = 32) -> dict:
    model = LM(rngs=nnx.Rngs(seed))
    x = markov_tokens(seed, 2, length)
    batches = [(markov_tokens(seed + 100 + i, batch, length),) for i in range(n_batches)]
    x_test = markov_tokens(seed + 999, 4 * batch, length)
    ref = model(x_test)
    f32 = tree_bytes(nnx_tree(model))
    rows = {}
    for fmt in FORMATS:
        rules = rules_for(name, fmt)
        t0 = time.time()
        qmodel = jq.quantize_model(model, rules, x)
        served = calibrate_and_convert(qmodel, batches)
        y = served(x_test)
        t_gptq = time.time() - t0
        rtn = to_serving(qmodel)
        seq = None
        if fmt == "int4":
            seq = rel_err(calibrate_and_convert(qmodel, batches, blocks=BLOCKS[name])(x_test), ref)
        awq = {m: rel_err(calibrate_and_convert(qmodel, batches, method=m)(x_test), ref)
               for m in AWQ_METHODS[fmt]}
        rows[fmt] = {
            "rtn_rel_err": rel_err(rtn(x_test), ref),
            "gptq_rel_err": rel_err(y, ref),
            "gptq_sequential_rel_err": seq,
            "awq_rel_err": awq.get("awq"),
            "awq_gptq_rel_err": awq.get("awq+gptq"),
            "serving_bytes": tree_bytes(nnx_tree(served)),
            "f32_bytes": f32,
            "vs_f32": tree_bytes(nnx_tree(served)) / f32,
            "rtn_bytes": tree_bytes(nnx_tree(rtn)),
            "bytes": bytes_breakdown(nnx_tree(served), f32),
            "gptq_seconds": round(t_gptq, 1),
        }
    return rows


def run(n_batches: int = 4, batch: int = 32, seed: int = 0, models=("linen_cnn", "linen_vit",
                                                                       "nnx_lm")) -> dict:
    out = {}
    for name in models:
        t0 = time.time()
        if name == "linen_cnn":
            rows = _linen_rows(name, CNN(), lambda s, n: images(s, n, 28, 1), n_batches, batch,
                               seed)
        elif name == "linen_vit":
            rows = _linen_rows(name, ViT(), lambda s, n: images(s, n, 32, 3), n_batches, batch,
                               seed)
        elif name == "nnx_lm":
            rows = _nnx_rows(name, n_batches, batch, seed)
        else:
            raise ValueError(f"unknown model {name!r}; pick from linen_cnn, linen_vit, nnx_lm.")
        out[name] = {"api": "nnx" if name.startswith("nnx") else "linen", **rows,
                     "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(rows), flush=True)
    return {
        "models": out,
        "user_code_lines": {api: len(lines) for api, lines in USER_CODE.items()},
        "user_code": USER_CODE,
    }


def environment() -> dict:
    """Device, versions, date (``jaxquant.eval.tasks.environment``), the commit that measures
    (``-dirty`` with uncommitted changes under jaxquant/ or experiments/, as
    ``ptq_table.measured_by`` records it) and the load."""
    import sys

    import flax

    from jaxquant.eval import tasks

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ptq_table import measured_by

    return {**tasks.environment(), "flax": flax.__version__, **measured_by()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=4, help="calibration batches")
    p.add_argument("--batch", type=int, default=32, help="examples per calibration batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = environment()  # the load at the start
    t0 = time.time()
    result = {
        "config": {"batches": args.batches, "batch": args.batch, "seed": args.seed,
                   "held_out": 4 * args.batch, "formats": {
                       "int4": "weight-only int4 g32, f32 scales (attention out: per channel)",
                       "int8": "weight-only int8 per channel",
                       "int4-compact": "int4 g32 with bfloat16 scales (llama.cpp Q4_0's size); "
                                       "the LM's embedding table int4 too"},
                   "awq": "AWQConfig() defaults: alpha search, then the clip search (awq); "
                          "no clip before GPTQ (awq+gptq)"},
        **run(args.batches, args.batch, args.seed),
        "seconds": round(time.time() - t0, 1),
        "environment": env,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
