"""Write a quantized jaxquant model as a llama.cpp GGUF file, from its own codes and scales.

Lingo:
  * **block**: llama.cpp's Q4_0 / Q4_1 / Q8_0 store a weight matrix row by row (``[out, in]``
    in numpy order), each row cut into blocks of 32 consecutive inputs. A block holds one f16
    scale ``d`` (Q4_1: and an f16 minimum ``m``) followed by its 32 codes:

    ======  =====================  ==============================  =====================
    format  bytes per block        value of code ``q``             jaxquant grid
    ======  =====================  ==============================  =====================
    Q4_0    2 + 16 (two nibbles)   ``(q - 8) * d``,  q in 0..15    symmetric int<=4, g32
    Q4_1    2 + 2 + 16             ``q * d + m``,    q in 0..15    asymmetric int<=4, g32
    Q8_0    2 + 32 (int8)          ``q * d``,        q in -128..127  symmetric int<=8, g32
    ======  =====================  ==============================  =====================

    Nibbles: byte ``j`` of a 4-bit block holds input ``j`` (low nibble) and input ``j + 16``
    (high nibble), as in ggml-quants.c.
  * **canonical kernel**: jaxquant's ``[in, out]`` QArray, grouped along the input axis
    (``group_axis=0``, ``group_size=32``, one scale per output column and group). Its
    ``[in // 32, out]`` scales become the blocks' ``d`` after a transpose.

Nothing is re-quantized: a QArray is accepted only when its grid *is* a block format's grid
(groups of 32 inputs, scales that are float16 values, Q4_1's minimum an f16 value), which the
recipes ``METHOD:q4_0`` / ``:q4_1`` / ``:q8_0`` guarantee (:data:`jaxquant.ptq.recipe.GGUF_GRIDS`).
Anything else is refused with the format and recipe that would fit. Float matrices (embedding,
untied head) are written in the smallest type that holds them exactly (``float_type="auto"``:
Q8_0 when ggml's own Q8_0 quantizer gives back every value bit for bit, as for an embedding
imported from a Q8_0 GGUF, else F16 if exact, else F32), or as F32 / F16 on request; RMSNorm
scales are always F32.

Metadata (architecture and tokenizer) is copied from the source model's GGUF, or built from a
Hugging Face folder's ``config.json`` and tokenizer, so the file is complete on its own. The
GGUF loader's mapping is inverted exactly: kernels are transposed back to ``[out, in]``; a model
loaded from Hugging Face (``rope_layout="half"``) gets llama.cpp's Q/K row permutation, applied
to codes and scales alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from jaxquant.core.qarray import QArray
from jaxquant.core.qtypes import get_qtype
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_loader import ARCHITECTURE, open_gguf
from jaxquant.nn.config import TransformerConfig

BLOCK = 32  # inputs per Q4_0 / Q4_1 / Q8_0 block
FLOAT_TYPES = {"auto": None, "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16}
_FILE_TYPES = {
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
}
# Flax module path in a block -> GGUF tensor suffix (inverse of gguf_loader._LAYER_TENSORS).
_LAYER_TENSORS = {
    ("attn_norm", "scale"): "attn_norm.weight",
    ("attn", "q_proj", "kernel"): "attn_q.weight",
    ("attn", "k_proj", "kernel"): "attn_k.weight",
    ("attn", "v_proj", "kernel"): "attn_v.weight",
    ("attn", "o_proj", "kernel"): "attn_output.weight",
    ("mlp_norm", "scale"): "ffn_norm.weight",
    ("mlp", "gate_proj", "kernel"): "ffn_gate.weight",
    ("mlp", "up_proj", "kernel"): "ffn_up.weight",
    ("mlp", "down_proj", "kernel"): "ffn_down.weight",
}
# Metadata the writer sets itself or that this module writes from the checkpoint's config.
_OWN_KEYS = ("GGUF.", "general.architecture", "general.alignment", "general.file_type",
             "general.quantization_version", f"{ARCHITECTURE}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How :func:`write_gguf` writes tensors.

    Attributes:
      float_type: for float matrices (embedding, untied head, kernels left float): ``"auto"``
        (default) the smallest of Q8_0 / F16 / F32 that holds every value exactly, ``"f32"``,
        or ``"f16"`` (rounds). RMSNorm scales are always F32, as llama.cpp wants.
    """

    float_type: str = "auto"

    def __post_init__(self):
        if self.float_type not in FLOAT_TYPES:
            raise ValueError(f"float_type must be one of {sorted(FLOAT_TYPES)}, "
                             f"got {self.float_type!r}.")


