"""Hugging Face LLaMA folders (config.json + sharded safetensors) to the canonical layout."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxquant.models.safetensors_loader import load_hf_folder
from jaxquant.models.weights import canonical_shapes, load_model

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 40,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def _hf_tensors(c, rng):
    """HF name -> float32 array in HF's [out, in] layout."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    shapes["lm_head.weight"] = (v, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return {name: rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}


def write_hf_folder(folder, dtype=np.float32, **overrides):
    """Writes config.json, two safetensors shards and a tokenizer.json."""
    config = {**HF_CONFIG, **overrides}
    tensors = _hf_tensors(config, np.random.default_rng(0))
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    names = sorted(tensors)
    folder.mkdir(exist_ok=True)
    save_file({k: tensors[k] for k in names[::2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(
        {k: tensors[k] for k in names[1::2]}, str(folder / "model-00002-of-00002.safetensors")
    )
    (folder / "config.json").write_text(json.dumps(config))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.save(str(folder / "tokenizer.json"))
    return tensors


def test_config_and_layout(tmp_path):
    write_hf_folder(tmp_path / "m")
    weights, config = load_hf_folder(tmp_path / "m")
    assert config == {
        "vocab_size": 32,
        "d_model": 24,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 6,
        "ffn_dim": 40,
        "rope_theta": 10000.0,
        "rms_eps": 1e-6,
        "tie_embeddings": False,
        "rope_layout": "half",
        "max_seq_len": 128,
    }
    assert {k: v.shape for k, v in weights.items()} == canonical_shapes(config)
    assert all(v.dtype == np.float32 for v in weights.values())


def test_kernels_are_transposed(tmp_path):
    hf = write_hf_folder(tmp_path / "m")
    weights, _ = load_hf_folder(tmp_path / "m")
    np.testing.assert_array_equal(
        weights["layers.1.k"], hf["model.layers.1.self_attn.k_proj.weight"].T
    )
    np.testing.assert_array_equal(
        weights["layers.0.down"], hf["model.layers.0.mlp.down_proj.weight"].T
    )
    np.testing.assert_array_equal(weights["lm_head"], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(weights["embed"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(
        weights["layers.0.mlp_norm"], hf["model.layers.0.post_attention_layernorm.weight"]
    )


def test_bf16_becomes_float32(tmp_path):
    hf = write_hf_folder(tmp_path / "m", dtype=ml_dtypes.bfloat16)
    weights, _ = load_hf_folder(tmp_path / "m")
    assert weights["layers.0.q"].dtype == np.float32
    expected = hf["model.layers.0.self_attn.q_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(weights["layers.0.q"], expected)


def test_tied_drops_lm_head(tmp_path):
    write_hf_folder(tmp_path / "m", tie_word_embeddings=True)
    weights, config = load_hf_folder(tmp_path / "m")
    assert config["tie_embeddings"] and "lm_head" not in weights


def test_load_model_from_folder(tmp_path):
    write_hf_folder(tmp_path / "m")
    params, config, tok = load_model(tmp_path / "m")
    assert params["block_1"]["attn"]["v_proj"]["kernel"].shape == (24, 12)
    assert params["lm_head"]["kernel"].shape == (24, 32)
    assert config["rope_layout"] == "half"
    assert tok.decode(tok.encode("hi there")) == "hi there"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "bias"),
    ],
)
def test_unsupported_configs_raise(tmp_path, overrides, match):
    write_hf_folder(tmp_path / "m", **overrides)
    with pytest.raises(ValueError, match=match):
        load_hf_folder(tmp_path / "m")


def test_missing_files_raise(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(ValueError, match="safetensors"):
        load_hf_folder(tmp_path)


def test_unknown_tensor_raises(tmp_path):
    write_hf_folder(tmp_path / "m")
    save_file(
        {"model.layers.0.self_attn.q_proj.bias": np.zeros(24, np.float32)},
        str(tmp_path / "m" / "extra.safetensors"),
    )
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf_folder(tmp_path / "m")
