"""A generic, resumable training loop: N steps over a deterministic batch source, checkpointed.

The loop knows nothing of models or data sets. It takes

* a step ``step_fn(state, batch) -> (state, metrics)`` (``metrics["loss"]`` a scalar), e.g.
  :func:`~jaxquant.train.make_train_step` of any model and optimizer;
* a state pytree (e.g. :class:`~jaxquant.train.TrainState`, or a LoRA state);
* a batch source ``batches(i) -> [B, S] tokens`` that is a pure function of the step index
  ``i`` (:class:`WindowBatches`: random windows of a token stream drawn by
  ``np.random.default_rng((seed, i))``), so a resumed run sees exactly the batches the
  uninterrupted run would have seen.

Every ``checkpoint_every`` steps (and after the last) it saves ``{"state", "losses", "step"}``
through :class:`~jaxquant.checkpoint.CheckpointManager` into ``directory/<step>``; ``losses`` is
the ``[steps]`` float32 loss history (NaN for steps not run yet). ``directory/run.json`` holds
the run's ``tag`` (what makes it this run: model, method, hyper-parameters, number of steps),
written on a fresh start and checked on resume. Restoring is exact, the batch of step ``i``
is the same, and the jitted step is deterministic, so an interrupted and resumed run has the
same loss curve as an uninterrupted one, bit for bit.

Example::

    step = make_train_step(model, opt)
    state = init_train_state(model, opt, key, tokens[:1, :8], params=params)
    batches = WindowBatches(train_tokens, batch_size=8, seq_len=128, seed=0)
    result = train(step, state, batches, LoopConfig(steps=1000, checkpoint_every=100),
                   directory="run/train", tag={"model": "tiny", "method": "float"})
    # killed at step 730? The same call with resume=True continues from step 700.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxquant.checkpoint import CheckpointManager
from jaxquant.checkpoint.primary import on_primary
from jaxquant.errors import JaxquantError

__all__ = ["LoopConfig", "LoopResult", "WindowBatches", "has_checkpoint", "train"]

RUN_FILE = "run.json"

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How long to train and how often to checkpoint.

    Attributes:
      steps: optimizer steps of the whole run (a resumed run stops at the same step).
      checkpoint_every: save every this many steps (the last step is always saved).
      max_to_keep: training checkpoints kept (the newest ones); None keeps all.
      progress: show a progress bar with the running loss.
      desc: the progress bar's label.
    """

    steps: int
    checkpoint_every: int = 100
    max_to_keep: int | None = 2
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        for name in ("steps", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
        if self.max_to_keep is not None and (
            not isinstance(self.max_to_keep, int) or self.max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be an int >= 1 or None, got {self.max_to_keep!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class WindowBatches:
    """Batch ``i``: ``batch_size`` windows of ``seq_len`` consecutive tokens of ``tokens``.

    The window starts of batch ``i`` are drawn uniformly (with replacement) by
    ``np.random.default_rng((seed, i))``: a pure function of ``(seed, i)``, so any batch can be
    rebuilt without replaying the ones before it (what bit-for-bit resume needs).

    Attributes:
      tokens: ``[n_tokens]`` int ids (e.g. the PTB train split under the model's tokenizer).
      batch_size: ``B``.
      seq_len: ``S``.
      seed: the sampler's seed.

    Example:
      >>> WindowBatches(np.arange(100), batch_size=2, seq_len=8, seed=0)(5).shape
      (2, 8)
    """

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be 1-D int ids [n_tokens]; got {tokens.dtype}"
                             f"{list(tokens.shape)}.")
        for name in ("batch_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
        if tokens.shape[0] < self.seq_len:
            raise ValueError(f"the token stream has {tokens.shape[0]} tokens, fewer than one "
                             f"window of seq_len={self.seq_len}; use a shorter seq_len or more "
                             "text.")
        object.__setattr__(self, "tokens", tokens)

    def __call__(self, i: int) -> np.ndarray:
        """``[batch_size, seq_len]`` int32 ids of batch ``i`` (``i >= 0``)."""
        if i < 0:
            raise ValueError(f"batch index must be >= 0, got {i}.")
        rng = np.random.default_rng((self.seed, int(i)))
        n = self.tokens.shape[0]
        starts = rng.integers(0, n - self.seq_len + 1, size=self.batch_size)
        return self.tokens[starts[:, None] + np.arange(self.seq_len)].astype(np.int32)


class LoopResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the state after the last step.
      losses: ``[steps]`` float32, the loss of each step (before its update), resumed steps
        included.
      resumed_from: the step the run continued from, or None for a fresh run.
      seconds: wall time of this call (the steps run here, compile included).
    """

    state: PyTree
    losses: np.ndarray
    resumed_from: int | None
    seconds: float


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a finished training checkpoint of :func:`train`."""
    d = Path(directory)
    if not d.is_dir():
        return False
    return any(p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
               for p in d.iterdir())


def _read_tag(directory: Path) -> dict | None:
    try:
        return json.loads((directory / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_tag(directory: Path, tag: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(tag, indent=2, sort_keys=True, default=str))
    tmp.replace(directory / RUN_FILE)


def _check_tag(directory: Path, tag: dict) -> None:
    saved = _read_tag(directory)
    if saved is None:
        raise JaxquantError(f"{directory} has training checkpoints but no readable {RUN_FILE}, "
                            "so it can't be checked to be this run; start a new run in another "
                            "directory.")
    want = json.loads(json.dumps(tag, sort_keys=True, default=str))
    diff = [f"{k}: {saved.get(k)!r} there vs {want.get(k)!r} now"
            for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    if diff:
        raise JaxquantError(f"{directory} holds another run ({'; '.join(diff)}); resume it with "
                            "the same settings, or start this one in a new directory.")


def _abstract(state: PyTree) -> PyTree:
    """The restore target: ``state``'s shapes, dtypes and shardings (arrays land where the live
    state lives)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return jax.eval_shape(lambda: x) if hasattr(x, "shape") else x

    return jax.tree.map(leaf, state)


def _committed(state: PyTree) -> PyTree:
    """Every array committed to its sharding, as restored arrays are (jit caches on it)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding)
                        if isinstance(x, jax.Array) and not x.committed else x, state)


def train(
    step_fn: Callable[[PyTree, Any], tuple[PyTree, dict]],
    state: PyTree,
    batches: Callable[[int], Any],
    config: LoopConfig,
    *,
    directory: str | os.PathLike | None = None,
    resume: bool = False,
    tag: dict | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Runs ``config.steps`` steps of ``step_fn`` from ``state`` (or from the latest checkpoint).

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``; ``metrics["loss"]`` is recorded.
      state: the initial state; when resuming, only its structure, shapes, dtypes and
        shardings are used (it is the restore target: ``jax.eval_shape`` of the initial state
        will do, so an expensive initialisation need not run again).
      batches: ``i -> batch`` for ``i`` in ``[0, steps)``, a pure function of ``i``.
      config: :class:`LoopConfig`.
      directory: where the checkpoints go (None: no checkpoints, no resume).
      resume: continue from the latest checkpoint in ``directory``.
      tag: JSON-able dict naming the run (model, method, hyper-parameters); ``steps`` is added.
        Stored in ``directory/run.json``; resuming with a different tag is refused.
      on_step: called as ``on_step(i, metrics)`` after step ``i`` (1-based) is done.

    Returns:
      :class:`LoopResult`.

    Raises:
      JaxquantError: ``resume`` without a checkpoint, a checkpoint of another run (tag or
        shapes differ), or a fresh start in a directory that already holds a run.
    """
    t0 = time.perf_counter()
    steps = config.steps
    tag = {**(tag or {}), "steps": steps}
    losses = np.full((steps,), np.nan, np.float32)
    start, resumed_from = 0, None
    mngr = None
    if directory is None and resume:
        raise ValueError("resume=True needs the checkpoint directory.")
    if directory is not None:
        directory = Path(directory).absolute()
        found = has_checkpoint(directory)
        if resume and not found:
            raise JaxquantError(f"nothing to resume: {directory} holds no finished training "
                                "checkpoint; run without --resume to start the run.")
        if found and not resume:
            raise JaxquantError(f"{directory} already holds a training run; pass --resume "
                                "(resume=True) to continue it, or choose another directory.")
        if resume:
            _check_tag(directory, tag)
        else:  # several processes: process 0 writes it, the others wait for it
            on_primary(lambda: _write_tag(directory, tag), f"writing {directory / RUN_FILE}")
        mngr = CheckpointManager(directory, max_to_keep=config.max_to_keep)
    state = _committed(state)  # so the restored state hits the same compiled step
    try:
        if resume:
            target = {"state": _abstract(state),
                      "losses": jax.ShapeDtypeStruct((steps,), np.float32), "step": 0}
            try:
                saved = mngr.restore(target=target)
            except ValueError as e:
                raise JaxquantError(f"{directory}: the checkpoint does not fit this run's model "
                                    f"or method ({str(e).splitlines()[0]}); resume with the "
                                    "same --model and --method, or start a new run elsewhere."
                                    ) from e
            state, start = _committed(saved["state"]), int(saved["step"])
            losses[:] = np.asarray(saved["losses"])
            resumed_from = start
        bar = tqdm(total=steps, initial=start, desc=config.desc, disable=not config.progress)
        pending: list[tuple[int, jax.Array]] = []

        def flush():
            for j, loss in pending:
                losses[j] = float(loss)
            pending.clear()

        show_every = max(1, steps // 100)
        for i in range(start, steps):
            state, metrics = step_fn(state, batches(i))
            pending.append((i, metrics["loss"]))
            done = i + 1
            if done % show_every == 0 or done == steps:
                flush()
                bar.set_postfix(loss=f"{losses[i]:.4f}", refresh=False)
            bar.update(1)
            if mngr is not None and (done % config.checkpoint_every == 0 or done == steps):
                flush()
                mngr.save(done, {"state": state, "losses": losses.copy(), "step": done})
            if on_step is not None:
                on_step(done, metrics)
        flush()
        bar.close()
        jax.block_until_ready(state)
    finally:
        if mngr is not None:
            mngr.close()
    return LoopResult(state, losses, resumed_from, time.perf_counter() - t0)
