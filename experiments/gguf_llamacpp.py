"""jaxquant's GGUF export checked by llama.cpp itself (issue 17), through llama-cpp-python.

On SmolLM2-135M and the PTB-test budget of the demo (the first 8192 tokens, four 2048-token
windows, every next token scored, no BOS added on either side):

(a) per exported recipe (``rtn:q8_0``, ``rtn:q4_0``, ``rtn:q4_1``, ``gptq:q4_0``): llama.cpp's
    next-token log-probabilities on the exported file against jaxquant's serving model on the
    same weights (max and mean |difference|), and both perplexities;
(b) llama.cpp's perplexity of the original SmolLM2 GGUF against jaxquant's fp32 figure;
(c) jaxquant GPTQ exported as Q4_0 against llama.cpp's own quantizer (``llama_model_quantize``)
    making Q4_0 (and Q4_1, Q8_0) from the same float weights (an all-F32 export of jaxquant's
    float model), with the token embedding kept as Q8_0 on both sides, so the files are the
    same size;
(d) llama.cpp's decode speed (batch 1, ``--threads`` threads) for each file next to the F32 one.

    nice -n 5 python experiments/gguf_llamacpp.py --gptq-checkpoint ckpt/   # ~20 min on 2 cores
    nice -n 5 python experiments/gguf_llamacpp.py --model tiny-source.gguf --recipes rtn:q4_0 \
        --max-tokens 256 --seq-len 64 --no-speed                               # a smoke test

Needs the optional extra ``llama`` (``pip install -e ".[llama]"``: llama-cpp-python, which
compiles llama.cpp; see RESULTS.md for the build time). Writes
``experiments/results/gguf_llamacpp.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.eval import tasks
from jaxquant.eval.perplexity import make_windows
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_export import ExportOptions, write_gguf
from jaxquant.models.gguf_loader import gguf_tensor_types
from jaxquant.models.registry import load
from jaxquant.models.saved import load_quantized
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def log_softmax_targets(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits)[t, targets[t]]`` in float64. ``logits [T, V]``, ``targets [T]``."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1))
    return x[np.arange(len(targets)), targets] - lse


def llama_logprobs(path: Path, windows: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """llama.cpp's log-probs of each window's next tokens: ``[w, L - 1]``, and the seconds."""
    from llama_cpp import Llama

    n = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    out, t0 = [], time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        out.append(log_softmax_targets(np.asarray(llm.scores[: n - 1]), w[1:]))
    seconds = time.perf_counter() - t0
    del llm
    return np.stack(out), seconds


def jaxquant_logprobs(cfg, params, windows: np.ndarray) -> np.ndarray:
    """jaxquant's log-probs (SERVE mode when ``cfg`` quantizes): ``[w, L - 1]``."""
    model = Transformer(cfg, mode=QuantMode.SERVE if cfg.quant_rules else QuantMode.TRAIN)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    out = []
    for w in windows:
        logits = np.asarray(apply(params, jnp.asarray(w[None], jnp.int32))[0], np.float32)
        out.append(log_softmax_targets(logits[:-1], w[1:]))
    return np.stack(out)


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    """llama.cpp's ``llama_model_quantize``: ``src`` -> ``dst`` as ``qtype`` (token embedding
    kept Q8_0, as jaxquant's export of the same model writes it)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")


def decode_speed(path: Path, threads: int, prompt: list[int], n_new: int) -> float:
    """llama.cpp's greedy decode speed, tokens/s, batch 1 (after a prompt and one warm-up)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + n_new + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.reset()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([tok])  # warm-up step
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return n_new / (time.perf_counter() - t0)


