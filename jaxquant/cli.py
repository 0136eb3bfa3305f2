"""The ``jaxquant`` command line. Thin: it parses arguments and calls the library.

Commands: ``demo`` (the main job), ``eval``, ``ptq``, ``finetune``, ``generate``, ``bench``. Each takes
``--json PATH``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


def _recipe(text: str | None):
    from jaxquant.ptq.recipe import parse_recipe

    return parse_recipe(text) if text else None


def _ptq_methods() -> list[str]:
    """The registry's methods that quantize (everything but ``fp32``)."""
    from jaxquant.ptq.registry import ALGORITHMS

    return [name for name, algo in ALGORITHMS.items() if algo.quantizes]


def _quantizes_activations(method: str) -> bool:
    """W8A8-style methods (int8 activations too) take ``--qtype int8`` whatever was given."""
    from jaxquant.ptq.registry import ALGORITHMS

    return ALGORITHMS[method].activations


def _heldout(args) -> tuple[str, ...]:
    """The ``--heldout`` data sets (``none``: no held-out scoring)."""
    from jaxquant import data

    text = (args.heldout or "none").strip().lower()
    names = () if text == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in data.DATASETS]
    if unknown:
        raise ValueError(f"--heldout {args.heldout}: unknown data set(s) {unknown}; use "
                         f"{', '.join(data.DATASETS)} (comma-separated) or none.")
    return names


def _cmd_eval(args) -> int:
    from jaxquant.eval import scale as sc
    from jaxquant.eval import tasks
    from jaxquant.models.registry import load

    scale = sc.setup(args)  # --mesh / --coordinator: before anything else touches JAX
    recipe = _recipe(args.quant)  # a bad recipe fails before the model loads
    name = args.model
    if args.checkpoint:
        from jaxquant.models.saved import recorded_model

        if args.quant:
            raise ValueError("--quant and --checkpoint exclude each other: the checkpoint is "
                             "already quantized (its recipe is in its jaxquant.json).")
        name = name or recorded_model(args.checkpoint)  # the model the checkpoint was made from
    model = load(name or DEFAULT_MODEL)
    if args.checkpoint:
        from jaxquant.eval.tasks import evaluate_checkpoint

        if scale.mesh is not None:  # the same job, params and windows on the mesh
            evaluate_checkpoint = functools.partial(sc.evaluate_checkpoint, scale=scale)
        result = evaluate_checkpoint(model, args.checkpoint, dataset=args.data, split=args.split,
                                     heldout=_heldout(args), seq_len=args.seq_len,
                                     stride=args.stride,
                                     max_tokens=args.max_tokens, batch_size=args.batch_size)
    elif scale.mesh is not None:
        result = sc.evaluate(
            model, scale, dataset=args.data, split=args.split, recipe=recipe,
            seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
            batch_size=args.batch_size, calib_data=args.calib_data,
            calib_windows=args.calib_windows, calib_len=args.calib_len, seed=args.seed,
            heldout=_heldout(args))
    else:
        result = tasks.evaluate(
            model, dataset=args.data, split=args.split, recipe=recipe,
            seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
            batch_size=args.batch_size, calib_data=args.calib_data,
            calib_windows=args.calib_windows, calib_len=args.calib_len, seed=args.seed,
            heldout=_heldout(args))
    held = result.get("heldout", {})
    print("\n| model | data | recipe | bits/weight | size (MB) | tokens | perplexity "
          + "".join(f"| {n}:test " for n in held) + "|\n"
          + "|---" * (7 + len(held)) + "|\n"
          f"| {result['model']} | {result['dataset']}:{result['split']} | {result['recipe']} | "
          f"{result['bits_per_weight']:.2f} | {result['model_bytes'] / 1e6:.1f} | "
          f"{result['tokens_scored']} | {result['perplexity']:.3f} "
          + "".join(f"| {v:.3f} " for v in held.values()) + "|")
    scale.write_json(args.json, result)  # process 0 only
    return 0