# --- QArray -> blocks ---------------------------------------------------------------------------
def _suggest(bits: int, symmetric: bool) -> tuple[str, str]:
    """(format, grid recipe suffix) that fits a grid of ``bits`` and symmetry."""
    if bits > 4:
        return "Q8_0", "q8_0"
    return ("Q4_0", "q4_0") if symmetric else ("Q4_1", "q4_1")


def _refuse(name: str, why: str, bits: int, symmetric: bool) -> ValueError:
    fmt, grid = _suggest(bits, symmetric)
    return ValueError(
        f"{name}: {why}; no GGUF block format holds these weights exactly. {fmt} fits: "
        f"quantize with recipe METHOD:{grid} (e.g. gptq:{grid}) and export again.")


def _is_f16(x: np.ndarray) -> bool:
    """Whether every element of float32 ``x`` is exactly a finite float16 value."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float32), x))


def block_format(q: QArray, name: str = "weight") -> GGMLQuantizationType:
    """The llama.cpp block format that holds a canonical ``[in, out]`` kernel exactly.

    Args:
      q: a 2-D :class:`QArray` kernel ``[in, out]``.
      name: used in error messages.

    Returns:
      ``Q4_0``, ``Q4_1`` or ``Q8_0``.

    Raises:
      ValueError: if no block format holds ``q``'s grid; the message names the format and the
        recipe that fit.
    """
    qt = get_qtype(q.qtype)
    symmetric = q.zero_point is None
    bits = qt.bits if qt.kind == "int" else 4
    if qt.kind != "int":
        raise _refuse(name, f"{q.qtype} codes are not integers", bits, True)
    if q.ndim != 2 or q.channel_axes != (1,):
        raise _refuse(name, f"a {q.ndim}-D QArray with channel_axes={q.channel_axes} is not an "
                      "[in, out] kernel with per-output scales", bits, symmetric)
    if q.group_axis != 0 or q.group_size != BLOCK:
        got = "one scale per output channel" if q.group_size is None else (
            f"groups of {q.group_size} along axis {q.group_axis}")
        raise _refuse(name, f"{got}, but llama.cpp's blocks hold {BLOCK} inputs each", bits,
                      symmetric)
    if not symmetric and bits > 4:
        raise _refuse(name, f"asymmetric {q.qtype} (only 4-bit blocks have a minimum)", bits,
                      True)
    if not _is_f16(np.asarray(q.scale, np.float32)):
        raise _refuse(name, "its scales are not float16 values (blocks store f16 scales)", bits,
                      symmetric)
    if symmetric:
        return GGMLQuantizationType.Q4_0 if bits <= 4 else GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.Q4_1


def qarray_blocks(q: QArray, name: str = "weight") -> tuple[GGMLQuantizationType, np.ndarray]:
    """Packs a canonical kernel's codes and scales into llama.cpp blocks, without re-quantizing.

    Args:
      q: a 2-D :class:`QArray` kernel ``[in, out]`` (see :func:`block_format`).
      name: used in error messages.

    Returns:
      ``(format, data)``: ``data`` is ``uint8 [out, (in // 32) * block_bytes]``, the rows of the
      ``[out, in]`` matrix as ``gguf.GGUFWriter.add_tensor(..., raw_dtype=format)`` takes them.

    Raises:
      ValueError: if no block format holds ``q`` exactly (Q4_1: also when the f16 minimum
        ``m = -(8 + zero_point) * scale`` does not reproduce ``q``'s values).

    Example:
      >>> fmt, data = qarray_blocks(q)  # doctest: +SKIP
      >>> gguf.quants.dequantize(data, fmt).T  # == q.dequantize()  # doctest: +SKIP
    """
    fmt = block_format(q, name)
    codes = np.asarray(q.codes(), np.int16).T  # [out, in]
    n_out, n_in = codes.shape
    nb = n_in // BLOCK
    codes = codes.reshape(n_out, nb, BLOCK)
    scale = np.ascontiguousarray(np.asarray(q.scale, np.float32).T)  # [out, nb]
    d = scale.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    if fmt == GGMLQuantizationType.Q8_0:
        body = [d, np.ascontiguousarray(codes.astype(np.int8)).view(np.uint8)]
    else:
        u = (codes + 8).astype(np.uint8)  # 0..15: Q4_0 stores q = c + 8; Q4_1 q = c - (-8)
        qs = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << np.uint8(4))
        body = [d, qs]
        if fmt == GGMLQuantizationType.Q4_1:
            zp = np.ascontiguousarray(np.asarray(q.zero_point, np.float32).T)  # (c-z)s = (c+8)s+m
            m = (-(8.0 + zp) * scale).astype(np.float16)
            _check_q41(q, codes, scale, m, name)
            body = [d, m.view(np.uint8).reshape(n_out, nb, 2), qs]
    data = np.concatenate(body, axis=-1).reshape(n_out, -1)
    return fmt, np.ascontiguousarray(data)


def _check_q41(q: QArray, codes: np.ndarray, scale: np.ndarray, m: np.ndarray, name: str):
    """Q4_1 values ``(c + 8) d + m`` must equal the QArray's ``(c - z) d`` to float32 rounding.

    jaxquant evaluates ``(c - z) * d`` in float32 and llama.cpp ``q * d + m``; with the zero
    point of a ``:q4_1`` recipe (``z = -8 - m / d``) the two differ by a few float32 ulps, far
    below the f16 grid. A zero point from any other recipe moves ``m`` off f16 and is refused.
    """
    mine = (codes + 8).astype(np.float32) * scale[..., None] + m.astype(np.float32)[..., None]
    ref = np.asarray(q.dequantize(np.float32)).T.reshape(mine.shape)
    tol = 8 * np.finfo(np.float32).eps * (np.abs(m.astype(np.float32)) + 16 * np.abs(scale))
    if np.any(np.abs(mine - ref) > tol[..., None]):
        raise _refuse(name, "its zero points put the group minimum off the float16 grid that "
                      "Q4_1 stores", 4, False)


def q41_gap(q: QArray) -> float:
    """Largest ``|llama.cpp's q*d + m - jaxquant's (c - z)*d|`` of a Q4_1-exportable kernel."""
    fmt, data = qarray_blocks(q)
    if fmt != GGMLQuantizationType.Q4_1:
        return 0.0
    ours = np.asarray(q.dequantize(np.float32))
    return float(np.max(np.abs(gguf_dequantize(data, fmt).T - ours)))


def float_blocks(x: np.ndarray, float_type: str = "auto") -> tuple[GGMLQuantizationType, Any]:
    """A float matrix ``[rows, cols]`` (numpy order) as GGUF tensor data.

    ``"auto"`` keeps it lossless: Q8_0 if ``gguf.quants``' port of ggml's Q8_0 quantizer
    reproduces every value exactly (the matrix already lies on a Q8_0 grid with each block's
    extreme at code +-127), else F16 if every value is a float16, else F32.
    """
    x = np.ascontiguousarray(x, np.float32)
    if float_type == "auto":
        if x.ndim == 2 and x.shape[-1] % BLOCK == 0:
            data = gguf_quantize(x, GGMLQuantizationType.Q8_0)
            if np.array_equal(gguf_dequantize(data, GGMLQuantizationType.Q8_0), x):
                return GGMLQuantizationType.Q8_0, data
        float_type = "f16" if _is_f16(x) else "f32"
    if float_type == "f16":
        return GGMLQuantizationType.F16, x.astype(np.float16)
    return GGMLQuantizationType.F32, x


# --- Q/K permutation ----------------------------------------------------------------------------
def llama_cpp_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that llama.cpp's converter gives Q/K (``permute`` in convert_hf_to_gguf.py).

    Hugging Face's rotate-half rows ``[head, half, i]`` become ``[head, i, half]``, so RoPE
    rotates adjacent pairs. Returns the index array ``p`` with ``gguf_rows = hf_rows[p]``.
    """
    hd = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def _permute_columns(x: Any, perm: np.ndarray) -> Any:
    """Permutes the output columns of an ``[in, out]`` kernel (float or QArray)."""
    if not isinstance(x, QArray):
        return np.asarray(x)[:, perm]
    codes = np.asarray(x.codes())[:, perm]
    zp = None if x.zero_point is None else np.asarray(x.zero_point)[:, perm]
    return dataclasses.replace(x, qvalue=codes, scale=np.asarray(x.scale)[:, perm],
                               zero_point=zp, pack_axis=None)


# --- metadata -----------------------------------------------------------------------------------
def _copy_gguf_metadata(writer: GGUFWriter, reader: GGUFReader) -> None:
    """Copies every key of ``reader`` except those :func:`write_gguf` writes itself."""
    for key, field in reader.fields.items():
        if key.startswith(_OWN_KEYS):
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _hf_tokenizer(writer: GGUFWriter, folder: Path) -> None:
    """Tokenizer metadata from a Hugging Face folder (BPE ``tokenizer.json`` or SentencePiece)."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    try:
        vocab, model = BpeVocab(folder), "gpt2"
    except Exception:  # noqa: BLE001 - not a BPE tokenizer; try SentencePiece next
        try:
            vocab, model = LlamaHfVocab(folder), "llama"
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{folder}: no tokenizer that GGUF can hold (BPE tokenizer.json or "
                             f"SentencePiece tokenizer.model) was found ({e}).") from e
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)


def _arch_metadata(writer: GGUFWriter, cfg: TransformerConfig, name: str) -> None:
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if name:
        writer.add_name(name)


# --- the writer ---------------------------------------------------------------------------------
def _tensors(cfg: TransformerConfig, params: dict) -> list[tuple[str, Any, bool]]:
    """``(gguf name, array or QArray, is_kernel)`` in llama.cpp's order."""
    out = [("token_embd.weight", params["embed"]["embedding"], False)]
    for i in range(cfg.n_layers):
        block = params[f"block_{i}"]
        for path, suffix in _LAYER_TENSORS.items():
            node = block
            for key in path:
                node = node[key]
            out.append((f"blk.{i}.{suffix}", node, path[-1] == "kernel"))
    out.append(("output_norm.weight", params["final_norm"]["scale"], False))
    if not cfg.tie_embeddings:
        out.append(("output.weight", params["lm_head"]["kernel"], True))
    return out


def write_gguf(
    out: str | os.PathLike,
    cfg: TransformerConfig,
    params: dict,
    source: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
) -> dict[str, Any]:
    """Writes serving params as a llama.cpp GGUF file.

    Args:
      out: the ``.gguf`` path to write.
      cfg: the model's (serving) :class:`TransformerConfig`.
      params: the Transformer's serving params: QArray kernels ``[in, out]`` (on a block grid),
        float embedding ``[vocab, d]``, norms ``[d]``, float kernels where left unquantized.
      source: the float model it came from (a ``.gguf``, a Hugging Face folder or a registry
        name): tokenizer and the remaining metadata are taken from it.
      options: :class:`ExportOptions`.

    Returns:
      ``{"path", "bytes", "tensor_types": {type: count}, "file_type"}``.

    Raises:
      ValueError: a kernel whose grid no block format holds (naming the recipe that fits), a
        source without a tokenizer, or a shape llama.cpp cannot block.
    """
    src = resolve_model(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), ARCHITECTURE)
    if src.suffix == ".gguf":
        reader = open_gguf(src)
        _copy_gguf_metadata(writer, reader)
        name = ""
    else:
        _hf_tokenizer(writer, src)
        name = src.name
    _arch_metadata(writer, cfg, name)
    perms = {}
    if cfg.rope_layout != "adjacent":  # Hugging Face rows: llama.cpp's converter permutes Q/K
        perms = {"attn_q.weight": llama_cpp_rows(cfg.q_dim, cfg.n_heads),
                 "attn_k.weight": llama_cpp_rows(cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads)}
    counts: dict[str, int] = {}
    for gname, value, is_kernel in _tensors(cfg, params):
        perm = perms.get(gname.split(".", 2)[-1])
        if perm is not None:
            value = _permute_columns(value, perm)
        if isinstance(value, QArray):
            qtype, data = qarray_blocks(value, gname)
            writer.add_tensor(gname, data, raw_dtype=qtype)
        else:
            arr = np.asarray(value, np.float32)
            arr = arr.T if is_kernel else arr
            if arr.ndim == 1:
                qtype, arr = GGMLQuantizationType.F32, np.ascontiguousarray(arr)
            else:
                qtype, arr = float_blocks(arr, options.float_type)
            writer.add_tensor(gname, arr, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    quant = [t for t in counts if t.startswith("Q")]
    main = GGMLQuantizationType[quant[0] if len(quant) == 1 else max(counts, key=counts.get)]
    writer.add_file_type(int(_FILE_TYPES.get(main, LlamaFileType.GUESSED)))
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "tensor_types": counts,
            "file_type": main.name}


def export_gguf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    options: ExportOptions = ExportOptions(),
) -> dict[str, Any]:
    """Exports a checkpoint of ``jaxquant ptq --out`` to a GGUF file that llama.cpp runs.

    Args:
      checkpoint: the checkpoint directory.
      out: the ``.gguf`` path to write.
      source: the float model for tokenizer and metadata; default: the model recorded in the
        checkpoint (``jaxquant ptq --model``).
      options: :class:`ExportOptions`.

    Returns:
      What :func:`write_gguf` returns, plus ``recipe`` and ``source``.

    Example:
      >>> export_gguf("ckpt/", "model.Q4_0.gguf")  # doctest: +SKIP
      {'path': 'model.Q4_0.gguf', 'bytes': ..., 'tensor_types': {'F32': ..., 'Q4_0': 210}, ...}
    """
    from jaxquant.models.saved import load_quantized

    cfg, params, sidecar = load_quantized(checkpoint)
    source = source or sidecar.get("info", {}).get("model")
    if not source or source == "tiny":
        raise ValueError(
            f"{checkpoint}: the checkpoint's model {source!r} has no GGUF or Hugging Face source "
            "to take the tokenizer from; pass the source model (--model FILE.gguf or folder).")
    result = write_gguf(out, cfg, params, source, options)
    return {**result, "recipe": sidecar.get("recipe"), "source": str(source)}
