"""GGUF export: Q4_0 / Q4_1 / Q8_0 blocks from jaxquant's own codes, read back by our loader and
checked against the `gguf` package's reference block code (a tiny LLaMA GGUF written here)."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from tokenizers import pre_tokenizers

from jaxquant.cli import main
from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.spec import QuantSpec
from jaxquant.models.gguf_export import (
    ExportOptions,
    block_format,
    export_gguf,
    qarray_blocks,
    write_gguf,
)
from jaxquant.models.gguf_loader import gguf_metadata, gguf_tensor_types, load_gguf
from jaxquant.models.registry import load
from jaxquant.models.saved import save_quantized
from jaxquant.models.weights import to_params
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.pipeline import quantize_model
from jaxquant.ptq.recipe import GGUF_GRIDS, Recipe, parse_recipe

Q = gguf.GGMLQuantizationType
GRID_TYPE = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}
TINY = dict(vocab=256, d=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128)


def write_source_gguf(path, seed=0):
    """A tiny float LLaMA GGUF with a byte-level BPE tokenizer (256 tokens, no merges)."""
    t = TINY
    q, kv, d, f = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"], t["d"], t["ffn"]
    shapes = {"token_embd.weight": (t["vocab"], d), "output_norm.weight": (d,)}
    for i in range(t["layers"]):
        shapes |= {f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (q, d),
                   f"blk.{i}.attn_k.weight": (kv, d), f"blk.{i}.attn_v.weight": (kv, d),
                   f"blk.{i}.attn_output.weight": (d, q), f"blk.{i}.ffn_norm.weight": (d,),
                   f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                   f"blk.{i}.ffn_down.weight": (d, f)}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-test")
    w.add_block_count(t["layers"])
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(t["head_dim"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    w.add_token_list(tokens[:-1] + ["ĠĠ"])  # one merge (GGUF keeps no empty merge list)
    w.add_token_types([1] * t["vocab"])
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(1)
    for name, shape in shapes.items():
        scale = 1.0 if len(shape) == 1 else 0.05
        w.add_tensor(name, (1.0 + scale * rng.normal(size=shape) if len(shape) == 1
                            else scale * rng.normal(size=shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    write_source_gguf(path)
    return path


@pytest.fixture(scope="module")
def model(source):
    return load(str(source))


def _kernels(params):
    """Canonical name -> leaf of the serving params (kernels and float tensors)."""
    out = {"embed": params["embed"]["embedding"], "final_norm": params["final_norm"]["scale"]}
    names = {"attn_norm": ("attn_norm", "scale"), "q": ("attn", "q_proj", "kernel"),
             "k": ("attn", "k_proj", "kernel"), "v": ("attn", "v_proj", "kernel"),
             "o": ("attn", "o_proj", "kernel"), "mlp_norm": ("mlp_norm", "scale"),
             "gate": ("mlp", "gate_proj", "kernel"), "up": ("mlp", "up_proj", "kernel"),
             "down": ("mlp", "down_proj", "kernel")}
    for i in range(TINY["layers"]):
        for short, path in names.items():
            node = params[f"block_{i}"]
            for k in path:
                node = node[k]
            out[f"layers.{i}.{short}"] = node
    return out


def _q41_tol(q: QArray) -> np.ndarray:
    """Float32 rounding of (c - z) * d vs q * d + m: a few ulps of the block's magnitude."""
    s = np.abs(np.asarray(q.scale, np.float32))
    mag = s * (16 + np.abs(np.asarray(q.zero_point, np.float32)))
    return np.repeat(8 * np.finfo(np.float32).eps * mag, q.group_size, axis=0)


@pytest.mark.parametrize("grid", sorted(GGUF_GRIDS))
def test_export_import_round_trip(tmp_path, source, model, grid):
    cfg, params, _ = quantize_model(model.cfg, model.params, parse_recipe(f"rtn:{grid}"), None)
    out = tmp_path / f"tiny.{grid}.gguf"
    result = write_gguf(out, cfg, params, source)
    weights, config = load_gguf(out)
    _, src_config = load_gguf(source)
    assert config == src_config
    types = gguf_tensor_types(out)
    assert result["file_type"] == GRID_TYPE[grid].name
    for name, leaf in _kernels(params).items():
        got = weights[name]
        if isinstance(leaf, QArray):
            want = np.asarray(leaf.dequantize(jnp.float32))
            if grid == "q4_1":  # (c - z) d vs q d + m: float32 rounding only
                np.testing.assert_array_less(np.abs(got - want), _q41_tol(leaf) + 1e-30)
            else:
                np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_array_equal(got, np.asarray(leaf))
    kinds = {t for n, t in types.items() if n.endswith(("_q.weight", "_down.weight"))}
    assert kinds == {GRID_TYPE[grid].name}
    assert types["token_embd.weight"] == "F32" and types["blk.0.ffn_norm.weight"] == "F32"
    meta, src = gguf_metadata(out), gguf_metadata(source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                "general.name"):
        assert meta[key] == src[key]
    assert meta["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{grid.upper()}"])


