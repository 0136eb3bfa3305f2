"""`jaxquant finetune` on the tiny model: QAT train -> convert -> serve, resume, eval, errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import cli
from jaxquant.checkpoint import CheckpointManager
from jaxquant.eval import finetune as ft
from jaxquant.models import saved
from jaxquant.models.registry import load
from jaxquant.nn import QuantMode, Transformer, TransformerConfig, convert
from jaxquant.ptq import parse_recipe, quantize_model
from jaxquant.train import TrainState

STEPS = 4
RUN = ("--model", "tiny", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
       "--checkpoint-every", "2", "--lr", "3e-3", "--warmup", "1", "--heldout", "none")
EV = ("--max-tokens", "300", "--heldout", "none")


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One QAT int4 g32 fine-tune of the tiny model through the command line."""
    d = tmp_path_factory.mktemp("ft")
    out, js = d / "run", d / "run.json"
    assert cli.main(["finetune", *RUN, "--method", "qat:int4:g32", "--out", str(out),
                     "--json", str(js), *EV, "--eval-seq-len", "64"]) == 0
    return out, json.loads(js.read_text())


def _train_state(tiny, out, step, method="qat:int4:g32"):
    """The float params of training checkpoint ``step``, restored into the live structure."""
    opt = ft.FinetuneConfig(method=ft.parse_method(method), steps=STEPS, warmup_steps=1).optimizer()
    target = jax.eval_shape(lambda: {
        "state": TrainState(jnp.zeros((), jnp.int32), tiny.params, opt.init(tiny.params)),
        "losses": jnp.zeros(STEPS), "step": 0})
    with CheckpointManager(out / "train") as mngr:
        return mngr.restore(step, target=target)["state"]


def test_cli_result_and_eval_checkpoint_scores_it(run, tmp_path):
    out, r = run
    assert r["method"] == "qat:int4:g32" and r["steps"] == STEPS
    assert r["tokens_seen"] == STEPS * 2 * 32 and len(r["loss_curve"]) == STEPS
    assert np.all(np.isfinite(r["loss_curve"])) and r["final_train_loss"] == r["loss_curve"][-1]
    assert r["loss_curve"][-1] < r["loss_curve"][0]  # lr 3e-3 on a random init: it learns
    assert r["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # int4 codes + an f32 scale / 32
    assert os.path.isfile(r["plot"]) and r["plot"].endswith(".png")
    assert sorted(p.name for p in out.iterdir()) == ["jaxquant.json", "params", "train"]
    assert {p.name for p in (out / "train").iterdir()} >= {"2", "4", "run.json"}
    js = tmp_path / "eval.json"  # the PTQ eval path scores the saved checkpoint identically
    assert cli.main(["eval", "--checkpoint", str(out), "--seq-len", "64", *EV,
                     "--json", str(js)]) == 0
    e = json.loads(js.read_text())
    assert e["model"] == "tiny" and e["recipe"] == "qat:int4:g32"
    assert e["perplexity"] == r["perplexity"] and e["tokens_scored"] == r["tokens_scored"]


def test_qat_train_convert_serve_equality(run, tiny):
    out, _ = run
    params = _train_state(tiny, out, STEPS).params
    method = ft.parse_method("qat:int4:g32")
    qat = Transformer(method.train_config(tiny.cfg))  # TRAIN mode: fake-quantized kernels
    serve_cfg, serve_params, _ = saved.load_quantized(out)
    assert serve_cfg == qat.cfg
    # The saved serving params are convert() of the trained params, bit for bit.
    for a, b in zip(jax.tree.leaves(convert(qat, params)), jax.tree.leaves(serve_params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 48)), jnp.int32)
    serve = Transformer(serve_cfg, mode=QuantMode.SERVE)
    train_logits = jax.jit(qat.apply)({"params": params}, tokens)
    serve_logits = jax.jit(serve.apply)({"params": serve_params}, tokens)
    float_logits = jax.jit(Transformer(tiny.cfg).apply)({"params": params}, tokens)
    quant_effect = float(jnp.max(jnp.abs(float_logits - train_logits)))
    assert quant_effect > 1e-3  # int4 g32 visibly moves the logits...
    # ...while TRAIN and SERVE dequantize the same codes: they differ by float rounding only
    # (a few ulps of the logits), far below the quantization's own effect.
    err = float(jnp.max(jnp.abs(train_logits - serve_logits)))
    bound = 64 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(train_logits)))
    assert err <= bound and err <= 1e-3 * quant_effect, (err, bound, quant_effect)


