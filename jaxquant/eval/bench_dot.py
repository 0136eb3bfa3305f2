"""Speed of the quantized ``dot_general`` against float and raw int8 ``lax.dot_general``.

One process, one device, every op jitted, warm-up excluded, the median of ``repeats`` calls
(>= 7 for real numbers). Calls are interleaved round-robin over the ops, so a burst of load
from elsewhere hits all of them alike instead of skewing one.

Ops (``y = x [M, K] @ w [K, N]``):

* ``f32``, ``bf16``: ``lax.dot_general`` in that dtype;
* ``int8_raw``: ``lax.dot_general`` on int8 codes with ``preferred_element_type=int32`` (the
  ceiling for W8A8: no quantization, no rescale);
* ``jq_w8a8``: dynamic quantization of both operands *included* in the time;
* ``jq_wo_int8``, ``jq_wo_int4_g128``: weights pre-quantized as a ``QArray`` (serving: int4 is
  packed two per byte), float activations;
* ``jq_fp8``: e4m3 dynamic quantization of both operands included;
* ``jq_w4a8_g128``: int4 g128 weights pre-quantized (packed), dynamic int8 activations
  included: the integer product (:mod:`jaxquant.core.w4a8` for few rows on XLA:CPU);
* with ``peers=True``: ``aqt_w8a8`` and ``qwix_w8a8``, the peers' dynamic W8A8 (if importable).

Speedups are ratios of medians against ``f32`` and ``bf16``; ``rel_error`` is
``||y - y_f32||_F / ||y_f32||_F``. ``jaxquant bench`` and ``experiments/bench_dot_general.py``
both run :func:`run`.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

import jaxquant as jq
from jaxquant.core.dot_config import w4a8
from jaxquant.eval.provenance import head_commit, worktree_dirty

DN = (((1,), (0,)), ((), ()))
FULL_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (8, 4096, 4096))
QUICK_SHAPES = ((256, 256, 256), (8, 512, 512))


# --- ops ----------------------------------------------------------------------------------------
# Each builder takes float32 (x, w) and returns (jitted fn, args, postprocess) where
# postprocess(fn(*args)) is the float32 product estimate used for the error.


def _float_op(dtype):
    def build(x, w):
        f = jax.jit(lambda a, b: lax.dot_general(a, b, DN))
        return f, (x.astype(dtype), w.astype(dtype)), lambda y: y.astype(jnp.float32)

    return build


def _int8_raw(x, w):
    qx = jq.core.quantize_operand(x, jq.w8a8().lhs, (1,))
    qw = jq.core.quantize_operand(w, jq.w8a8().rhs, (0,))
    f = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.int32))
    sx, sw = qx.scale, qw.scale
    return f, (qx.qvalue, qw.qvalue), lambda y: y.astype(jnp.float32) * sx * sw


def _jq_dynamic(cfg):
    def build(x, w):
        f = jax.jit(lambda a, b: jq.dot_general(a, b, DN, config=cfg))
        return f, (x, w), lambda y: y

    return build


def _jq_serving(cfg):
    def build(x, w):
        wq = jax.block_until_ready(jq.core.quantize_operand(w, cfg.rhs, (0,)))
        f = jax.jit(lambda a, b: jq.dot_general(a, b, DN, config=cfg))
        return f, (x, wq), lambda y: y

    return build


OPS: dict[str, Callable] = {
    "f32": _float_op(jnp.float32),
    "bf16": _float_op(jnp.bfloat16),
    "int8_raw": _int8_raw,
    "jq_w8a8": _jq_dynamic(jq.w8a8()),
    "jq_wo_int8": _jq_serving(jq.weight_only("int8")),
    "jq_wo_int4_g128": _jq_serving(jq.weight_only("int4", group_size=128)),
    "jq_fp8": _jq_dynamic(jq.fp8()),
    "jq_w4a8_g128": _jq_serving(w4a8()),
}


def peer_ops() -> tuple[dict[str, Callable], dict[str, dict]]:
    """AQT and Qwix dynamic W8A8 builders, for whichever is importable, and their status."""
    ops, status = {}, {}
    try:
        import aqt.jax.v2.config as aqt_config

        aqt_dg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)  # forward: dynamic int8

        def aqt_w8a8(x, w):
            return jax.jit(lambda a, b: aqt_dg(a, b, DN)), (x, w), lambda y: y

        ops["aqt_w8a8"] = aqt_w8a8
        status["aqtp"] = {"available": True, "version": version("aqtp")}
    except Exception as e:  # any import failure means "not available"
        status["aqtp"] = {"available": False, "error": f"{type(e).__name__}: {e}"}
    try:
        import qwix

        def qwix_dg(a, b):
            qa = qwix.quantize(a, jnp.int8, channelwise_axes=[0])
            qb = qwix.quantize(b, jnp.int8, channelwise_axes=[1])
            return qwix.dot_general(qa, qb, DN)

        def qwix_w8a8(x, w):
            return jax.jit(qwix_dg), (x, w), lambda y: y

        ops["qwix_w8a8"] = qwix_w8a8
        status["qwix"] = {"available": True, "version": version("qwix")}
    except Exception as e:
        status["qwix"] = {"available": False, "error": f"{type(e).__name__}: {e}"}
    return ops, status


# --- timing -------------------------------------------------------------------------------------


def _call_ms(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def time_ops(built: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin timing: ``repeats`` rounds, each calling every op once."""
    for fn, args, _ in built.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(repeats):
        for name, (fn, args, _) in built.items():
            times[name].append(_call_ms(fn, args))
    return times