def test_q4_0_logits_match_after_import(tmp_path, source, model):
    """The re-imported float model computes what the quantized serving model computes."""
    cfg, params, _ = quantize_model(model.cfg, model.params, parse_recipe("rtn:q4_0"), None)
    out = tmp_path / "tiny.gguf"
    write_gguf(out, cfg, params, source)
    back = load(str(out))
    tokens = jnp.arange(24, dtype=jnp.int32)[None] * 7 % 256
    serve = Transformer(cfg, mode=QuantMode.SERVE).apply({"params": params}, tokens)
    float_ = Transformer(back.cfg).apply({"params": back.params}, tokens)
    np.testing.assert_allclose(np.asarray(float_), np.asarray(serve), atol=2e-5, rtol=1e-5)


def test_hf_rope_layout_gets_llama_cpp_permutation(tmp_path, source, model):
    """A rotate-half (Hugging Face) model exported and re-imported (adjacent) gives its logits."""
    cfg = dataclasses.replace(model.cfg, rope_layout="half")
    cfg, params, _ = quantize_model(cfg, model.params, parse_recipe("rtn:q8_0"), None)
    out = tmp_path / "hf.gguf"
    write_gguf(out, cfg, params, source)
    back = load(str(out))
    assert back.cfg.rope_layout == "adjacent"
    tokens = jnp.arange(24, dtype=jnp.int32)[None] * 5 % 256
    serve = Transformer(cfg, mode=QuantMode.SERVE).apply({"params": params}, tokens)
    float_ = Transformer(back.cfg).apply({"params": back.params}, tokens)
    np.testing.assert_allclose(np.asarray(float_), np.asarray(serve), atol=2e-5, rtol=1e-5)


def _grid_qarray(grid, shape=(128, 48), seed=0):
    w = 0.05 * jax.random.normal(jax.random.key(seed), shape)
    w = w.at[5, 3].set(0.4).at[40, 7].set(-0.5)  # outliers: both signs of the extreme
    g = GGUF_GRIDS[grid]
    return w, quantize(w, QuantSpec(channel_axes=(1,), group_axis=0, **g))


@pytest.mark.parametrize("grid", sorted(GGUF_GRIDS))
def test_block_layout_matches_gguf_reference(grid):
    _, q = _grid_qarray(grid)
    fmt, data = qarray_blocks(q)
    assert fmt == GRID_TYPE[grid]
    assert data.shape == (48, 128 // 32 * gguf.GGML_QUANT_SIZES[fmt][1])
    ref = gguf_dequantize(data, fmt).T  # the gguf package's numpy port of ggml-quants.c
    want = np.asarray(q.dequantize(jnp.float32))
    if grid == "q4_1":
        np.testing.assert_array_less(np.abs(ref - want), _q41_tol(q) + 1e-30)
    else:
        np.testing.assert_array_equal(ref, want)
        # On our grid, ggml's own quantizer picks the same d and codes: identical bytes.
        np.testing.assert_array_equal(gguf_quantize(want.T.copy(), fmt), data)


def test_q4_0_grid_uses_code_minus_8_for_the_extreme():
    w, q = _grid_qarray("q4_0")
    codes = np.asarray(q.codes())
    assert codes.min() == -8 and codes.max() <= 7
    assert codes[5, 3] == -8 and codes[40, 7] == -8  # each group's extreme, either sign
    scale = np.asarray(q.scale, np.float32)
    np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
    # Within half a step |d| of the float weights, except that the side opposite the extreme
    # stops at code 7 (Q4_0's grid is -8..7): there the error is |w| - 7|d|. The extreme
    # itself is off by the f16 rounding of d (8 |d| 2^-11).
    d = np.repeat(np.abs(scale), 32, axis=0)
    w = np.asarray(w)
    bound = np.where(np.abs(w) > 7.5 * d, np.abs(w) - 7 * d, d / 2) + 8 * d * 2.0**-11
    assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= bound)


@pytest.mark.parametrize(
    "spec, fits",
    [
        (dict(qtype="int4", group_size=128), "Q4_0 fits: quantize with recipe METHOD:q4_0"),
        (dict(qtype="int4", group_size=32), "Q4_0"),  # f32 scales
        (dict(qtype="int4", group_size=32, symmetric=False), "Q4_1"),
        (dict(qtype="int8", group_size=32, symmetric=False, fp16_scales=True), "Q8_0"),
        (dict(qtype="int8"), "Q8_0"),  # per channel
        (dict(qtype="nf4", group_size=32, fp16_scales=True), "Q4_0"),
    ],
)
def test_grids_no_block_format_holds_are_refused(spec, fits):
    w = 0.05 * jax.random.normal(jax.random.key(0), (128, 16))
    q = quantize(w, QuantSpec(channel_axes=(1,), **({"group_axis": 0} if "group_size" in spec
                                                    else {}), **spec))
    with pytest.raises(ValueError, match=f"blk.0.attn_q.weight: .*{fits}"):
        block_format(q, "blk.0.attn_q.weight")