def _cmd_ptq(args) -> int:
    from jaxquant.eval import scale as sc
    from jaxquant.eval import tasks
    from jaxquant.models.registry import load
    from jaxquant.models.saved import save_quantized
    from jaxquant.ptq.gptq import GPTQConfig
    from jaxquant.ptq.pipeline import PTQOptions, layer_group_sizes
    from jaxquant.ptq.recipe import GGUF_GRIDS, Recipe

    scale = sc.setup(args)  # --mesh / --coordinator: before anything else touches JAX
    if args.qtype in GGUF_GRIDS:  # a llama.cpp block grid (q4_0...) fixes groups and symmetry
        if args.group_size or args.asym:
            raise ValueError(f"--qtype {args.qtype} fixes groups of 32 and the zero point; "
                             "drop --group-size and --asym.")
        recipe = Recipe(method=args.method, grid=args.qtype, mse_clip=args.mse)
    else:
        recipe = Recipe(method=args.method, qtype=args.qtype, group_size=args.group_size,
                        symmetric=not args.asym, mse_clip=args.mse)
    options = PTQOptions(
        gptq=GPTQConfig(damp=args.damp, act_order=not args.no_act_order),
        true_sequential=not args.no_true_sequential)
    if args.out:  # refuse before minutes of quantizing, not after
        from jaxquant.models.saved import check_writable

        check_writable(args.out, force=args.force)
    model = load(args.model)
    cfg, params, info = sc.quantize(model, recipe, scale, dataset=args.data,
                                    calib_data=args.calib_data,
                                    calib_windows=args.calib_windows,
                                    calib_len=args.calib_len, seed=args.seed, options=options)
    result = {"model": args.model, **info, **tasks.weight_stats(params),
              "environment": tasks.environment()}
    if scale.mesh is not None:
        result["scale"] = scale.describe()
    if (groups := layer_group_sizes(model.cfg, recipe)) is not None:
        result["group_sizes"] = groups  # what each block linear used (recipe.name: what was asked)
        if set(groups.values()) != {recipe.group_size}:
            print(f"note: --group-size {recipe.group_size} does not divide every layer's input "
                  f"width; used the largest divisor below it: {groups}")
    if args.out:
        save_quantized(args.out, cfg, params, result, force=args.force)
        result["out"] = args.out
        print(f"saved {recipe.name} checkpoint to {args.out}")
    print(f"{recipe.name}: {result['bits_per_weight']:.2f} bits/weight, "
          f"{result['model_bytes'] / 1e6:.1f} MB, {result['quantize_seconds']:.1f} s")
    scale.write_json(args.json, result)  # process 0 only
    return 0


def _cmd_finetune(args) -> int:
    from jaxquant.eval import finetune as ft
    from jaxquant.eval import scale as sc
    from jaxquant.models.registry import load

    scale = sc.setup(args)  # --mesh / --coordinator: before anything else touches JAX
    config = ft.FinetuneConfig(  # a bad method or setting fails before the model loads
        method=sc.sharded_method(ft.parse_method(args.method), scale), steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every, seed=args.seed,
        init=args.init, calib_windows=args.calib_windows, calib_len=args.calib_len,
        calib_data=args.calib_data, requant=args.requant)
    ft.check_out(args.out, resume=args.resume)
    heldout = _heldout(args)
    model = load(args.model)
    score = (None if scale.mesh is None  # the saved model scored on the mesh too
             else functools.partial(sc.evaluate_checkpoint, scale=scale,
                                    batch_size=scale.batch_shards))
    result = ft.finetune(model, config, args.out, dataset=args.data, resume=args.resume,
                         heldout=heldout, eval_seq_len=args.eval_seq_len,
                         eval_max_tokens=args.max_tokens, progress=scale.writer,
                         evaluate_checkpoint=score)
    png = ft.write_plot(result, args.json)
    held = result["heldout"]
    print("\n| model | method | steps | tokens seen | final train loss | bits/weight "
          "| size (MB) | perplexity " + "".join(f"| {n}:test " for n in held) + "|\n"
          + "|---" * (8 + len(held)) + "|\n"
          f"| {result['model']} | {result['method']} | {result['steps']} | "
          f"{result['tokens_seen']} | {result['final_train_loss']:.4f} | "
          f"{result['bits_per_weight']:.2f} | {result['model_bytes'] / 1e6:.1f} | "
          f"{result['perplexity']:.3f} " + "".join(f"| {v:.3f} " for v in held.values()) + "|")
    print(f"saved the serving checkpoint to {result['out']} (score it with `jaxquant eval "
          f"--checkpoint {result['out']}`); loss curve: {png}")
    if scale.mesh is not None:
        result["scale"] = scale.describe()
    scale.write_json(args.json, result)  # process 0 only
    return 0


