"""Tokenizers from a GGUF file's metadata or a Hugging Face ``tokenizer.json``.

This module reads no model file itself: :mod:`jaxquant.models` reads the GGUF and hands over its
``tokenizer.ggml.*`` fields as a plain mapping (``models.load_tokenizer`` does both).

A GGUF file with ``tokenizer.ggml.model = "gpt2"`` carries a GPT-2 style
byte-level BPE: the token strings (already in the byte-to-unicode alphabet,
``Ġ`` for a space), the merges (``"Ġ t"``) and the name of the pre-tokenizer
(``tokenizer.ggml.pre``). We rebuild it with the `tokenizers` library.

Pre-tokenizers follow llama.cpp's ``llama-vocab.cpp``, which maps the name to
a list of split regexes:

* ``gpt2`` family (``default``, ``gpt2``, ``mpt``, ``olmo``, ``jais``): the
  GPT-2 regex, i.e. ``ByteLevel(use_regex=True)``.
* ``smollm`` family (``smollm``, ``starcoder``, ``refact``, ``command-r``,
  ``codeshell``, ``exaone``, ``minerva``): first ``\\p{N}`` (every digit is its
  own piece), then the GPT-2 regex, i.e. ``Digits(individual_digits=True)``
  followed by ``ByteLevel(use_regex=True)``. This is also exactly SmolLM2's
  own ``tokenizer.json``.
* ``llama-bpe`` (Llama 3) and ``qwen2``: their single regex via ``Split``,
  then ``ByteLevel(use_regex=False)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxquant.errors import CorruptModelFileError

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_NAMES = ("default", "gpt2", "mpt", "olmo", "jais")
_DIGIT_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_REGEX_NAMES = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def pre_tokenizer_for(name: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre``.

    Args:
      name: The GGUF pre-tokenizer name, e.g. ``"smollm"`` or ``"gpt2"``.

    Returns:
      A byte-level pre-tokenizer (see the module docstring for the mapping).

    Raises:
      ValueError: For names whose regexes are not implemented here.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _GPT2_NAMES:
        return byte_level
    if name in _DIGIT_NAMES:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    if name in _REGEX_NAMES:
        split = pre_tokenizers.Split(Regex(_REGEX_NAMES[name]), behavior="isolated")
        plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, plain])
    known = ", ".join(_GPT2_NAMES + _DIGIT_NAMES + tuple(_REGEX_NAMES))
    raise ValueError(
        f"Unknown GGUF pre-tokenizer {name!r}; known: {known}. Load the model's "
        "tokenizer.json with tokenizer_from_file instead."
    )


def tokenizer_from_gguf(fields: Mapping[str, Any], where: str = "GGUF") -> Tokenizer:
    """Builds the byte-level BPE tokenizer described by a GGUF file's metadata.

    Args:
      fields: The file's ``tokenizer.ggml.*`` metadata, key -> value
        (:func:`jaxquant.models.gguf_loader.gguf_metadata`).
      where: The file's name, for error messages.

    Returns:
      A ``tokenizers.Tokenizer``; control tokens are registered as special.

    Raises:
      ValueError: If the metadata holds no GPT-2 style BPE tokenizer.

    Example:
      >>> tok = tokenizer_from_gguf(gguf_metadata(path))  # doctest: +SKIP
      >>> tok.decode(tok.encode("Hello world").ids)  # doctest: +SKIP
      'Hello world'
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{where}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is "
            "rebuilt from GGUF. Use tokenizer_from_file with the model's tokenizer.json."
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{where}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing.")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizer_for(fields.get("tokenizer.ggml.pre") or "gpt2")
    tokenizer.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    kinds = dict(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens(_added(kinds, _CONTROL, special=True))
    tokenizer.add_tokens(_added(kinds, _USER_DEFINED, special=False))
    return tokenizer


def tokenizer_from_file(folder: str | os.PathLike) -> Tokenizer:
    """Loads a Hugging Face ``tokenizer.json``.

    Args:
      folder: A model folder holding ``tokenizer.json``, or the file itself.

    Returns:
      A ``tokenizers.Tokenizer``.

    Raises:
      ValueError: If there is no ``tokenizer.json``, or it is damaged (a
        :class:`~jaxquant.errors.CorruptModelFileError`).
    """
    path = Path(folder)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"No tokenizer.json at {file}. Copy the model's tokenizer.json into the folder."
        )
    try:
        return Tokenizer.from_file(os.fspath(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        gist = (str(e).strip().splitlines() or [""])[0][:300]
        raise CorruptModelFileError(
            f"{file}: not a readable tokenizer.json ({gist}); copy the model's tokenizer.json "
            "again."
        ) from e


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A thin wrapper: plain-list ``encode``/``decode`` plus special ids.

    Attributes:
      hf: The underlying ``tokenizers.Tokenizer``.
      bos_id: Beginning-of-sequence id, or ``None``.
      eos_id: End-of-sequence id, or ``None``.

    Example:
      >>> tok = jaxquant.models.load_tokenizer("smollm2-135m")  # doctest: +SKIP
      >>> tok.decode(tok.encode("Hello world"))  # doctest: +SKIP
      'Hello world'
    """

    hf: Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are matched."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("This tokenizer has no BOS token; call encode(add_bos=False).")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids) -> str:
        """Text of a sequence of ids (special tokens kept)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], where: str = "GGUF") -> TextTokenizer:
        """Wraps :func:`tokenizer_from_gguf`, with BOS/EOS from the same metadata."""
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(tokenizer_from_gguf(fields, where), _int_or_none(bos), _int_or_none(eos))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> TextTokenizer:
        """Wraps :func:`tokenizer_from_file`, with BOS/EOS from ``config.json``."""
        hf = tokenizer_from_file(folder)
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(
            hf, _int_or_none(config.get("bos_token_id")), _int_or_none(config.get("eos_token_id"))
        )


def _added(kinds: dict[str, int], kind: int, special: bool) -> list[AddedToken]:
    """Tokens of one llama.cpp type, as added tokens matched before BPE."""
    return [
        AddedToken(token, special=special, normalized=False)
        for token, k in kinds.items()
        if k == kind
    ]


def _int_or_none(value) -> int | None:
    """An id from metadata; lists (several EOS ids) give their first entry."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def byte_tokenizer() -> TextTokenizer:
    """A byte-level tokenizer with 256 ids and no merges (the ``tiny`` model's vocabulary).

    Every UTF-8 byte is one token; ids follow GPT-2's byte-to-unicode alphabet.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return TextTokenizer(hf, None, None)