def _ppl(logp: np.ndarray) -> float:
    return float(np.exp(-logp.mean()))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> dict:
    import llama_cpp

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = load(args.model)
    source = resolve_model(args.model)
    tokens = tasks.tokens_for(model, "ptb", "test")
    windows, _ = make_windows(tokens, args.seq_len, None, args.max_tokens)
    prompt = [int(t) for t in tokens[: args.prompt_len]]
    env = {**tasks.environment(), "commit": _commit(), "load_average": os.getloadavg(),
           "llama_cpp_python": llama_cpp.__version__, "threads": args.threads}
    result = {"model": args.model, "source": str(source), "tokens_scored": int(windows.size -
              len(windows)), "windows": [int(x) for x in windows.shape], "environment": env,
              "rows": []}
    if args.append and args.json and Path(args.json).is_file():  # add rows to an earlier run
        result["rows"] = json.loads(Path(args.json).read_text())["rows"]
    done = {r["name"] for r in result["rows"]}

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))

    def row(name, path, jq_logp=None, **extra):
        if name in done:
            return None
        ll, sec = llama_logprobs(path, windows, args.threads)
        r = {"name": name, "file": path.name, "bytes": path.stat().st_size,
             "types": _type_counts(path), "llama_ppl": _ppl(ll),
             "llama_prefill_tok_s": windows.size / sec, **extra}
        if jq_logp is not None:
            d = np.abs(ll - jq_logp)
            r |= {"jaxquant_ppl": _ppl(jq_logp), "ppl_rel_diff": _ppl(ll) / _ppl(jq_logp) - 1,
                  "logprob_max_abs_diff": float(d.max()), "logprob_mean_abs_diff": float(d.mean())}
        if args.speed:
            r["decode_tok_s"] = decode_speed(path, args.threads, prompt, args.decode_tokens)
        print(json.dumps(r, default=str))
        result["rows"].append(r)
        save()
        return r

    # (b) the original GGUF, and jaxquant's float model exported as all-F32.
    f32_file = work / "jaxquant-f32.gguf"
    float_rows = ["original GGUF (llama.cpp) vs jaxquant fp32"]
    if args.f32_row == "full":
        float_rows.append("jaxquant fp32 exported F32")
    fp32 = None
    if not set(float_rows) <= done:
        fp32 = jaxquant_logprobs(model.cfg, model.params, windows)
    row(float_rows[0], source, fp32, kind="original")
    write_gguf(f32_file, model.cfg, model.params, source, ExportOptions(float_type="f32"))
    if args.f32_row == "full":
        row(float_rows[1], f32_file, fp32, kind="f32")
    elif args.f32_row == "speed" and "jaxquant fp32 exported F32 (speed)" not in done:
        result["rows"].append({
            "name": "jaxquant fp32 exported F32 (speed)", "file": f32_file.name, "kind": "f32",
            "bytes": f32_file.stat().st_size, "types": _type_counts(f32_file),
            "decode_tok_s": decode_speed(f32_file, args.threads, prompt, args.decode_tokens)})
        save()
    # (a) jaxquant recipes, exported.
    recipes = list(args.recipes.split(",")) if args.recipes else []
    if args.gptq_checkpoint:
        recipes.append(args.gptq_checkpoint)
    for recipe in recipes:
        if f"jaxquant {recipe}" in done:
            continue
        t0 = time.perf_counter()
        if Path(recipe).is_dir():
            cfg, params, sidecar = load_quantized(recipe)
            name, info = sidecar["recipe"], sidecar.get("info", {})
        else:
            cfg, params, info = tasks.quantize(model, parse_recipe(recipe),
                                               calib_windows=args.calib_windows, progress=False)
            name = recipe
        path = work / f"jaxquant-{name.replace(':', '-')}.gguf"
        if f"jaxquant {name}" in done:
            continue
        write_gguf(path, cfg, params, source)
        logp = jaxquant_logprobs(cfg, params, windows)
        row(f"jaxquant {name}", path, logp, kind="jaxquant", recipe=name,
            calibration=info.get("calibration"), seconds=time.perf_counter() - t0)
    # (c) llama.cpp's own quantizer from the same float weights.
    for qtype in args.llama_types.split(",") if args.llama_types else []:
        path = work / f"llama-quantize-{qtype}.gguf"
        llama_quantize(f32_file, path, qtype, args.threads)
        row(f"llama.cpp llama_model_quantize {qtype}", path, kind="llama.cpp", qtype=qtype)
    save()
    return result


def _type_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in gguf_tensor_types(path).values():
        counts[t] = counts.get(t, 0) + 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="rtn:q8_0,rtn:q4_0,rtn:q4_1")
    p.add_argument("--gptq-checkpoint", help="a `jaxquant ptq --qtype q4_0 --out` directory")
    p.add_argument("--llama-types", default=",".join(LLAMA_TYPES))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--f32-row", choices=["full", "speed", "none"], default="full",
                   help="evaluate the all-F32 export (it is written either way): perplexity "
                        "and speed, speed alone, or not at all")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--work", default="/tmp/jaxquant-gguf", help="where the .gguf files go")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --json and add the missing ones")
    p.add_argument("--json", default=str(ROOT / "experiments/results/gguf_llamacpp.json"))
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
