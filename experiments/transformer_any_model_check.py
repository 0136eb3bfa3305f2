"""Issue 14: jaxquant's own Transformer (SmolLM2-135M) through the any-model path.

``jq.quantize_model(Transformer(cfg), rules, tokens)`` + ``to_serving`` against the block driver
(``jaxquant.ptq.quantize_model``, what the command line and the SmolLM2 PTQ table use), RTN int4
g128 on the block projections: are the 210 serving kernels the same bits, and are the logits of
4 x 512 PTB-test tokens the same? (GPTQ's equality, ``blocks=`` vs ``true_sequential=False``,
is a unit test on the tiny model: ``tests/nn/test_any_model_jaxquant_layers.py``; on SmolLM2 the
any-model path re-runs the model's prefix for each block, about 15 full forwards at 30 blocks.)

    python experiments/transformer_any_model_check.py   # ~2 minutes of CPU
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.eval import tasks
from jaxquant.models.registry import load
from jaxquant.nn import QuantMode, Transformer
from jaxquant.nn.any_model import to_serving
from jaxquant.ptq import parse_recipe
from jaxquant.ptq.pipeline import quantize_model as block_driver

RESULTS = Path(__file__).resolve().parent / "results" / "transformer_any_model_check.json"
LINEARS = r"(^|/)block_\d+/(attn|mlp)/\w+_proj$"


def same_bits(a, b) -> bool:
    return (a.group_size == b.group_size
            and np.array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
            and np.array_equal(np.asarray(a.scale), np.asarray(b.scale)))


def nll(logits, tokens) -> float:
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return float(-jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)))


def main() -> dict:
    env = tasks.environment()
    m = load("smollm2-135m")
    recipe = parse_recipe("rtn:int4:g128")
    tokens = jnp.asarray(tasks.tokens_for(m, "ptb", "test")[: 4 * 512].reshape(4, 512))
    t0 = time.time()
    qmodel = jq.quantize_model(Transformer(m.cfg), [jq.QuantRule(LINEARS, recipe.dot_config)],
                               tokens[:1, :8])
    serving = to_serving(qmodel, {"params": m.params})
    seconds = time.time() - t0
    serve_cfg, want, _ = block_driver(m.cfg, m.params, recipe, progress=False)
    checks = [same_bits(serving["params"][b][mod][lin]["kernel"], want[b][mod][lin]["kernel"])
              for b in (f"block_{i}" for i in range(m.cfg.n_layers))
              for mod in ("attn", "mlp") for lin in want[b][mod]]
    y_any = jax.jit(qmodel.apply)(serving, tokens)
    y_driver = jax.jit(Transformer(serve_cfg, QuantMode.SERVE).apply)({"params": want}, tokens)
    out = {"model": "smollm2-135m", "recipe": recipe.name,
           "kernels_bit_identical": sum(checks), "kernels_differing": len(checks) - sum(checks),
           "max_abs_logit_diff": float(jnp.max(jnp.abs(y_any - y_driver))),
           "ppl_any_model_path": float(np.exp(nll(y_any, tokens))),
           "ppl_block_driver": float(np.exp(nll(y_driver, tokens))),
           "tokens": int(tokens.size), "any_model_convert_seconds": round(seconds, 1),
           "environment": env}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=1))
    return out


if __name__ == "__main__":
    main()