def _rel_error(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def run(
    shapes: Sequence[tuple[int, int, int]] = FULL_SHAPES,
    repeats: int = 7,
    *,
    warmup: int = 2,
    peers: bool = False,
    ops: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Times every op on every ``(M, K, N)`` shape.

    Args:
      shapes: ``(M, K, N)`` triples.
      repeats: timed calls per op (the median is reported; use >= 7 for real numbers).
      warmup: untimed calls per op first (compilation included).
      peers: also time AQT and Qwix W8A8 if importable (their status is recorded either way).
      ops: subset of op names (default: all).
      seed: data seed.
      progress: print a line per shape.

    Returns:
      A JSON-ready dict: environment, and per shape per op the median and all times (ms),
      speedups vs ``f32`` and ``bf16`` and the relative error vs ``f32``.
    """
    builders = dict(OPS)
    peer_status: dict = {"requested": peers}
    if peers:
        extra, status = peer_ops()
        builders.update(extra)
        peer_status.update(status)
    if ops is not None:
        unknown = set(ops) - set(builders)
        if unknown:
            raise ValueError(f"Unknown ops {sorted(unknown)}; choose from {sorted(builders)}.")
        builders = {k: v for k, v in builders.items() if k in ops or k in ("f32", "bf16")}
    result = {
        "benchmark": "dot_general",
        **environment(),
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
        "load_average_before": loadavg(),
        "peers": peer_status,
        "shapes": [],
    }
    rng = np.random.default_rng(seed)
    bar = tqdm(shapes, desc="dot_general", unit="shape", disable=not progress)
    for m, k, n in bar:
        bar.set_postfix_str(f"{m}x{k}x{n}")
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))
        built = {name: b(x, w) for name, b in builders.items()}
        times = time_ops(built, repeats, warmup)
        ref = np.asarray(built["f32"][0](*built["f32"][1]), np.float64)
        med = {name: statistics.median(t) for name, t in times.items()}
        entry = {"m": m, "k": k, "n": n, "results": {}}
        for name, (fn, args, post) in built.items():
            entry["results"][name] = {
                "median_ms": med[name],
                "times_ms": times[name],
                "speedup_vs_f32": med["f32"] / med[name],
                "speedup_vs_bf16": med["bf16"] / med[name],
                "rel_error": _rel_error(post(fn(*args)), ref),
            }
        result["shapes"].append(entry)
        if progress:
            bar.write(f"  {m}x{k}x{n}: " + ", ".join(f"{nm} {t:.1f} ms" for nm, t in med.items()))
        del built, x, w
    result["load_average_after"] = loadavg()
    return result


def environment() -> dict:
    """Device, versions, date and load average, recorded with every benchmark."""
    dev = jax.devices()[0]
    return {
        "device": dev.platform,
        "device_kind": dev.device_kind,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "jaxquant_version": jq.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
    }


def git_commit() -> dict:
    """``{"commit": HEAD's sha or None, "dirty": whether tracked files differ from it}`` of
    the checkout jaxquant runs from (None outside a git checkout)."""
    return {"commit": head_commit(), "dirty": worktree_dirty()}


def _jaxlib_version():
    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return None


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def markdown_table(result: dict) -> str:
    lines = [
        "| M x K x N | op | median ms | vs f32 | vs bf16 | rel. error vs f32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in result["shapes"]:
        shape = f"{s['m']}x{s['k']}x{s['n']}"
        for name, r in s["results"].items():
            lines.append(
                f"| {shape} | {name} | {r['median_ms']:.2f} | {r['speedup_vs_f32']:.2f}x | "
                f"{r['speedup_vs_bf16']:.2f}x | {r['rel_error']:.2e} |"
            )
    return "\n".join(lines)
