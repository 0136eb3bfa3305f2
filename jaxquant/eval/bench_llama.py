"""The llama.cpp yardstick for ``jaxquant bench``: decode tokens/s of the same model's GGUF.

When ``llama_cpp`` (the ``llama-cpp-python`` package, extra ``jaxquant[llama]``) is importable,
SmolLM2-135M's GGUF is decoded at batch 1 with ``threads`` threads, in llama.cpp's Q8_0, Q4_0 and
Q4_1 formats. The cached GGUF is Q4_1; the Q8_0 and Q4_0 files are made from it once with
``llama_model_quantize`` (requantized: they carry the Q4_1 rounding too, which changes their
values, not their speed) and cached next to it.

Timing follows :mod:`jaxquant.eval.bench_decode`: ``prompt_len`` tokens are evaluated first,
then ``decode_steps`` single-token ``eval`` calls are timed one by one (one warm-up step
excluded), and tokens/s is one over the median step time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

# llama.cpp's ``llama_ftype`` values of the formats compared.
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3}


def available() -> dict:
    """``{"available": bool, "version" | "error": str}`` for ``llama_cpp``."""
    try:
        import llama_cpp
    except Exception as e:  # any import failure (missing, wrong CPU build) means "not available"
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    return {"available": True, "version": getattr(llama_cpp, "__version__", None)}


def quantized_gguf(src: Path, kind: str, threads: int = 2) -> Path:
    """``src`` in llama.cpp format ``kind`` (``FTYPES``), made once next to it and reused."""
    import llama_cpp

    if kind not in FTYPES:
        raise ValueError(f"Unknown llama.cpp format {kind!r}; choose from {sorted(FTYPES)}.")
    if kind in src.name.lower():
        return src
    out = src.with_name(f"{src.stem}.requant-{kind}.gguf")
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    params.allow_requantize = True
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize to {kind} failed with code {rc}.")
    tmp.replace(out)
    return out


def decode_speed(path: Path, *, threads: int = 2, prompt_len: int = 32,
                 decode_steps: int = 64) -> dict:
    """Median single-token decode step of the GGUF at ``path``, batch 1."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_len + decode_steps + 8,
                          n_threads=threads, n_threads_batch=threads, n_batch=prompt_len,
                          verbose=False)
    tok = llm.tokenize(b" the", add_bos=False)[0]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval([tok] * prompt_len)
    prefill_s = time.perf_counter() - t0
    llm.eval([tok])  # warm-up step
    steps = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t0)
    del llm
    step = statistics.median(steps)
    return {"median_step_ms": step * 1e3, "step_ms": [t * 1e3 for t in steps],
            "tokens_per_s": 1.0 / step, "prefill_tokens_per_s": prompt_len / prefill_s}


def run(model: str = "smollm2-135m", *, kinds=tuple(FTYPES), threads: int = 2,
        prompt_len: int = 32, decode_steps: int = 64) -> dict:
    """llama.cpp rows for ``model``'s GGUF in each format of ``kinds``, or why there are none.

    Returns:
      ``{"status": available(), "threads", "rows": [{"format", "file", "file_bytes",
      "tokens_per_s", ...}]}``; rows are empty when ``llama_cpp`` isn't importable.
    """
    status = available()
    result = {"status": status, "threads": threads, "batch": 1, "prompt_len": prompt_len,
              "decode_steps": decode_steps, "rows": []}
    if not status["available"]:
        return result
    from jaxquant.models.fetch import resolve_model

    src = Path(resolve_model(model))
    result["source_gguf"] = src.name
    for kind in kinds:
        try:
            path = quantized_gguf(src, kind, threads)
            row = {"format": kind, "file": path.name, "file_bytes": path.stat().st_size,
                   **decode_speed(path, threads=threads, prompt_len=prompt_len,
                                  decode_steps=decode_steps)}
        except Exception as e:  # a format that fails is reported, the others still run
            row = {"format": kind, "error": f"{type(e).__name__}: {e}"}
        result["rows"].append(row)
    return result


def markdown_table(result: dict) -> str:
    if not result["rows"]:
        return f"llama.cpp: not measured ({result['status'].get('error', 'not importable')})"
    lines = ["| llama.cpp format | file MB | tok/s B=1 | threads |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['format']} | - | error: {r['error']} | {result['threads']} |")
            continue
        lines.append(f"| {r['format']} | {r['file_bytes'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{result['threads']} |")
    return "\n".join(lines)
