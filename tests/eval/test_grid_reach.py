"""``grid_reach``: how far a QAT run can move a weight against the step of the grid it starts
on (the warning of ``--init gptq`` when no code can change)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QuantSpec, quantize
from jaxquant.eval import finetune as ft


def _qparams(step: float):
    """Two int4 kernels whose per-column scales are all ``step`` (absmax 8 * step)."""
    w = jnp.full((8, 4), -8.0 * step).at[1:].set(step)
    q = quantize(w, QuantSpec(qtype="int4", full_range=True, channel_axes=(1,)))
    return {"block_0": {"attn": {"q_proj": {"kernel": q}},
                        "mlp": {"up_proj": {"kernel": q}, "norm": jnp.ones(4)}}}


def _reach(lr: float, steps: int) -> float:
    """sum(lr_t) of a cosine from lr to lr / 10 with no warmup, computed here."""
    return sum(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps))) for i in range(steps))


@pytest.mark.parametrize("lr,steps,moves", [(1e-4, 32, False), (1e-2, 32, True)])
def test_reach_against_half_a_step(lr, steps, moves):
    config = ft.FinetuneConfig(method=ft.parse_method("qat:int4"), steps=steps,
                               learning_rate=lr, warmup_steps=0)
    got = ft.grid_reach(_qparams(0.01), config)
    np.testing.assert_allclose(got["reach"], _reach(lr, steps), rtol=1e-5)
    np.testing.assert_allclose(got["median_step"], 0.01, rtol=1e-6)
    assert got["codes_can_move"] is moves  # reach 1.8e-3 vs 5e-3; 0.18 vs 5e-3


def test_learned_scales_move_the_largest_codes_first():
    """A scale moved by ``reach`` shifts code 8 by ``8 * reach / step``: with LSQ a reach of a
    sixteenth of a step can change codes, without it half a step is needed."""
    config = ft.FinetuneConfig(method=ft.parse_method("qat:int4"), steps=32, learning_rate=1e-4,
                               warmup_steps=0)
    step = 2.5 * _reach(1e-4, 32)  # reach = 0.4 step: < 1/2, > 1/16
    assert not ft.grid_reach(_qparams(step), config)["codes_can_move"]
    assert ft.grid_reach(_qparams(step), config, max_code=8)["codes_can_move"]
