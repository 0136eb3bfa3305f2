"""On-disk size of Orbax checkpoints for the SmolLM2-135M shapes, float vs quantized.

Random weights with SmolLM2-135M's shapes (30 layers, d=576, 9 heads x 64, 3 KV heads x 64,
FFN 1536, tied 49152 x 576 embedding) are saved with ``jaxquant.checkpoint.save`` as:

* ``f32`` and ``bf16``: every tensor in that dtype;
* ``int8`` per output channel, ``int4 g128`` and ``int4 g32`` with zero points: the seven
  projection kernels quantized with ``quantize_operand(w, spec, (0,))``; norms stay f32.

Each quantized recipe is reported twice: with the embedding kept in bf16, and with it quantized
like the kernels along its model axis (``quantize_operand(E, spec, (1,))``: the contracting
axis of the tied LM head, so each token row gets its own scales, which also serves the lookup).

576 is not a multiple of 128 (576 = 9 x 64): a group size that does not divide an axis is
lowered to the largest power of two that does (g128 -> g64 on the 576-wide inputs; down_proj's
1536 inputs keep g128). The result file records the group sizes used.

Usage::

  python experiments/checkpoint_sizes.py            # writes experiments/results/checkpoint_sizes.json
  python experiments/checkpoint_sizes.py --tiny     # seconds; the smoke test runs this
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxquant import checkpoint
from jaxquant.core import QArray, QuantSpec, quantize_operand

_quantize = jax.jit(quantize_operand, static_argnums=(1, 2))
RESULTS = pathlib.Path(__file__).parent / "results" / "checkpoint_sizes.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shapes:
    """A LLaMA-style decoder's parameter shapes."""

    n_layers: int = 30
    d_model: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    d_ff: int = 1536
    vocab: int = 49152


SMOLLM2_135M = Shapes()
TINY = Shapes(n_layers=2, d_model=96, n_heads=2, n_kv_heads=1, head_dim=48, d_ff=256, vocab=512)

# name, spec (None: a float dtype), zero points
RECIPES = {
    "f32": None,
    "bf16": None,
    "int8 per-channel": QuantSpec(qtype="int8"),
    "int4 g128": QuantSpec(qtype="int4", group_size=128),
    "int4 g32 + zero points": QuantSpec(qtype="int4", group_size=32, symmetric=False),
}


def kernel_shapes(s: Shapes) -> dict[str, tuple[int, int]]:
    """The seven ``[in, out]`` projection kernels of one layer."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return {
        "q_proj": (s.d_model, q),
        "k_proj": (s.d_model, kv),
        "v_proj": (s.d_model, kv),
        "o_proj": (q, s.d_model),
        "gate_proj": (s.d_model, s.d_ff),
        "up_proj": (s.d_model, s.d_ff),
        "down_proj": (s.d_ff, s.d_model),
    }


def random_params(s: Shapes, seed: int = 0) -> dict:
    """Random f32 parameters with ``s``'s shapes (N(0, 0.02), norms 1)."""
    key = jax.random.key(seed)
    params: dict = {"embed": None, "layers": {}, "final_norm": jnp.ones((s.d_model,))}
    key, k = jax.random.split(key)
    params["embed"] = 0.02 * jax.random.normal(k, (s.vocab, s.d_model), jnp.float32)
    for i in range(s.n_layers):
        layer = {"attn_norm": jnp.ones((s.d_model,)), "mlp_norm": jnp.ones((s.d_model,))}
        for name, shape in kernel_shapes(s).items():
            key, k = jax.random.split(key)
            layer[name] = 0.02 * jax.random.normal(k, shape, jnp.float32)
        params["layers"][f"layer_{i:02d}"] = layer
    return params


def count_params(s: Shapes) -> int:
    per_layer = sum(a * b for a, b in kernel_shapes(s).values()) + 2 * s.d_model
    return s.vocab * s.d_model + s.n_layers * per_layer + s.d_model


def fit_group(spec: QuantSpec, n: int) -> QuantSpec:
    """``spec`` with its group size lowered to the largest power of two dividing ``n``."""
    g = spec.group_size
    if g is None or n % g == 0:
        return spec
    while n % g:
        g //= 2
    return dataclasses.replace(spec, group_size=g)


