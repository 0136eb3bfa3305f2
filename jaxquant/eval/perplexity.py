"""Perplexity of a causal language model over a token stream.

Protocol (GPTQ's, see ANCHORS.md): the stream is cut into non-overlapping windows of
``seq_len`` tokens (a trailing partial window is dropped); inside each window, position ``t``
predicts token ``t + 1``. Perplexity is ``exp`` of the negative log-likelihood averaged over
all predicted tokens. With ``stride < seq_len`` the windows slide by ``stride`` and only the
tokens no earlier window predicted are scored (the Hugging Face sliding-window protocol).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxquant.errors import NonFiniteError

# exp(x) overflows a float64 above this; a mean NLL that high means a broken model.
_MAX_NLL = math.log(np.finfo(np.float64).max)


def _exp(nll: float) -> float:
    """``exp(nll)``, ``inf`` instead of an OverflowError."""
    return math.exp(nll) if nll <= _MAX_NLL else math.inf


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """What a perplexity run measured (all fields go to the JSON)."""

    perplexity: float
    nll: float
    tokens_scored: int
    tokens_total: int
    windows: int
    seq_len: int
    stride: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seq_len / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d


def make_windows(
    tokens: np.ndarray, seq_len: int, stride: int | None = None, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a stream into windows and marks which predictions count.

    Args:
      tokens: ``[n]`` token ids.
      seq_len: window length.
      stride: hop between windows (default ``seq_len``: non-overlapping).
      max_tokens: use only the first ``max_tokens`` tokens of the stream.

    Returns:
      ``(windows [w, seq_len] int32, score [w, seq_len - 1] bool)``: ``score[i, t]`` says
      whether the prediction of ``windows[i, t + 1]`` from position ``t`` counts.
    """
    tokens = np.asarray(tokens, np.int32)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"Need seq_len >= 2 and 1 <= stride <= seq_len; got {seq_len}, {stride}.")
    if len(tokens) < seq_len:
        raise ValueError(f"Only {len(tokens)} tokens, fewer than one window of {seq_len}; lower "
                         "--seq-len or raise --max-tokens.")
    starts = list(range(0, len(tokens) - seq_len + 1, stride))
    windows = np.stack([tokens[s : s + seq_len] for s in starts])
    score = np.ones((len(starts), seq_len - 1), bool)
    for i in range(1, len(starts)):
        # Targets at absolute positions <= previous window's end were already scored.
        overlap = starts[i - 1] + seq_len - starts[i]
        score[i, : max(0, overlap - 1)] = False
    return windows, score


def _nll_fn(apply_fn: Callable):
    @jax.jit
    def nll(params, windows, score):
        logits = apply_fn(params, windows).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        tgt = jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(score, tgt, 0.0), axis=1), jnp.sum(score)

    return nll


def perplexity(
    apply_fn: Callable,
    params,
    tokens: np.ndarray,
    *,
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``apply_fn(params, tokens [b, s]) -> logits [b, s, vocab]`` on a stream.

    Args:
      apply_fn: a pure function (e.g. ``model.apply`` wrapped to take the params tree).
      params: its parameters (may hold QArrays).
      tokens: ``[n]`` token ids.
      seq_len: window length.
      stride: hop (default ``seq_len``).
      batch_size: windows per jitted call.
      max_tokens: limit the stream.
      progress: show a progress bar.

    Returns:
      A :class:`PerplexityResult`.

    Raises:
      NonFiniteError: a window's loss is NaN or infinite (the message names the window and its
        tokens), or the mean NLL is so large (> 709) that the perplexity overflows a float.
        Either means broken weights; it is never reported as a result.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (--batch-size), got {batch_size}.")
    windows, score = make_windows(tokens, seq_len, stride, max_tokens)
    nll_fn = _nll_fn(apply_fn)
    total, count = 0.0, 0
    n = len(windows)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"perplexity ({seq_len}-token windows)", unit="win",
               disable=not progress)
    for i in range(0, n, batch_size):
        w, s = windows[i : i + batch_size], score[i : i + batch_size]
        if len(w) < batch_size:  # pad the last batch to keep one compiled shape
            pad = batch_size - len(w)
            w = np.concatenate([w, np.repeat(w[-1:], pad, 0)])
            s = np.concatenate([s, np.zeros((pad,) + s.shape[1:], bool)])
        nll, cnt = nll_fn(params, jnp.asarray(w), jnp.asarray(s))
        if not nll.is_fully_addressable:  # windows split over several processes' devices
            nll = multihost_utils.process_allgather(nll, tiled=True)
        nll = np.asarray(nll, np.float64)[: min(batch_size, n - i)]
        bad = np.flatnonzero(~np.isfinite(nll))
        if bad.size:
            bar.close()
            k = i + int(bad[0])
            start = k * (stride or seq_len)
            raise NonFiniteError(
                f"window {k} of {n} (tokens {start}..{start + seq_len - 1}) has a non-finite "
                f"loss ({nll[bad[0]]}): the model's weights or activations hold NaN/inf (a "
                "corrupted checkpoint or model file, or a quantization that overflowed). No "
                "perplexity is reported."
            )
        total += float(nll.sum())
        count += int(cnt)
        bar.update(min(batch_size, n - i))
        bar.set_postfix(ppl=f"{_exp(total / max(count, 1)):.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    mean = total / max(count, 1)
    if mean > _MAX_NLL:
        raise NonFiniteError(
            f"the mean NLL is {mean:.1f} nats per token, so the perplexity exp({mean:.0f}) "
            "overflows a float: the model is broken (a corrupted checkpoint or model file?). No "
            "perplexity is reported."
        )
    return PerplexityResult(
        perplexity=_exp(mean), nll=mean, tokens_scored=count,
        tokens_total=int(min(len(tokens), max_tokens or len(tokens))), windows=n,
        seq_len=seq_len, stride=stride or seq_len, seconds=seconds)