def test_qat_starts_on_rtns_grid(tiny):
    """QAT at step 0 serves exactly what RTN PTQ of the float model serves (per-layer groups)."""
    method = ft.parse_method("qat:int3:g48")  # 48 divides no 64 / 128-wide input: groups adapt
    qat = Transformer(method.train_config(tiny.cfg))
    _, rtn, _ = quantize_model(tiny.cfg, tiny.params, parse_recipe("rtn:int3:g48"),
                               progress=False)
    for a, b in zip(jax.tree.leaves(convert(qat, tiny.params)), jax.tree.leaves(rtn), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_an_earlier_checkpoint_reproduces_the_run(run, tmp_path):
    out, r = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "train" / str(STEPS))  # as if killed between steps 2 and 4
    js = tmp_path / "resumed.json"
    assert cli.main(["finetune", *RUN, "--method", "qat:int4:g32", "--out", str(copy),
                     "--resume", "--json", str(js), *EV, "--eval-seq-len", "64"]) == 0
    res = json.loads(js.read_text())
    assert res["resumed_from"] == 2
    assert res["loss_curve"] == r["loss_curve"]  # bit for bit
    assert res["perplexity"] == r["perplexity"]


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
def test_qlora_saves_adapters_and_serves_the_merged_model_requantized(tiny, tmp_path):
    from jaxquant.train.lora import init_lora, load_adapters, merge_adapters

    out, js = tmp_path / "q", tmp_path / "q.json"
    assert cli.main(["finetune", *RUN, "--method", "qlora:r4", "--out", str(out),
                     "--json", str(js), *EV, "--eval-seq-len", "64"]) == 0
    r = json.loads(js.read_text())
    assert r["method"] == "qlora:r4" and r["serving"]["requant"] == "rtn:nf4:g64"
    assert r["loss_curve"][-1] < r["loss_curve"][0]
    assert r["prepare"]["base_memory"]["quantized_bytes_per_param"] <= 0.56  # NF4 + DQ
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "jaxquant.json", "params",
                                                     "train"]
    adapters, lora = load_adapters(out / "adapters")
    assert lora.rank == 4 and lora.base == "nf4" and lora.double_quant
    # Serving = RTN (the base's NF4 grid, blocks of 64) of base + the saved adapters, exactly.
    base, _ = jax.jit(lambda p: init_lora(p, lora, jax.random.key(0)))(tiny.params)
    merged = jax.jit(lambda b, a: merge_adapters(b, a, lora))(base, adapters)
    _, want, _ = quantize_model(tiny.cfg, merged, parse_recipe("rtn:nf4:g64"), progress=False)
    _, got, side = saved.load_quantized(out)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert side["recipe"] == "qlora:r4 -> rtn:nf4:g64"


