"""``jaxquant ptq | eval --mesh`` on the tiny model and 8 fake devices: the same numbers as one
device (API.md, section "Scale"), and one-line errors for bad scale flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxquant import checkpoint, cli

MESH = ("--mesh", "data=2,fsdp=2,tensor=2")
EV = ("--model", "tiny", "--max-tokens", "1024", "--seq-len", "64", "--batch-size", "4",
      "--heldout", "none")
PTQ = ("--model", "tiny", "--method", "gptq", "--qtype", "int4", "--group-size", "32",
       "--calib-windows", "8", "--calib-len", "64")


def _run(tmp_path, name, *argv):
    out = tmp_path / f"{name}.json"
    assert cli.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_sharded_eval_equals_one_device(tmp_path):
    one = _run(tmp_path, "one", "eval", *EV, "--quant", "rtn:int4:g32")
    eight = _run(tmp_path, "eight", "eval", *EV, "--quant", "rtn:int4:g32", *MESH)
    assert eight["scale"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert eight["tokens_scored"] == one["tokens_scored"] > 0
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


@pytest.fixture(scope="module")
def gptq_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq")
    assert cli.main(["ptq", *PTQ, "--out", str(d / "one")]) == 0
    assert cli.main(["ptq", *PTQ, *MESH, "--out", str(d / "eight")]) == 0
    return d


@pytest.mark.slow  # two GPTQ runs of the tiny model: about a minute of CPU
def test_sharded_gptq_equals_one_device(gptq_pair):
    """Hessians summed over the 4 batch shards of the calibration windows, and each layer's
    sweep split by output columns over the mesh (``gptq.column_axes``), instead of on one
    device: the same scales to float precision and the same codes up to the rare one a
    reassociated sum tips over a rounding boundary. GPTQ feeds that rounding error forward to
    the later inputs of the same column, so a flip can move a later code of its column too
    (two steps at most); a wrong calibration set changes 20-35% of the codes instead."""
    from tests.scale.test_multiprocess_cli import assert_same_quantized

    one, eight = (checkpoint.restore(gptq_pair / n / "params") for n in ("one", "eight"))
    # Block 0's first site sees the same float inputs in both runs: only reassociation.
    first = lambda p: {k: p["block_0"]["attn"][k] for k in ("q_proj", "k_proj", "v_proj")}  # noqa: E731
    assert_same_quantized(first(one), first(eight), max_code_frac=1e-3, max_steps=1)
    assert_same_quantized(one, eight, max_code_frac=0.05, max_steps=3)


@pytest.mark.slow
def test_sharded_eval_of_a_checkpoint(gptq_pair, tmp_path):
    ck = str(gptq_pair / "one")
    one = _run(tmp_path, "one", "eval", *EV[2:], "--checkpoint", ck)
    eight = _run(tmp_path, "eight", "eval", *EV[2:], "--checkpoint", ck, *MESH)
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--mesh", "data=3"), "has 3 devices, but there are 8"),
        (("--mesh", "pipeline=8"), "unknown axis 'pipeline'"),
        (("--coordinator", "localhost:1234"), "go together"),
        (("--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"),
         "HOST:PORT"),
        (("--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"), "0..1"),
    ],
)
def test_bad_scale_flags_are_one_line_errors(flags, match, capsys):
    assert cli.main(["eval", *EV, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and match in err[-1], err


FT = ("--model", "tiny", "--method", "qat:int4:g32", "--steps", "6", "--batch-size", "4",
      "--seq-len", "32", "--lr", "3e-3", "--warmup", "1", "--max-tokens", "512",
      "--eval-seq-len", "64", "--checkpoint-every", "3")


@pytest.mark.slow  # two fine-tuning runs (compile, 6 steps, convert, eval): ~40 s of CPU
def test_sharded_finetune_equals_one_device(tmp_path):
    """QAT on data=2,fsdp=2,tensor=2: the loss curve, the saved serving model's perplexity and
    its codes equal the one-device run's; the training state is saved sharded and restored."""
    one = _run(tmp_path, "one", "finetune", *FT, "--out", str(tmp_path / "one"))
    eight = _run(tmp_path, "eight", "finetune", *FT, *MESH, "--out", str(tmp_path / "eight"))
    assert eight["scale"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(eight["loss_curve"], one["loss_curve"], rtol=1e-5)
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)
    a = checkpoint.restore(tmp_path / "one" / "params")
    b = checkpoint.restore(tmp_path / "eight" / "params")
    qa = a["block_1"]["mlp"]["down_proj"]["kernel"]
    qb = b["block_1"]["mlp"]["down_proj"]["kernel"]
    assert np.mean(np.asarray(qa.codes()) != np.asarray(qb.codes())) < 1e-3