def test_int3_symmetric_fits_q4_0():
    w = 0.05 * jax.random.normal(jax.random.key(0), (64, 8))
    q = quantize(w, QuantSpec(qtype="int3", channel_axes=(1,), group_axis=0, group_size=32,
                              fp16_scales=True))
    fmt, data = qarray_blocks(q)
    assert fmt == Q.Q4_0
    np.testing.assert_array_equal(gguf_dequantize(data, fmt).T, np.asarray(q.dequantize()))


def test_grid_recipes_parse_and_refuse():
    r = parse_recipe("gptq:q4_0")
    assert (r.grid, r.qtype, r.group_size, r.symmetric, r.name) == ("q4_0", "int4", 32, True,
                                                                    "gptq:q4_0")
    assert parse_recipe(r.name) == r
    assert parse_recipe("awq:q4_1:mse").name == "awq:q4_1:mse"
    assert parse_recipe("rtn:q4_1").dot_config.rhs.symmetric is False
    with pytest.raises(ValueError, match="q4_0 fixes groups of 32"):
        parse_recipe("gptq:q4_0:g64")
    with pytest.raises(ValueError, match="w8a8 cannot target the q8_0 grid"):
        Recipe(method="w8a8", grid="q8_0")
    with pytest.raises(ValueError, match="Unknown grid"):
        Recipe(method="rtn", grid="q5_k")


def test_float_embedding_on_a_q8_0_grid_is_written_as_q8_0(tmp_path, source, model):
    """auto: Q8_0 only when ggml's quantizer gives the values back bit for bit (an embedding
    imported from a Q8_0 GGUF); other float matrices stay F32 (the random source embedding)."""
    emb = np.asarray(model.params["embed"]["embedding"])
    on_grid = gguf_dequantize(gguf_quantize(emb, Q.Q8_0), Q.Q8_0)
    params = {**model.params, "embed": {"embedding": jnp.asarray(on_grid)}}
    write_gguf(tmp_path / "a.gguf", model.cfg, params, source)
    write_gguf(tmp_path / "b.gguf", model.cfg, model.params, source)
    assert gguf_tensor_types(tmp_path / "a.gguf")["token_embd.weight"] == "Q8_0"
    assert gguf_tensor_types(tmp_path / "b.gguf")["token_embd.weight"] == "F32"
    np.testing.assert_array_equal(load_gguf(tmp_path / "a.gguf")[0]["embed"], on_grid)


def test_cli_export_and_refusal(tmp_path, source, model, capsys):
    cfg, params, _ = quantize_model(model.cfg, model.params, parse_recipe("rtn:q8_0"), None)
    save_quantized(tmp_path / "ck", cfg, params, {"recipe": "rtn:q8_0", "model": str(source)})
    out = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "gguf",
                 "--out", str(out), "--float-type", "f16"]) == 0
    assert gguf_tensor_types(out)["token_embd.weight"] == "F16"
    assert "Q8_0" in capsys.readouterr().out
    cfg, params, _ = quantize_model(model.cfg, model.params, parse_recipe("rtn:int4:g32"), None)
    save_quantized(tmp_path / "ck4", cfg, params, {"recipe": "rtn:int4:g32", "model": "tiny"})
    assert main(["export", "--checkpoint", str(tmp_path / "ck4"), "--out", str(out)]) == 2
    assert "pass the source model" in capsys.readouterr().err
    res = export_gguf(tmp_path / "ck", tmp_path / "x.gguf", options=ExportOptions())
    assert res["recipe"] == "rtn:q8_0" and res["tensor_types"]["Q8_0"] == 14
    with pytest.raises(ValueError, match="METHOD:q4_0"):
        export_gguf(tmp_path / "ck4", tmp_path / "y.gguf", source=source)


def test_hugging_face_folder_export(tmp_path):
    """An HF model (rotate-half Q/K, untied head, tokenizer.json) exported: llama.cpp's Q/K row
    order, the HF tokenizer's vocabulary, and the same logits once re-imported."""
    from tests.models.test_safetensors_loader import write_hf_folder

    folder = tmp_path / "hf"
    write_hf_folder(folder, hidden_size=64, intermediate_size=128, vocab_size=256)
    hf = load(str(folder))
    assert hf.cfg.rope_layout == "half" and not hf.cfg.tie_embeddings
    cfg, params, _ = quantize_model(hf.cfg, hf.params, parse_recipe("rtn:q8_0"), None)
    out = tmp_path / "hf.gguf"
    write_gguf(out, cfg, params, folder)
    meta = gguf_metadata(out)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert gguf_tensor_types(out)["output.weight"] == "F32"
    weights, config = load_gguf(out)
    back = dataclasses.replace(cfg, quant_rules=(), rope_layout="adjacent")
    tokens = jnp.arange(24, dtype=jnp.int32)[None] * 5 % 256
    serve = Transformer(cfg, mode=QuantMode.SERVE).apply({"params": params}, tokens)
    float_ = Transformer(back).apply({"params": to_params(weights, config)}, tokens)
    # float32 summation order only (unit-variance weights: logits of magnitude ~10).
    scale = float(jnp.abs(serve).max())
    np.testing.assert_allclose(np.asarray(float_), np.asarray(serve), atol=1e-5 * scale, rtol=0)