def convert(params: dict, recipe: str, quantize_embedding: bool) -> tuple[dict, Counter]:
    """``params`` in ``recipe``; also counts the group sizes used per quantized tensor."""
    spec = RECIPES[recipe]
    groups: Counter = Counter()
    if spec is None:
        dtype = jnp.float32 if recipe == "f32" else jnp.bfloat16
        return jax.tree.map(lambda x: x.astype(dtype), params), groups

    def q(w, axis):
        s = fit_group(spec, w.shape[axis])
        groups[s.group_size] += 1
        return _quantize(w, s, (axis,))

    out = {"final_norm": params["final_norm"], "layers": {}}
    emb = params["embed"]
    out["embed"] = q(emb, 1) if quantize_embedding else emb.astype(jnp.bfloat16)
    for name, layer in params["layers"].items():
        out["layers"][name] = {k: (v if k.endswith("norm") else q(v, 0)) for k, v in layer.items()}
    return out, groups


def payload_bytes(tree) -> int:
    """Bytes of the arrays themselves (codes + scales + zero points)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        else:
            total += leaf.size * np.dtype(leaf.dtype).itemsize
    return total


def directory_bytes(path: pathlib.Path) -> tuple[int, int]:
    """Total apparent size of the files under ``path``, and how many files."""
    total = n = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
            n += 1
    return total, n


def _identical(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def measure(shapes: Shapes = SMOLLM2_135M, workdir: str | os.PathLike | None = None) -> list[dict]:
    """Saves every recipe, measures the directory, restores and checks it bit-identical."""
    params = random_params(shapes)
    n_params = count_params(shapes)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for recipe, spec in RECIPES.items():
            for q_emb in (False, True) if spec is not None else (False,):
                tree, groups = convert(params, recipe, q_emb)
                path = pathlib.Path(tmp) / "ckpt"
                t0 = time.perf_counter()
                checkpoint.save(path, tree)
                t_save = time.perf_counter() - t0
                disk, files = directory_bytes(path)
                t0 = time.perf_counter()
                back = checkpoint.restore(path)
                t_restore = time.perf_counter() - t0
                if not _identical(back, tree):
                    raise RuntimeError(f"{recipe}: restored tree differs from the saved one")
                shutil.rmtree(path)
                emb = recipe if spec is None else (recipe if q_emb else "bf16")
                rows.append(
                    dict(
                        recipe=recipe,
                        embedding=emb,
                        disk_bytes=disk,
                        payload_bytes=payload_bytes(tree),
                        files=files,
                        bits_per_param=round(8 * disk / n_params, 4),
                        payload_bits_per_param=round(8 * payload_bytes(tree) / n_params, 4),
                        group_sizes_used={str(k): v for k, v in sorted(groups.items())},
                        save_s=round(t_save, 3),
                        restore_s=round(t_restore, 3),
                    )
                )
    f32 = rows[0]["disk_bytes"]
    for r in rows:
        r["ratio_vs_f32"] = round(r["disk_bytes"] / f32, 4)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | embedding | on disk (MB) | vs f32 | bits/param on disk | payload (MB) "
        "| payload bits/param | files |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['embedding']} | {r['disk_bytes'] / 1e6:.1f} | "
            f"{r['ratio_vs_f32']:.3f} | {r['bits_per_param']:.2f} | "
            f"{r['payload_bytes'] / 1e6:.1f} | {r['payload_bits_per_param']:.2f} | {r['files']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", default=None, help=f"result JSON (default {RESULTS})")
    parser.add_argument("--workdir", default=None, help="where to write the temporary checkpoints")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else SMOLLM2_135M
    rows = measure(shapes, args.workdir)
    result = {
        "experiment": "checkpoint_sizes",
        "shapes": dataclasses.asdict(shapes),
        "n_params": count_params(shapes),
        "notes": (
            "Random weights. Kernels quantized with quantize_operand(w, spec, (0,)); norms f32. "
            "Embedding tied, either bf16 or quantized along d_model (quantize_operand(E, spec, "
            "(1,))). Group sizes that don't divide an axis drop to the largest power of two "
            "that does (576-wide inputs: g128 -> g64). disk_bytes: apparent size of all files "
            "in the Orbax checkpoint directory; payload_bytes: the arrays alone. Orbax compresses "
            "chunks with zstd (level 1), so disk is below payload: random N(0, 0.02) floats "
            "have redundant exponent bits and bell-shaped codes are not uniform; real weights "
            "may compress differently."
        ),
        "rows": rows,
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": platform.platform(),
        "jax_version": jax.__version__,
        "orbax_checkpoint_version": ocp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = pathlib.Path(args.out) if args.out else (None if args.tiny else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