def test_float_finetune_requant_serves_the_ptq_of_the_trained_model(tiny, tmp_path):
    """``float --requant RECIPE``: the fine-tune-then-quantize baseline QAT is measured against;
    the served params are exactly RECIPE applied to the last training checkpoint's params."""
    out, js = tmp_path / "f", tmp_path / "f.json"
    assert cli.main(["finetune", *RUN, "--method", "float", "--requant", "rtn:int4:g32",
                     "--out", str(out), "--json", str(js), *EV, "--eval-seq-len", "64"]) == 0
    r = json.loads(js.read_text())
    assert r["serving"]["requant"] == "rtn:int4:g32"
    assert r["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    trained = _train_state(tiny, out, STEPS, method="float").params
    assert not np.array_equal(np.asarray(jax.tree.leaves(trained)[0]),
                              np.asarray(jax.tree.leaves(tiny.params)[0]))  # it trained
    _, want, _ = quantize_model(tiny.cfg, trained, parse_recipe("rtn:int4:g32"), progress=False)
    _, got, side = saved.load_quantized(out)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert side["recipe"] == "float -> rtn:int4:g32"


def _fails(capsys, *argv, match):
    assert cli.main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxquant finetune: error: "), err
    assert __import__("re").search(match, err[0]), err[0]
    return err[0]


def test_errors_are_one_line_and_say_what_to_do(run, tmp_path, capsys):
    out, _ = run
    new = str(tmp_path / "new")
    _fails(capsys, *RUN, "--method", "sgd", "--out", new, match="unknown method 'sgd'.*qat:")
    _fails(capsys, *RUN, "--method", "qat:int4:g0", "--out", new, match="group size.*>= 1")
    _fails(capsys, *RUN, "--method", "qat:int4:gx", "--out", new, match="gSIZE")
    _fails(capsys, *RUN, "--method", "qat:int9", "--out", new, match="unknown qtype 'int9'")
    _fails(capsys, *RUN, "--method", "qat:w8a8", "--init", "gptq", "--out", new,
           match="weight-only")
    _fails(capsys, *RUN, "--method", "qlora:r0", "--out", new, match="rank must be an int >= 1")
    _fails(capsys, *RUN, "--method", "lora:16", "--out", new, match=r"lora\[:rRANK\]")
    _fails(capsys, *RUN, "--method", "qat:int4", "--requant", "gptq", "--out", new,
           match="--requant applies to float / lora / qlora")
    for method in ("lora", "float"):
        _fails(capsys, *RUN, "--method", method, "--requant", "rtn", "--out", new,
               match="needs a grid.*rtn:int4:g128")
    _fails(capsys, *RUN, "--method", "float", "--requant", "fp32", "--out", new,
           match="not a quantizing recipe")
    _fails(capsys, *RUN, "--method", "float", "--out", new, "--resume",
           match=rf"--resume: {new} holds no training checkpoint.*without --resume")
    _fails(capsys, *RUN, "--method", "qat:int4:g32", "--out", str(out),
           match=rf"{out} already exists.*--resume")
    _fails(capsys, *RUN, "--method", "float", "--out", str(out), "--resume",
           match=rf"{out}.*another run \(method: 'qat:int4:g32' there vs 'float'")
    assert not os.path.exists(new)


def test_method_strings_round_trip():
    for text in ("float", "qat:int4:g128", "qat:int3:g128", "qat:int2:g64", "qat:int8",
                 "qat:nf4:g64", "qat:w8a8", "lora:r16", "qlora:r8"):
        assert ft.parse_method(text).name == text
        assert ft.parse_method(ft.parse_method(text).name) == ft.parse_method(text)
    assert ft.parse_method("QAT:INT4:G128") == ft.QATMethod(qtype="int4", group_size=128)
    assert ft.parse_method("qlora") == ft.QLoRAMethod(rank=16) != ft.LoRAMethod(rank=16)
    qlora = ft.FinetuneConfig(method=ft.parse_method("qlora"), steps=2, requant="gptq")
    assert qlora.method.requant_recipe(qlora).name == "gptq:int4:g64"
    # --requant none serves QLoRA's merged model float: the function it trained.
    for text in ft.NO_REQUANT:
        asis = ft.FinetuneConfig(method=ft.parse_method("qlora"), steps=2, requant=text)
        asis.method.check(asis)
        assert asis.method.requant_recipe(asis) is None
    with pytest.raises(ValueError, match="lacks a qtype"):
        ft.parse_method("qat")
    with pytest.raises(ValueError, match="one group size"):
        ft.parse_method("qat:int4:g32:g64")
    with pytest.raises(ValueError, match="steps"):
        ft.FinetuneConfig(method=ft.parse_method("float"), steps=0)
    with pytest.raises(ValueError, match="--warmup"):
        ft.FinetuneConfig(method=ft.parse_method("float"), steps=4, warmup_steps=4)


def test_serving_save_keeps_the_training_run_and_a_failed_save_damages_nothing(tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "run"
    (out / "train" / "2").mkdir(parents=True)
    (out / "train" / "2" / "data").write_bytes(b"step 2")
    cfg = TransformerConfig.tiny()

    def save(v):
        return saved.save_quantized(out, cfg, {"w": jnp.full((3,), v)}, {"recipe": "float"},
                                    force=True, keep_others=True)

    save(1.0)
    assert (out / "train" / "2" / "data").read_bytes() == b"step 2"
    real = os.rename

    def crash(src, dst):  # killed at the swap, after the new folder is complete
        if os.path.basename(src) == "run":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        save(2.0)
    monkeypatch.setattr(os, "rename", real)
    assert float(saved.load_quantized(out)[1]["w"][0]) == 1.0  # the old pair, intact
    assert (out / "train" / "2" / "data").read_bytes() == b"step 2"
    save(3.0)
    assert float(saved.load_quantized(out)[1]["w"][0]) == 3.0
    assert (out / "train" / "2" / "data").read_bytes() == b"step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # leftovers cleaned up
    with pytest.raises(FileExistsError, match="--force"):
        saved.save_quantized(out, cfg, {"w": jnp.ones(3)}, {}, keep_others=True)