def _cmd_generate(args) -> int:
    from jaxquant.eval.generation import generate_text
    from jaxquant.models.registry import load

    model = load(args.model)
    if not args.chat:
        print(args.prompt, end="", flush=True)

    def show(piece):
        print(piece, end="", flush=True)

    result = generate_text(model, args.prompt, recipe=_recipe(args.quant),
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           kv_cache_qtype=args.kv_cache, seed=args.seed, chat=args.chat,
                           on_text=show)
    tps = result["decode_tokens_per_s"]
    print(f"\n\n[{len(result['tokens'])} tokens, stopped by {result['stop']}; time to first "
          f"token {result['time_to_first_token_s'] * 1e3:.0f} ms; decode "
          f"{'n/a' if tps is None else f'{tps:.1f}'} tok/s; compile "
          f"{result['compile_seconds']:.1f} s (not in the timings)]", file=sys.stderr)
    _write_json(args.json, result)
    return 0


def _cmd_demo(args) -> int:
    from jaxquant.data import default_calibration
    from jaxquant.eval import tasks
    from jaxquant.eval.plots import plot_ppl_vs_size
    from jaxquant.models.registry import load

    budget = tasks.DemoBudget(eval_tokens=None if args.full else args.max_tokens,
                              calib_windows=args.calib_windows, calib_len=args.calib_len)
    print(f"jaxquant demo: {args.model} on PTB. Calibration: {budget.calib_windows} x "
          f"{budget.calib_len} tokens of {args.calib_data or default_calibration('ptb')} (train "
          f"splits; seed {args.seed}); evaluation: "
          f"{'the full PTB test split' if budget.eval_tokens is None else f'the first {budget.eval_tokens} PTB-test tokens'} "
          f"in {budget.seq_len}-token windows. --full evaluates the whole split.")
    model = load(args.model)
    recipes = args.recipes.split(",") if args.recipes else tasks.DEMO_RECIPES
    result = tasks.demo_rows(model, recipes, budget, seed=args.seed, calib_data=args.calib_data,
                             heldout=_heldout(args))
    table = tasks.markdown_table(result["rows"])
    print("\n" + table)
    if (best := result.get("recommended")) is not None:
        print(f"\nrecommended at <= 5 bits/weight: {best['recipe']} "
              f"({best['bits_per_weight']:.2f} bits/weight; ranked by {best['by']}: "
              f"{best['score']:.3f})")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or str(out / "demo.json")
    _write_json(json_path, result)
    png = plot_ppl_vs_size(result["rows"], out / "demo.png", title=f"{args.model} on PTB test")
    print(f"wrote {png}")
    return 0


def _cmd_bench(args) -> int:
    from jaxquant.eval import bench

    shapes = None
    if args.dot_shapes:
        shapes = [tuple(int(v) for v in t.lower().split("x")) for t in args.dot_shapes.split(",")]
        if any(len(t) != 3 for t in shapes):
            raise ValueError(f"--dot-shapes takes MxKxN,... (e.g. 2048x2048x2048); got "
                             f"{args.dot_shapes!r}.")
    decode = {}
    if args.recipes:
        decode["recipes"] = tuple(args.recipes.split(","))
    if args.batches:
        decode["batches"] = tuple(int(b) for b in args.batches.split(","))
    if args.kv_caches:
        decode["kv_caches"] = tuple(None if k == "float" else k for k in args.kv_caches.split(","))
    if args.decode_steps:
        decode["decode_steps"] = args.decode_steps
        decode["rounds"] = min(8, args.decode_steps)
    result = bench.run(quick=args.quick, dot_shapes=shapes, decode_kwargs=decode or None,
                       llama=not args.no_llama)
    print("\n" + bench.markdown(result))
    _write_json(args.json, result)
    return 0


def _cmd_export(args) -> int:
    from jaxquant.models.gguf_export import ExportOptions, export_gguf

    result = export_gguf(args.checkpoint, args.out, source=args.model,
                         options=ExportOptions(float_type=args.float_type))
    types = ", ".join(f"{n} {t}" for t, n in sorted(result["tensor_types"].items()))
    print(f"wrote {result['path']}: {result['file_type']} ({types}), "
          f"{result['bytes'] / 1e6:.1f} MB, recipe {result['recipe']}, metadata from "
          f"{result['source']}")
    _write_json(args.json, result)
    return 0


