"""Issue 15: how many int4 codes can QAT change in experiment 2's budget?

QAT trains a latent float weight ``w`` and rounds it on the forward (STE). A code changes only
when ``w`` crosses a rounding boundary. With Adam, one step moves a weight by at most about the
learning rate, so over a run a weight moves at most ``sum(lr_t)``: the *reach*. This script
measures, on SmolLM2-135M's block projections at int4 g128 (full grid: the signed extreme maps to -8,
so the step is ``absmax / 8``, as ``rtn:int4:g128`` computes it), the step size ``scale`` and, for the two inits of
``jaxquant finetune --method qat:int4:g128``:

* ``--init rtn``: the latent weights are the float weights, spread inside their cells; the
  fraction within the reach of a boundary is the fraction of codes the run *can* change;
* ``--init gptq``: the latent weights are GPTQ's dequantized weights, each exactly at its cell's
  centre, half a step from either boundary: no code can change unless the reach exceeds half a
  step (the group scale moves too, by at most ``reach / absmax``: also counted).

    python experiments/qat_grid_reach.py        # ~1 minute of CPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "qat_grid_reach.json"


def reach_of(steps: int, peak: float) -> float:
    """``sum(lr_t)`` under ``jaxquant finetune``'s schedule (``make_schedule``: warmup over
    ``min(100, steps // 10)`` steps, cosine to 10% of the peak)."""
    from jaxquant.train.step import make_schedule

    schedule = make_schedule(peak, min(100, steps // 10), steps)
    return float(sum(schedule(i) for i in range(steps)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from jaxquant.eval import tasks
    from jaxquant.models.registry import load
    from jaxquant.ptq.pipeline import effective_group

    env = tasks.environment()
    m = load("smollm2-135m")
    reach = reach_of(args.steps, args.lr)
    steps, rtn_reachable, gptq_scale_moves, n = [], 0, 0, 0
    for i in range(m.cfg.n_layers):
        for mod in ("attn", "mlp"):
            for v in m.params[f"block_{i}"][mod].values():
                w = np.asarray(v["kernel"], np.float32)
                d = w.shape[0]
                g = effective_group(d, 128)
                wg = w.reshape(d // g, g, -1)
                amax = np.abs(wg).max(1, keepdims=True)
                scale = amax / 8  # full signed grid -8..7
                u = wg / scale  # position in steps
                dist = np.abs(u - np.floor(u) - 0.5)  # to the nearest rounding boundary
                rtn_reachable += int((dist * scale < reach).sum())
                # at GPTQ's init every weight is at a centre, half a step from a boundary; the
                # group's scale (absmax / 8) moves by at most reach / 8, which shifts code c by
                # at most 8 * reach / absmax steps: a code changes only if that reaches 1/2
                shift = 8 * reach / amax
                gptq_scale_moves += int((np.broadcast_to(shift, wg.shape) >= 0.5).sum())
                steps.append(scale.ravel())
                n += w.size
    steps = np.concatenate(steps)
    out = {
        "model": "smollm2-135m", "format": "int4 g128 (96 on the 576-wide inputs), full grid",
        "budget": {"steps": args.steps, "peak_lr": args.lr, "reach": reach},
        "weights": n,
        "step_size": {"median": float(np.median(steps)), "p10": float(np.percentile(steps, 10)),
                      "p90": float(np.percentile(steps, 90))},
        "reach_over_half_median_step": reach / (float(np.median(steps)) / 2),
        "init_rtn_fraction_of_codes_within_reach": rtn_reachable / n,
        "init_gptq_fraction_of_codes_within_reach": gptq_scale_moves / n,
        "environment": env,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=1))
    return out


if __name__ == "__main__":
    main()
