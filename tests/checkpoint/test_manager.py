"""CheckpointManager: keep the last k, asynchronous saves, exact QAT resume, interrupted saves."""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxquant import checkpoint
from jaxquant.checkpoint.common import TMP_SUFFIX
from jaxquant.checkpoint.manager import CheckpointManager
from jaxquant.core import QuantSpec, fake_quant
from tests.checkpoint.test_checkpoint import _w, assert_identical, qtree, run_and_kill

SPEC = QuantSpec(qtype="int4", channel_axes=(1,), group_size=16)


def test_keeps_the_last_k_steps(tmp_path):
    with CheckpointManager(tmp_path / "run", max_to_keep=2) as mngr:
        for step in range(5):
            assert mngr.save(step, {"w": jnp.full((4,), step, jnp.float32)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [3, 4] and mngr.latest_step() == 4
        assert sorted(os.listdir(tmp_path / "run")) == ["3", "4"]
        assert mngr.save(2, {"w": jnp.ones(4)}) is False  # older than the latest: skipped
        np.testing.assert_array_equal(mngr.restore(3)["w"], jnp.full((4,), 3.0))
    assert checkpoint.CheckpointManager is CheckpointManager


def test_save_is_asynchronous_and_commits_atomically(tmp_path, monkeypatch):
    """Hold Orbax's finalizing rename: save() has returned, yet the step is not visible."""
    release, held = threading.Event(), threading.Event()
    rename = os.rename

    def gated_rename(src, dst, *args, **kwargs):
        if TMP_SUFFIX in os.fspath(src):
            held.set()
            release.wait(60)
        return rename(src, dst, *args, **kwargs)

    tree = qtree("int4")
    mngr = CheckpointManager(tmp_path / "run", max_to_keep=3)
    try:
        mngr.save(1, tree)
        mngr.wait_until_finished()
        monkeypatch.setattr(os, "rename", gated_rename)
        assert mngr.save(2, tree)  # returns while the background thread writes
        assert held.wait(60), "the background save never reached its commit"
        # Step 2 is written but not committed: only its temporary directory exists.
        assert (tmp_path / "run" / f"2{TMP_SUFFIX}").is_dir()
        with pytest.raises(FileNotFoundError, match="unfinished save"):
            checkpoint.restore(tmp_path / "run" / "2")
        assert_identical(checkpoint.restore(tmp_path / "run" / "1"), tree)
        release.set()
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
        assert_identical(mngr.restore(), tree)
    finally:
        release.set()
        mngr.close()


def _loss(params, x, y):
    kernel = fake_quant(params["dense"]["kernel"], SPEC)  # QAT: int4 g16 forward, STE backward
    pred = jnp.tanh(x @ kernel + params["dense"]["bias"])
    return jnp.mean((pred - y) ** 2)


def _make_train_step(opt):
    @jax.jit
    def train_step(state, x, y):
        grads = jax.grad(_loss)(state["params"], x, y)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }

    return train_step


def test_resume_qat_run_at_the_same_step_with_identical_state(tmp_path):
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.01),
    )
    train_step = _make_train_step(opt)

    def init():
        params = {"dense": {"kernel": _w((32, 16)), "bias": jnp.zeros(16)}}
        return {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}

    batches = [(_w((8, 32), 10 + i), _w((8, 16), 20 + i)) for i in range(6)]

    state = init()
    with CheckpointManager(tmp_path / "run", max_to_keep=2) as mngr:
        for x, y in batches[:3]:
            state = train_step(state, x, y)
            mngr.save(int(state["step"]), state)
    saved = state  # the run "crashes" here, after saving step 3
    reference = state
    for x, y in batches[3:]:
        reference = train_step(reference, x, y)

    # A new process: build the abstract state, restore the latest step, carry on.
    with CheckpointManager(tmp_path / "run", max_to_keep=2) as mngr:
        assert mngr.all_steps() == [2, 3]
        resumed = mngr.restore(target=jax.eval_shape(init))
    assert_identical(resumed, saved)  # params, Adam moments and count, step: bit for bit
    assert int(resumed["step"]) == 3 and int(resumed["opt_state"][1][0].count) == 3
    for x, y in batches[int(resumed["step"]) :]:
        resumed = train_step(resumed, x, y)
    assert_identical(resumed, reference)


def test_qarray_tree_without_target_and_errors(tmp_path):
    tree = qtree("nf4")
    with CheckpointManager(tmp_path / "run") as mngr:
        with pytest.raises(FileNotFoundError, match="No finished checkpoint"):
            mngr.restore()
        mngr.save(10, tree)
        assert_identical(mngr.restore(), tree)
        bad = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree
        )
        bad["head"][1] = jax.ShapeDtypeStruct((31,), jnp.float32)
        with pytest.raises(
            ValueError, match=r"^head/1: checkpoint has shape \(32,\), target has \(31,\)"
        ):
            mngr.restore(target=bad)
        with pytest.raises(ValueError, match="step 10 is already saved"):
            mngr.save(10, tree, force=True)
    # A single step is an ordinary jaxquant checkpoint.
    assert_identical(checkpoint.restore(tmp_path / "run" / "10"), tree)
    with pytest.raises(ValueError, match="looks like a CheckpointManager directory"):
        checkpoint.restore(tmp_path / "run")


def test_killed_save_keeps_the_previous_step(tmp_path):
    first = {"w": _w((64, 64)), "q": qtree("int8")}
    with CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, first)
    run_and_kill(tmp_path / "run", "manager", "finalizing")
    assert (tmp_path / "run" / f"2{TMP_SUFFIX}").is_dir()  # killed before commit
    with CheckpointManager(tmp_path / "run") as mngr:
        assert mngr.all_steps() == [1] and mngr.latest_step() == 1
        assert_identical(mngr.restore(), first)
        assert mngr.save(2, {"w": jnp.ones(3)})  # the step can be saved again
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
    assert sorted(os.listdir(tmp_path / "run")) == ["1", "2"]  # the leftover was cleaned up
