"""The resumable loop: an interrupted + resumed run has the uninterrupted loss curve, bit for bit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxquant.errors import JaxquantError
from jaxquant.nn import Transformer, TransformerConfig
from jaxquant.train import init_train_state, make_optimizer, make_train_step
from jaxquant.train.loop import LoopConfig, WindowBatches, has_checkpoint, train

TINY = TransformerConfig.tiny(n_layers=1, max_seq_len=32)
STEPS = 8
# A learnable stream: a repeating byte pattern with some noise.
STREAM = (np.arange(4000) * 7 % 97 + (np.arange(4000) % 13 == 0) * 50).astype(np.int32)


def _setup(cfg=TINY, steps=STEPS):
    model = Transformer(cfg)
    opt = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=steps)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    state = init_train_state(model, opt, jax.random.key(0), None, params=params)
    return make_train_step(model, opt), state


@pytest.fixture(scope="module")
def setup():
    return _setup()


BATCHES = WindowBatches(STREAM, batch_size=4, seq_len=32, seed=3)


class Crash(Exception):
    pass


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, setup):
    step, state = setup
    config = LoopConfig(steps=STEPS, checkpoint_every=3, progress=False)
    full = train(step, state, BATCHES, config, directory=tmp_path / "a", tag={"m": "x"})
    assert np.all(np.isfinite(full.losses)) and full.losses[-1] < full.losses[0]

    def crash_at_7(i, metrics):
        if i == 7:  # after step 7: the last checkpoint is step 6
            raise Crash

    with pytest.raises(Crash):
        train(step, state, BATCHES, config, directory=tmp_path / "b", tag={"m": "x"},
              on_step=crash_at_7)
    resumed = train(step, state, BATCHES, config, directory=tmp_path / "b", tag={"m": "x"},
                    resume=True)
    assert resumed.resumed_from == 6
    np.testing.assert_array_equal(resumed.losses, full.losses)  # bit for bit
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batches_are_a_pure_function_of_seed_and_index():
    again = WindowBatches(STREAM.copy(), batch_size=4, seq_len=32, seed=3)
    np.testing.assert_array_equal(BATCHES(5), again(5))
    assert BATCHES(5).shape == (4, 32) and BATCHES(5).dtype == np.int32
    assert not np.array_equal(BATCHES(5), BATCHES(6))
    assert not np.array_equal(BATCHES(5), WindowBatches(STREAM, 4, 32, seed=4)(5))
    starts = BATCHES(2)[:, 0]  # each row is a window of the stream
    for row in BATCHES(2):
        i = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(STREAM, 32)
                                      == row, axis=1))[0])
        np.testing.assert_array_equal(STREAM[i:i + 32], row)
    assert starts.shape == (4,)


def test_resume_errors_name_the_directory(tmp_path, setup):
    step, state = setup
    config = LoopConfig(steps=STEPS, checkpoint_every=STEPS, progress=False)
    with pytest.raises(JaxquantError, match=rf"nothing to resume: {tmp_path / 'r'}"):
        train(step, state, BATCHES, config, directory=tmp_path / "r", resume=True)
    train(step, state, BATCHES, config, directory=tmp_path / "r", tag={"method": "float"})
    assert has_checkpoint(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == {"method": "float",
                                                                     "steps": STEPS}
    with pytest.raises(JaxquantError, match="already holds a training run; pass --resume"):
        train(step, state, BATCHES, config, directory=tmp_path / "r", tag={"method": "float"})
    with pytest.raises(JaxquantError, match=r"another run \(method: 'float' there vs 'qat"):
        train(step, state, BATCHES, config, directory=tmp_path / "r", resume=True,
              tag={"method": "qat:int4"})
    wide = Transformer(TransformerConfig.tiny(n_layers=1, d_model=32, max_seq_len=32))
    opt = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=STEPS)
    abstract = jax.eval_shape(  # an abstract target is enough to resume
        lambda: init_train_state(wide, opt, jax.random.key(0), np.zeros((1, 8), np.int32)))
    with pytest.raises(JaxquantError, match="does not fit this run's model"):
        train(make_train_step(wide, opt), abstract, BATCHES, config, directory=tmp_path / "r", resume=True,
              tag={"method": "float"})


def test_config_validation():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        LoopConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        LoopConfig(steps=3, checkpoint_every=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowBatches(np.arange(10), batch_size=1, seq_len=32)