def _scale_args(p) -> None:
    """--mesh, --coordinator, --num-processes, --process-id (jaxquant.eval.scale)."""
    from jaxquant.eval.scale import add_scale_args

    add_scale_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, *, data=True, calib=True):
        p.add_argument("--model", default="smollm2-135m",
                       help="smollm2-135m | tiny | path to .gguf | HF folder")
        if data:
            p.add_argument("--data", default="ptb",
                           help="ptb | shakespeare | kjv | path to a text file")
        if calib:
            p.add_argument("--calib-data", help="calibration set: ptb | a text file | a mix "
                           "such as ptb+kjv (train splits only; default: ptb+shakespeare+kjv "
                           "for a named --data, the file itself for a text file)")
            p.add_argument("--calib-windows", type=int, default=128)
            p.add_argument("--calib-len", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", help="write the result as JSON to this path")

    demo = sub.add_parser("demo", help="the main job: PTQ recipes on SmolLM2-135M, PTB perplexity")
    common(demo, data=False, calib=False)
    demo.add_argument("--full", action="store_true", help="evaluate the full PTB test split")
    demo.add_argument("--calib-data", help="calibration set (default ptb+shakespeare+kjv, the "
                      "train splits; see `eval --help`)")
    demo.add_argument("--heldout", default="shakespeare,kjv",
                      help="held-out texts scored next to PTB test (comma-separated, or none)")
    demo.add_argument("--max-tokens", type=int, default=8192, help="PTB-test tokens per recipe")
    demo.add_argument("--calib-windows", type=int, default=32)
    demo.add_argument("--calib-len", type=int, default=512)
    demo.add_argument("--recipes", help="comma-separated recipes (default: the demo table)")
    demo.add_argument("--out-dir", default="jaxquant-demo", help="where the JSON and plot go")
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="perplexity of a (quantized) model")
    common(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--quant", help="recipe, e.g. rtn:int4:g128, gptq:int3:g128, w8a8")
    ev.add_argument("--checkpoint", help="evaluate a checkpoint written by `jaxquant ptq --out`")
    ev.add_argument("--max-tokens", type=int)
    ev.add_argument("--seq-len", type=int, default=2048)
    ev.add_argument("--stride", type=int)
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--heldout", default="shakespeare,kjv",
                    help="held-out texts also scored, on their test split (comma list, or none)")
    # --model defaults to the checkpoint's own model with --checkpoint, else DEFAULT_MODEL.
    _scale_args(ev)
    ev.set_defaults(func=_cmd_eval, model=None)

    ptq = sub.add_parser("ptq", help="quantize a model and write an Orbax checkpoint")
    common(ptq)
    ptq.add_argument("--method", required=True, choices=_ptq_methods(),
                     help="a PTQ algorithm of jaxquant.ptq.registry")
    ptq.add_argument("--qtype", default="int4",
                     help="int2..int8, nf4, fp8..., or a llama.cpp grid q4_0 | q4_1 | q8_0")
    ptq.add_argument("--group-size", type=int)
    ptq.add_argument("--asym", action="store_true", help="zero points (asymmetric)")
    ptq.add_argument("--mse", action="store_true", help="MSE clip search for the scales")
    ptq.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (x mean diag H)")
    ptq.add_argument("--no-act-order", action="store_true",
                     help="GPTQ: columns in natural order (default: by decreasing diag H)")
    ptq.add_argument("--no-true-sequential", action="store_true",
                     help="GPTQ: calibrate all of a block's linears on float inputs at once")
    ptq.add_argument("--out", help="checkpoint directory")
    ptq.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    _scale_args(ptq)
    ptq.set_defaults(func=_cmd_ptq)

    ft = sub.add_parser("finetune", help="fine-tune (float, QAT, (Q)LoRA) and save a serving "
                                         "checkpoint that `eval --checkpoint` scores")
    common(ft)
    ft.add_argument("--method", required=True,
                    help="float | qat:QTYPE[:gSIZE][:lsq] (qat:int4:g128, qat:int2:g64; "
                         ":lsq learns the weight scales, LSQ) | qat:w8a8 | lora[:rRANK] | "
                         "qlora[:rRANK]")
    ft.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ft.add_argument("--out", required=True, help="run directory: training checkpoints and the "
                                                 "final serving checkpoint")
    ft.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its latest checkpoint (bit for bit)")
    ft.add_argument("--batch-size", type=int, default=8, help="windows per step")
    ft.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    ft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    ft.add_argument("--warmup", type=int, help="warmup steps (default min(100, steps/10))")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--checkpoint-every", type=int, default=100)
    ft.add_argument("--init", choices=["rtn", "gptq"], default="rtn",
                    help="qat: start from the float weights (rtn) or GPTQ's weights "
                         "(with :lsq also GPTQ's scales)")
    ft.add_argument("--requant", help="float/lora/qlora: PTQ of the trained (merged) model for "
                                      "serving: a recipe such as gptq:int4:g128 (fine-tune, then "
                                      "quantize) | qlora: rtn (rtn:nf4:g64, its default) or gptq "
                                      "(gptq:int4:g64) | none (serve it float; float's and "
                                      "lora's default)")
    ft.add_argument("--max-tokens", type=int, help="score only this many test tokens")
    ft.add_argument("--eval-seq-len", type=int, default=2048)
    ft.add_argument("--heldout", default="none",
                    help="held-out texts also scored (comma list, e.g. shakespeare,kjv; none)")
    _scale_args(ft)
    ft.set_defaults(func=_cmd_finetune)

    gen = sub.add_parser("generate", help="generate text with the KV cache")
    common(gen, data=False, calib=False)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--quant", help="recipe applied before generating (rtn/w8a8 need no data)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--kv-cache", choices=["float", "int8", "int4"], default="float")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user turn with the GGUF's chat template")
    gen.set_defaults(func=_cmd_generate)

    ex = sub.add_parser("export", help="write a checkpoint as a llama.cpp GGUF file "
                                       "(Q4_0 / Q4_1 / Q8_0 blocks, tokenizer included)")
    ex.add_argument("--checkpoint", required=True, help="directory of `jaxquant ptq --out`")
    ex.add_argument("--format", default="gguf", choices=["gguf"])
    ex.add_argument("--out", required=True, help="the .gguf file to write")
    ex.add_argument("--model", help="source model for tokenizer and metadata "
                                    "(default: the checkpoint's --model)")
    ex.add_argument("--float-type", choices=["auto", "f32", "f16"], default="auto",
                    help="float matrices (embedding, untied head): auto = the smallest of "
                         "Q8_0/F16/F32 that holds them exactly; f16 rounds")
    ex.add_argument("--json", help="write the result as JSON to this path")
    ex.set_defaults(func=_cmd_export)

    be = sub.add_parser("bench", help="dot_general and decode speed, and memory, vs float")
    be.add_argument("--quick", action="store_true",
                    help="small dot shapes, 32-token prefill and 32 decode steps (a few minutes)")
    be.add_argument("--json", help="write the result as JSON to this path "
                                   "(e.g. experiments/results/bench-cpu.json)")
    be.add_argument("--dot-shapes", help="dot_general shapes MxKxN,... (default: the preset's)")
    be.add_argument("--recipes", help="decode recipes, comma-separated (default: "
                                      "f32,bf16,int8_wo,int4_g128_wo,w8a8,w4a8_g128; also "
                                      "w3a8_g128, w2a8_g64)")
    be.add_argument("--batches", help="decode batch sizes, comma-separated (default 1,8)")
    be.add_argument("--decode-steps", type=int, help="timed decode steps per row")
    be.add_argument("--kv-caches", help="decode KV caches, comma-separated (default float,int8)")
    be.add_argument("--no-llama", action="store_true",
                    help="skip the llama.cpp rows (run when llama_cpp is importable, on CPU)")
    be.set_defaults(func=_cmd_bench)
    return parser


def _check_args(args) -> None:
    """Flag values a user can get wrong, checked before any work is done."""
    if getattr(args, "json", None) and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a directory; pass a file path, e.g. "
                         f"{Path(args.json) / 'result.json'}.")
    for flag in ("batch_size", "max_tokens", "calib_windows", "calib_len"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not temperature >= 0:  # also NaN
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}.")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line. Every error a user can cause (bad flags, a missing, corrupt or
    mismatched file, a failed download: ``ValueError``, which includes
    :class:`jaxquant.errors.JaxquantError`, and ``OSError``) is one line on stderr and exit
    status 2; a traceback means a bug in jaxquant."""
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "ptq" and _quantizes_activations(args.method):
        args.qtype = "int8"
    try:
        _check_args(args)
        return args.func(args)
    except (ValueError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"jaxquant {args.command}: error: {lines[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
