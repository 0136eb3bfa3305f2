"""Fuzzing the readers of untrusted bytes (issue 13): random bytes, truncations and bit flips fed
to the GGUF loader, the safetensors loader and checkpoint restore, random strings to the recipe
parser. Every outcome is a result or a ValueError (the jaxquant error family,
``jaxquant.errors.JaxquantError`` included) with a message, never another exception type. A
checkpoint that restores despite the damage must restore bit-identically (the checksums)."""

import itertools
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from jaxquant import checkpoint
from jaxquant.models.gguf_loader import gguf_metadata, load_gguf
from jaxquant.models.safetensors_loader import load_hf_folder
from jaxquant.ptq.recipe import parse_recipe
from tests.models.test_gguf_loader import write_tiny_gguf

_count = itertools.count()


def damage(data: bytes, kind: str, where: float, bits: list[tuple[float, int]], junk: bytes):
    """``kind``: "truncate" at ``where``, "flip" the ``bits`` (position fraction, bit), "junk"."""
    if kind == "truncate":
        return data[: int(len(data) * where)]
    if kind == "junk":
        return junk
    b = bytearray(data)
    for pos, bit in bits:
        b[min(int(len(b) * pos), len(b) - 1)] ^= 1 << bit
    return bytes(b)


DAMAGE = dict(
    kind=st.sampled_from(["truncate", "flip", "junk"]),
    where=st.floats(0, 1),
    bits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=4),
    junk=st.binary(max_size=4096),
)


def assert_clear(e: BaseException):
    assert isinstance(e, ValueError), f"{type(e).__name__} escaped: {e}"
    assert str(e).strip(), f"{type(e).__name__} without a message"


# --- GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@settings(max_examples=60)
@given(**DAMAGE)
def test_gguf_loader_fuzz(gguf_bytes, tmp_path_factory, kind, where, bits, junk):
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(_count)}.gguf"
    path.write_bytes(damage(gguf_bytes, kind, where, bits, junk))
    try:
        load_gguf(path)
        gguf_metadata(path, "tokenizer.")
    except Exception as e:  # noqa: BLE001 - the property under test
        assert_clear(e)
        if "not a readable GGUF" in str(e):
            assert str(path) in str(e)
    finally:
        path.unlink()


# --- safetensors ---------------------------------------------------------------------------------

_HF_CONFIG = {
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "intermediate_size": 12,
    "vocab_size": 10,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (10, 8),
        "model.norm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 12),
    }
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, str(path))
    return path.read_bytes()


@settings(max_examples=60)
@given(**DAMAGE, config_damage=st.sampled_from([None, "truncate", "drop_key"]))
def test_safetensors_loader_fuzz(
    shard_bytes, tmp_path_factory, kind, where, bits, junk, config_damage
):
    folder = tmp_path_factory.getbasetemp() / f"hf-{next(_count)}"
    folder.mkdir()
    config = json.dumps(_HF_CONFIG)
    if config_damage == "truncate":
        config = config[: int(len(config) * where)]
    elif config_damage == "drop_key":
        config = json.dumps({k: v for k, v in _HF_CONFIG.items() if k != "hidden_size"})
    (folder / "config.json").write_text(config)
    (folder / "model.safetensors").write_bytes(damage(shard_bytes, kind, where, bits, junk))
    try:
        load_hf_folder(folder)
    except Exception as e:  # noqa: BLE001
        assert_clear(e)
    finally:
        shutil.rmtree(folder)


# --- checkpoint restore --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    tree = {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "b": np.arange(5, dtype=np.int32),
        "meta": {"step": 3, "name": "x"},
    }
    path = checkpoint.save(tmp_path_factory.mktemp("ck") / "c", tree)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    return path, tree, files


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=40)
@given(data=st.data(), **DAMAGE)
def test_checkpoint_restore_fuzz(saved_checkpoint, tmp_path_factory, data, kind, where, bits, junk):
    src, tree, files = saved_checkpoint
    victim = data.draw(st.sampled_from(files), label="file")
    path = tmp_path_factory.getbasetemp() / f"ck-{next(_count)}"
    shutil.copytree(src, path)
    f = path / victim
    f.write_bytes(damage(f.read_bytes(), kind, where, bits, junk))
    try:
        restored = checkpoint.restore(path)
    except Exception as e:  # noqa: BLE001
        assert_clear(e)
    else:  # survived: then nothing may have changed
        assert restored["meta"] == tree["meta"]
        for k in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(restored[k]), tree[k])
    finally:
        shutil.rmtree(path)


# --- recipe parser -------------------------------------------------------------------------------

_PARTS = [
    "rtn",
    "gptq",
    "awq",
    "awq+gptq",
    "w8a8",
    "smoothquant",
    "fp32",
    "int4",
    "int3",
    "int8",
    "nf4",
    "fp8_e4m3",
    "g128",
    "g0",
    "g-1",
    "g7",
    "gx",
    "asym",
    "mse",
    "",
    ":",
]


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=40), st.lists(st.sampled_from(_PARTS), max_size=6).map(":".join)))
def test_recipe_parser_fuzz(text):
    try:
        parse_recipe(text)
    except Exception as e:  # noqa: BLE001
        assert_clear(e)


def test_fuzz_damage_helper_really_damages():
    data = bytes(range(200))
    assert damage(data, "truncate", 0.5, [], b"") == data[:100]
    assert damage(data, "flip", 0, [(0.0, 0)], b"") != data
