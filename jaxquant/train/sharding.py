"""A training state and step sharded over a device mesh: FSDP + tensor parallel, by XLA's SPMD.

The params take the shardings of :func:`jaxquant.nn.mesh.param_shardings` (``embed`` over
``fsdp``, heads / MLP / vocab over ``tensor``), the optimizer state the same ones leaf for leaf
(Adam's moments live where their params live; counters replicated),
and the batch splits over ``data`` and ``fsdp``. The step is the ordinary one of
:func:`~jaxquant.train.make_train_step`, jitted with these shardings in and out: XLA inserts
the all-gathers of FSDP and the reductions of the gradients. Nothing here communicates by hand.

Example::

    mesh = make_mesh("fsdp=4,tensor=2")
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=2, total_steps=20)
    state = init_train_state(model, opt, key, tokens)
    state, step = shard_train_step(make_train_step(model, opt, jit=False), state, mesh)
    state, metrics = step(state, tokens)          # tokens: numpy [B, S], split over the batch
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxquant.nn.mesh import batch_sharding, param_shardings, place, replicated

__all__ = [
    "compile_step",
    "memory_report",
    "per_device_bytes",
    "place_batch",
    "shard_step",
    "shard_train_state",
    "shard_train_step",
    "state_shardings",
    "step_memory",
]


def state_shardings(state: Any, mesh: Mesh, **kwargs) -> Any:
    """``NamedSharding`` s of a training state (concrete or ``jax.eval_shape`` abstract).

    The params' logical axes are found by path (:data:`~jaxquant.nn.mesh.TRANSFORMER_LOGICAL_AXES`
    ends in ``.../q_proj/kernel`` and the like), so an optimizer leaf shaped like a param, whose
    path ends the same way (``opt_state/1/0/mu/block_0/attn/q_proj/kernel``), is sharded like
    that param; the step, counters and anything no pattern names are replicated. Works for any
    state pytree: :class:`~jaxquant.train.TrainState`, a LoRA state.

    Args:
      state: the state.
      mesh: the mesh.
      **kwargs: passed to :func:`~jaxquant.nn.mesh.param_shardings` (``rules``, ``table``,
        ``strict``).
    """
    return param_shardings(state, mesh, **kwargs)


def shard_train_state(state: Any, mesh: Mesh, **kwargs) -> tuple[Any, Any]:
    """``(sharded state, its shardings)``: ``state`` placed by :func:`state_shardings`."""
    shardings = state_shardings(state, mesh, **kwargs)
    return place(state, shardings), shardings


def _placed(state: Any, shardings: Any) -> Any:
    """``state`` on ``shardings``, moved only where a leaf lives elsewhere (the first step of a
    run whose state was built, or restored, on one device)."""
    leaves = jax.tree.leaves(state)
    targets = jax.tree.leaves(shardings)
    if len(leaves) == len(targets) and all(
        isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(leaves, targets, strict=True)
    ):
        return state
    return place(state, shardings)


def shard_step(step: Callable, mesh: Mesh, shardings: Any, *, donate: bool = False) -> Callable:
    """``step`` jitted over ``mesh``: the state stays on ``shardings``, the batch splits over
    the batch axes, the metrics come back replicated.

    Args:
      step: ``(state, tokens [B, S], mask=None) -> (state, metrics)`` (or without ``mask``),
        jitted or not (an inner ``jax.jit`` is inlined).
      mesh: the mesh; ``B`` must divide by ``data * fsdp``.
      shardings: the state's shardings (:func:`state_shardings`).
      donate: donate the input state's buffers (halves the state's peak memory).

    Returns:
      ``sharded_step(state, tokens, mask=None)``. It takes the global batch (numpy or a jax
      array, the same on every process) and a state on any device (one not yet on
      ``shardings``, e.g. freshly restored, is placed first). ``.jitted`` is the ``jax.jit``
      object, ``.mesh`` and ``.shardings`` what it was made with.
    """
    rep = replicated(mesh)
    jitted = jax.jit(step, out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())

    def sharded_step(state, tokens, mask=None):
        state = _placed(state, shardings)
        tokens = place_batch(tokens, mesh)
        if mask is None:  # steps without a mask argument (LoRA's) work too
            return jitted(state, tokens)
        return jitted(state, tokens, place_batch(mask, mesh))

    sharded_step.jitted = jitted
    sharded_step.shardings = shardings
    sharded_step.mesh = mesh
    return sharded_step


def shard_train_step(
    step: Callable[..., tuple[Any, dict]],
    state: Any,
    mesh: Mesh,
    *,
    donate: bool = False,
    **kwargs,
) -> tuple[Any, Callable[..., tuple[Any, dict]]]:
    """Shards ``state`` and jits ``step`` over ``mesh`` (:func:`shard_train_state` +
    :func:`shard_step`).

    Args:
      step: ``make_train_step(model, opt, jit=False)`` or any step of that signature.
      state: the initial state (placed on the mesh here).
      mesh: the mesh.
      donate: see :func:`shard_step`.
      **kwargs: passed to :func:`state_shardings`.

    Returns:
      ``(sharded_state, sharded_step)``.
    """
    sharded, shardings = shard_train_state(state, mesh, **kwargs)
    return sharded, shard_step(step, mesh, shardings, donate=donate)


def place_batch(x, mesh: Mesh) -> jax.Array:
    """A global batch ``[B, ...]`` (the same on every process) split over the batch axes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    sharding = batch_sharding(mesh, np.ndim(x))
    n = int(np.prod([mesh.shape[a] for a in _names(sharding.spec[0])]))
    if np.shape(x)[0] % n:
        raise ValueError(f"batch of {np.shape(x)[0]} does not split over the mesh's batch axes "
                         f"{sharding.spec[0]!r} ({n} shards); use a batch size that is a "
                         f"multiple of {n}.")
    return place(x, sharding)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays (or ShapeDtypeStructs with
    shardings): the largest over devices of the sum of its shards."""
    per = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            per[None] = per.get(None, 0) + int(np.prod(leaf.shape)) * itemsize
            continue
        for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
            n = int(np.prod([len(range(*s.indices(d))) for s, d in zip(index, leaf.shape,
                                                                         strict=True)]))
            per[device] = per.get(device, 0) + n * itemsize
    return max(per.values(), default=0)


def compile_step(sharded_step, state: Any, tokens):
    """The compiled step for this state and batch shape (``jax.jit(...).lower(...).compile()``);
    call it as ``compiled(state, place_batch(tokens, mesh))``."""
    return sharded_step.jitted.lower(state, place_batch(tokens, sharded_step.mesh)).compile()


def memory_report(compiled, state: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step, from XLA's memory analysis.

    Returns:
      ``{"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes"}`` per device (as
      ``compiled.memory_analysis()`` reports them; the arguments are the state and the batch),
      plus ``state_bytes_total`` (the whole state, unsharded) and ``state_bytes_per_device``
      (the state's shards on the fullest device).
    """
    ma = compiled.memory_analysis()
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(state))
    return {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "state_bytes_total": int(total),
        "state_bytes_per_device": per_device_bytes(state),
    }


def step_memory(sharded_step, state: Any, tokens) -> dict[str, int]:
    """:func:`memory_report` of :func:`compile_step` (what one device holds for the step)."""
    return memory_report(compile_step(sharded_step, state, tokens), state)
