"""Storage and round-trip error of every core format, on Gaussian and heavy-tailed weights.

Two tables:

* **storage**: ``QArray.nbytes`` (packed codes + float32 scales and zero points) of a
  ``[rows, cols]`` weight (default 4096 x 4096), per output channel and in groups of 128 along
  the input axis, against the same tensor in float32 and bfloat16;
* **error**: the round trip ``dequantize(quantize(w))`` of each format (int8 .. int2 symmetric
  and asymmetric, fp8 e4m3 / e5m2, nf4, fp4 e2m1), per channel and in groups of 128 and 64, on a
  standard Gaussian and a Student-t (df = 3) tensor: relative RMS error ``||w_hat - w|| / ||w||``
  and the largest absolute error.

Usage::

  python experiments/core_roundtrip.py                  # writes experiments/results/core_roundtrip.json
  python experiments/core_roundtrip.py --rows 256 --cols 64 --out /tmp/x.json   # seconds
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

RESULTS = pathlib.Path(__file__).parent / "results" / "core_roundtrip.json"

# (label, qtype, symmetric)
FORMATS = [
    ("int8", "int8", True),
    ("int8 asym", "int8", False),
    ("int4", "int4", True),
    ("int4 asym", "int4", False),
    ("int3", "int3", True),
    ("int3 asym", "int3", False),
    ("int2", "int2", True),
    ("int2 asym", "int2", False),
    ("fp8_e4m3", "fp8_e4m3", True),
    ("fp8_e5m2", "fp8_e5m2", True),
    ("nf4", "nf4", True),
    ("fp4_e2m1", "fp4_e2m1", True),
]
GRANULARITIES = [("per-channel", None), ("g128", 128), ("g64", 64)]
STORAGE_FORMATS = [
    ("int8", "int8", True),
    ("int4", "int4", True),
    ("int4 asym", "int4", False),
    ("int3", "int3", True),
    ("int2", "int2", True),
    ("nf4", "nf4", True),
]
STORAGE_GRANULARITIES = [("per-channel", None), ("g128", 128)]
DISTRIBUTIONS = ("gaussian", "student_t3")


def weight_spec(qtype: str, symmetric: bool, group_size: int | None) -> jq.QuantSpec:
    """A ``[in, out]`` kernel: one scale per output column, optionally per group of inputs."""
    return jq.QuantSpec(qtype=qtype, symmetric=symmetric, channel_axes=(1,), group_size=group_size)


def make_weight(dist: str, rows: int, cols: int, seed: int) -> jax.Array:
    key = jax.random.key(seed)
    if dist == "gaussian":
        return jax.random.normal(key, (rows, cols), jnp.float32)
    if dist == "student_t3":
        return jax.random.t(key, 3.0, (rows, cols), jnp.float32)
    raise ValueError(f"unknown distribution {dist!r}; use one of {DISTRIBUTIONS}")


@functools.partial(jax.jit, static_argnums=1)
def _round_trip_errors(ws, spec):
    """Relative RMS and max absolute error of the round trip, for a stack of weights."""

    def one(w):
        d = jq.dequantize(jq.quantize(w, spec)) - w
        return jnp.sqrt(jnp.sum(d**2) / jnp.sum(w**2)), jnp.max(jnp.abs(d))

    return jax.lax.map(one, ws)  # one weight in memory at a time


def storage_rows(rows: int, cols: int, granularities, formats) -> list[dict]:
    # Storage depends on shapes and dtypes only: trace, don't compute.
    w = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    f32, bf16 = rows * cols * 4, rows * cols * 2
    out = [
        dict(
            format="f32",
            granularity="-",
            bytes=f32,
            bits_per_weight=32.0,
            ratio_vs_f32=1.0,
            ratio_vs_bf16=2.0,
        ),
        dict(
            format="bf16",
            granularity="-",
            bytes=bf16,
            bits_per_weight=16.0,
            ratio_vs_f32=0.5,
            ratio_vs_bf16=1.0,
        ),
    ]
    for label, qtype, sym in formats:
        for gname, g in granularities:
            if g is not None and rows % g:
                continue
            q = jax.eval_shape(functools.partial(jq.quantize, spec=weight_spec(qtype, sym, g)), w)
            nbytes = q.nbytes
            out.append(
                dict(
                    format=label,
                    granularity=gname,
                    bytes=nbytes,
                    bits_per_weight=8 * nbytes / (rows * cols),
                    ratio_vs_f32=nbytes / f32,
                    ratio_vs_bf16=nbytes / bf16,
                )
            )
    return out


def error_rows(rows: int, cols: int, seed: int, granularities, formats) -> list[dict]:
    out = []
    ws = jnp.stack([make_weight(d, rows, cols, seed) for d in DISTRIBUTIONS])
    absmax = [float(a) for a in jnp.max(jnp.abs(ws), axis=(1, 2))]
    for label, qtype, sym in formats:
        for gname, g in granularities:
            if g is not None and rows % g:
                continue
            rel_rms, max_err = _round_trip_errors(ws, weight_spec(qtype, sym, g))
            row = dict(format=label, granularity=gname)
            for i, dist in enumerate(DISTRIBUTIONS):
                row[f"{dist}_rel_rms"] = float(rel_rms[i])
                row[f"{dist}_max_abs_err"] = float(max_err[i])
                row[f"{dist}_absmax"] = absmax[i]
            out.append(row)
    return out


def run(
    rows: int = 4096,
    cols: int = 4096,
    seed: int = 0,
    *,
    granularities=None,
    formats=None,
    out: str | pathlib.Path | None = None,
) -> dict:
    """Measures storage and round-trip error; writes JSON to ``out`` when given."""
    granularities = GRANULARITIES if granularities is None else granularities
    formats = FORMATS if formats is None else formats
    storage_fmts = [f for f in STORAGE_FORMATS if f in formats] or formats
    storage_grans = [g for g in STORAGE_GRANULARITIES if g in granularities] or granularities
    dev = jax.devices()[0]
    result = dict(
        experiment="core_roundtrip",
        shape=[rows, cols],
        seed=seed,
        layout="[in, out] kernel, channel_axes=(1,), groups along axis 0; float32 scales",
        device=f"{dev.platform}: {dev.device_kind}",
        jax_version=jax.__version__,
        numpy_version=np.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        storage=storage_rows(rows, cols, storage_grans, storage_fmts),
        errors=error_rows(rows, cols, seed, granularities, formats),
    )
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict) -> str:
    rows, cols = result["shape"]
    lines = [
        f"Storage of a {rows} x {cols} weight (codes packed, float32 scales/zero points):",
        "",
        "| format | granularity | bytes | bits/weight | vs f32 | vs bf16 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["storage"]:
        lines.append(
            f"| {r['format']} | {r['granularity']} | {r['bytes']:,} | {r['bits_per_weight']:.3f} "
            f"| {r['ratio_vs_f32']:.4f} | {r['ratio_vs_bf16']:.4f} |"
        )
    lines += [
        "",
        f"Round trip on a {rows} x {cols} weight (relative RMS error; max absolute error):",
        "",
        "| format | granularity | Gaussian rel RMS | Gaussian max err | Student-t3 rel RMS "
        "| Student-t3 max err |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["errors"]:
        lines.append(
            f"| {r['format']} | {r['granularity']} | {r['gaussian_rel_rms']:.4g} "
            f"| {r['gaussian_max_abs_err']:.4g} | {r['student_t3_rel_rms']:.4g} "
            f"| {r['student_t3_max_abs_err']:.4g} |"
        )
    lines += ["", f"device: {result['device']}; jax {result['jax_version']}; {result['date']}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="JSON result path")
    args = p.parse_args(argv)
    result = run(args.rows, args.cols, args.seed, out=args.out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
