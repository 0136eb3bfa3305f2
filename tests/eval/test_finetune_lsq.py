"""`jaxquant finetune --method qat:QTYPE[:gN]:lsq` on the tiny model: the serving checkpoint is
convert() of the trained params and `eval --checkpoint` scores it; resume is bit for bit; with
--init gptq the LSQ model starts as GPTQ's model exactly."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import cli
from jaxquant.checkpoint import CheckpointManager
from jaxquant.core import QArray, QuantSpec, quantize
from jaxquant.core.dot_general import operand_spec
from jaxquant.eval import finetune as ft
from jaxquant.models import saved
from jaxquant.models.registry import load
from jaxquant.nn import Transformer, convert
from jaxquant.nn.linear import init_learned_scales
from jaxquant.nn.modes import LEARNED_SCALE
from jaxquant.train import TrainState

STEPS = 4
METHOD = "qat:int4:g32:lsq"
RUN = ("--model", "tiny", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
       "--checkpoint-every", "2", "--lr", "3e-3", "--warmup", "1", "--heldout", "none",
       "--max-tokens", "300", "--eval-seq-len", "64")


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("lsq")
    out, js = d / "run", d / "run.json"
    assert cli.main(["finetune", *RUN, "--method", METHOD, "--out", str(out),
                     "--json", str(js)]) == 0
    return out, json.loads(js.read_text())


def test_lsq_run_serves_convert_of_its_trained_params_and_eval_scores_it(run, tiny, tmp_path):
    out, r = run
    assert r["method"] == METHOD and len(r["loss_curve"]) == STEPS
    assert r["loss_curve"][-1] < r["loss_curve"][0]
    assert r["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # as plain QAT: codes + scales
    lsq_cfg = ft.parse_method(METHOD).train_config(tiny.cfg)
    start = init_learned_scales(Transformer(lsq_cfg), tiny.params)
    opt = ft.FinetuneConfig(method=ft.parse_method(METHOD), steps=STEPS,
                            warmup_steps=1).optimizer()
    target = jax.eval_shape(lambda: {"state": TrainState(jnp.zeros((), jnp.int32), start,
                                                         opt.init(start)),
                                     "losses": jnp.zeros(STEPS), "step": 0})
    with CheckpointManager(out / "train") as mngr:  # the scales are in the training state
        trained = mngr.restore(STEPS, target=target)["state"].params
    q0 = trained["block_0"]["attn"]["q_proj"]
    assert not np.array_equal(np.asarray(q0[LEARNED_SCALE]),
                              np.asarray(start["block_0"]["attn"]["q_proj"][LEARNED_SCALE]))
    serve_cfg, serve_params, side = saved.load_quantized(out)
    # An ordinary quantized model: the rules of plain QAT's (and RTN's) serving config.
    assert serve_cfg == ft.parse_method("qat:int4:g32").train_config(tiny.cfg)
    assert side["recipe"] == METHOD
    want = convert(Transformer(lsq_cfg), trained)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(serve_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(  # the learned scales are the QArrays' scales
        np.asarray(serve_params["block_0"]["attn"]["q_proj"]["kernel"].scale),
        np.asarray(q0[LEARNED_SCALE]))
    js = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(out), "--seq-len", "64", "--max-tokens", "300",
                     "--heldout", "none", "--json", str(js)]) == 0
    e = json.loads(js.read_text())
    assert e["perplexity"] == r["perplexity"] and e["tokens_scored"] == r["tokens_scored"]


def test_lsq_resume_reproduces_the_run(run, tmp_path):
    out, r = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "train" / str(STEPS))  # as if killed between steps 2 and 4
    js = tmp_path / "resumed.json"
    assert cli.main(["finetune", *RUN, "--method", METHOD, "--out", str(copy), "--resume",
                     "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["resumed_from"] == 2
    assert res["loss_curve"] == r["loss_curve"]  # bit for bit
    assert res["perplexity"] == r["perplexity"]


def test_lsq_keeps_a_given_grid_exactly(tiny):
    """What --init gptq does, on a grid that is not RTN's of the dequantized weights (GPTQ's
    scales come from the float weights): the LSQ params keep those codes and scales exactly."""
    lsq_cfg = ft.parse_method(METHOD).train_config(tiny.cfg)
    model = Transformer(lsq_cfg)
    rtn = convert(model, init_learned_scales(model, tiny.params))  # packed QArrays
    # Scales 1.25x RTN's, codes re-chosen on that grid (max |code| ~6): a grid that RTN of the
    # dequantized result would not pick, as GPTQ's isn't.
    spec = operand_spec(QuantSpec(qtype="int4", group_size=32, full_range=True), 2, (0,))
    given = jax.tree.map(lambda x: quantize(x.dequantize(), spec, scale=x.scale * 1.25)
                         if _is_q(x) else x, rtn, is_leaf=_is_q)
    start = init_learned_scales(model, ft._dequantized(given, keep_scales=True))
    q = start["block_0"]["attn"]["q_proj"]  # RTN of that kernel would be another grid
    assert not np.array_equal(np.asarray(quantize(q["kernel"], spec).scale),
                              np.asarray(q[LEARNED_SCALE]))
    _assert_same(convert(model, start), given)


def _is_q(x):
    return isinstance(x, QArray)


def _assert_same(got, want):
    for a, b in zip(jax.tree.leaves(got, is_leaf=_is_q), jax.tree.leaves(want, is_leaf=_is_q),
                    strict=True):
        if _is_q(a):
            np.testing.assert_array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
            np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # a GPTQ run: ~10 s of compiles on a loaded 2-core machine
def test_lsq_from_gptq_starts_as_gptqs_model(tiny, monkeypatch):
    """--init gptq: the kernels are GPTQ's dequantized weights and the scales GPTQ's, so the
    step-0 model converts to GPTQ's serving params bit for bit (codes and scales)."""
    seen = {}
    quantize = ft.tasks.quantize

    def spy(*args, **kwargs):
        seen["gptq"] = quantize(*args, **kwargs)
        return seen["gptq"]

    monkeypatch.setattr(ft.tasks, "quantize", spy)
    method = ft.parse_method(METHOD)
    config = ft.FinetuneConfig(method=method, steps=2, init="gptq", calib_windows=4,
                               calib_len=64)
    # 2 steps cannot move a code of GPTQ's grid, scales included: the user is told
    with pytest.warns(UserWarning, match="no code will change"):
        prepared = method.prepare(tiny, config, resume=False, dataset="ptb", progress=False)
    assert prepared.info["grid_reach"]["codes_can_move"] is False
    _, gptq_params, _ = seen["gptq"]
    _assert_same(convert(Transformer(prepared.train_cfg), prepared.params), gptq_params)


def test_lsq_on_a_format_it_cannot_learn_is_one_line(capsys, tmp_path):
    assert cli.main(["finetune", *RUN, "--method", "qat:nf4:g64:lsq",
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symmetric int grid" in err[0] and "nf4" in err[0], err
