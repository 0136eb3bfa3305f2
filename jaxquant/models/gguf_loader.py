"""Read a LLaMA-architecture GGUF file into float32 numpy arrays.

Lingo:
  * **ne**: ggml lists a tensor's dimensions fastest-varying first, so a
    ``[out, in]`` numpy matrix is stored with ``ne = (in, out)``. The `gguf`
    reader already reverses ``ne`` into numpy order, and
    ``gguf.quants.dequantize`` returns numpy order too: every 2-D weight comes
    out ``[out, in]`` (the token embedding ``[vocab, d]``).
  * **canonical layout**: the names and ``[in, out]`` kernels shared by all
    jaxquant loaders (see :func:`load_gguf`).

The Q/K weights are left as stored. llama.cpp's converter permuted their
output rows so that RoPE rotates adjacent pairs ``(x[2i], x[2i+1])``; the
config therefore says ``rope_layout="adjacent"``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from jaxquant.errors import CorruptModelFileError, JaxquantError

ARCHITECTURE = "llama"

# GGUF tensor name suffix (after "blk.{i}.") -> (canonical suffix, transpose?).
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", False),
    "attn_q.weight": ("q", True),
    "attn_k.weight": ("k", True),
    "attn_v.weight": ("v", True),
    "attn_output.weight": ("o", True),
    "ffn_norm.weight": ("mlp_norm", False),
    "ffn_gate.weight": ("gate", True),
    "ffn_up.weight": ("up", True),
    "ffn_down.weight": ("down", True),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("embed", False),
    "output_norm.weight": ("final_norm", False),
    "output.weight": ("lm_head", True),
}


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A memory-mapped reader for ``path``, shared between calls.

    Parsing the metadata of a large vocabulary takes seconds, so readers are
    cached by (absolute path, size, modification time).

    Args:
      path: A ``.gguf`` file.

    Returns:
      A ``gguf.GGUFReader``; treat it as read-only.

    Raises:
      ValueError: If ``path`` is not an existing file.
      CorruptModelFileError: If the file is not a readable GGUF (truncated or corrupt).
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"No GGUF file at {path}; pass the path of an existing .gguf file.")
    stat = file.stat()
    try:
        return _cached_reader(str(file), stat.st_size, stat.st_mtime_ns)
    except JaxquantError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf raises many types on bad bytes; name the file
        raise corrupt_gguf(path, e) from e


def corrupt_gguf(path: str | os.PathLike, e: BaseException, what: str = "") -> JaxquantError:
    """The error for a GGUF file that fails to parse: names the file and what to do."""
    gist = (str(e).strip().splitlines() or [""])[0][:300]
    return CorruptModelFileError(
        f"{path}: not a readable GGUF file{what} ({type(e).__name__}: {gist}); it is truncated "
        "or corrupt. Download or convert it again (a fetched model is re-checked against its "
        "sha256 on the next run)."
    )


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns  # Part of the cache key only.
    return GGUFReader(path)


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value of a GGUF file, as a Python value.

    Args:
      reader: An open ``GGUFReader``.
      key: Metadata key, e.g. ``"llama.block_count"``.
      default: Returned when the key is missing.

    Returns:
      A scalar, a string, or a list for array fields.
    """
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(value)
    return value


def gguf_metadata(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """The metadata of a GGUF file whose key starts with ``prefix``, key -> Python value.

    Example:
      >>> fields = gguf_metadata(path, "tokenizer.")  # doctest: +SKIP
      >>> fields["tokenizer.ggml.model"]  # doctest: +SKIP
      'gpt2'
    """
    reader = open_gguf(path)
    return {key: gguf_field(reader, key) for key in reader.fields if key.startswith(prefix)}


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """The storage type of every tensor, for reporting.

    Args:
      path: A ``.gguf`` file.

    Returns:
      GGUF tensor name -> ggml type name, e.g. ``{"blk.0.attn_q.weight": "Q4_1"}``.

    Example:
      >>> gguf_tensor_types(path)["token_embd.weight"]  # doctest: +SKIP
      'Q8_0'
    """
    reader = open_gguf(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def load_gguf(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Loads a LLaMA GGUF file, dequantizing every tensor to float32.

    Args:
      path: A ``.gguf`` file whose ``general.architecture`` is ``llama``.

    Returns:
      ``(weights, config)``. ``weights`` uses the canonical layout, all float32,
      kernels ``[in, out]``:

      * ``embed``: ``[vocab, d]``
      * ``layers.{i}.attn_norm``, ``layers.{i}.mlp_norm``: ``[d]``
      * ``layers.{i}.q``: ``[d, n_heads*head_dim]``;
        ``layers.{i}.k``, ``layers.{i}.v``: ``[d, n_kv_heads*head_dim]``;
        ``layers.{i}.o``: ``[n_heads*head_dim, d]``
      * ``layers.{i}.gate``, ``layers.{i}.up``: ``[d, ffn]``;
        ``layers.{i}.down``: ``[ffn, d]``
      * ``final_norm``: ``[d]``; ``lm_head``: ``[d, vocab]`` only when untied.

      ``config`` holds ``vocab_size, d_model, n_layers, n_heads, n_kv_heads,
      head_dim, ffn_dim, rope_theta, rms_eps, tie_embeddings, rope_layout,
      max_seq_len`` with ``rope_layout="adjacent"``.

    Raises:
      ValueError: If the file is not a LLaMA GGUF or holds unexpected tensors.

    Example:
      >>> weights, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
      >>> weights["layers.0.q"].shape, config["n_layers"]  # doctest: +SKIP
      ((576, 576), 30)
    """
    reader = open_gguf(path)
    try:
        config = _config(reader, path)
    except JaxquantError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged metadata values: name the file
        raise corrupt_gguf(path, e, " (its metadata)") from e
    weights = {}
    for tensor in reader.tensors:
        name, transpose = _canonical_name(tensor.name, path)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
            want = tuple(int(d) for d in reversed(tensor.shape))
            if array.shape != want and int(np.prod(array.shape)) != int(np.prod(want)):
                raise ValueError(f"{array.shape} values where the header says {want}")
            # np.array copies: F32 tensors would otherwise be read-only views of the memmap.
            weights[name] = np.array(array.T if transpose else array, dtype=np.float32, order="C")
        except Exception as e:  # noqa: BLE001 - a cut-short data region fails in many ways
            raise corrupt_gguf(path, e, f" (tensor {tensor.name})") from e
        if not np.isfinite(weights[name]).all():
            raise CorruptModelFileError(
                f"{path}: tensor {tensor.name} holds NaN or inf values; the file is corrupt "
                "(a damaged byte?). Download or convert it again."
            )
    config["tie_embeddings"] = "lm_head" not in weights
    if "embed" in weights and weights["embed"].shape[0] != config["vocab_size"]:
        raise ValueError(
            f"{path}: token_embd has {weights['embed'].shape[0]} rows but the tokenizer "
            f"lists {config['vocab_size']} tokens; the file looks inconsistent."
        )
    return weights, config


def _config(reader: GGUFReader, path: str | os.PathLike) -> dict[str, Any]:
    """The model config from ``llama.*`` metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(
            f"{path}: architecture is {arch!r}; only LLaMA-architecture GGUF files "
            "(general.architecture = 'llama') can be loaded."
        )

    def get(key: str, default: Any = None) -> Any:
        value = gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing.")
        if isinstance(value, list):
            raise ValueError(
                f"{path}: {arch}.{key} varies per layer ({value[:4]}...); only uniform "
                "LLaMA models are supported."
            )
        return value

    d_model = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: RoPE covers {rope_dims} of {head_dim} head dims; partial rotary "
            "embeddings are not supported."
        )
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(get("vocab_size"))
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "n_layers": int(get("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "ffn_dim": int(get("feed_forward_length")),
        "rope_theta": _short_float(get("rope.freq_base", 10000.0)),
        "rms_eps": _short_float(get("attention.layer_norm_rms_epsilon")),
        "tie_embeddings": True,
        "rope_layout": "adjacent",
        "max_seq_len": int(get("context_length")),
    }


def _short_float(value: float) -> float:
    """A float32 metadata value as the shortest decimal (``1e-05``, not ``9.99e-06``)."""
    return float(str(np.float32(value)))


def _canonical_name(name: str, path: str | os.PathLike) -> tuple[str, bool]:
    """GGUF tensor name -> (canonical name, whether to transpose)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in _LAYER_TENSORS:
            suffix, transpose = _LAYER_TENSORS[parts[2]]
            return f"layers.{int(parts[1])}.{suffix}", transpose
    raise ValueError(
        f"{path}: unexpected tensor {name!r}. Only plain LLaMA weights are supported "
        f"(token_embd, output_norm, output and blk.N.{{{', '.join(_LAYER_TENSORS)}}}); "
        "models with biases, rope_freqs (Llama 3.1 scaling) or MoE experts are not."
    )
