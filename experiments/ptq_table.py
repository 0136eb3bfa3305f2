"""The PTQ table: each recipe's bits/weight, size, PTB perplexity, delta and PTQ time.

Writes ``experiments/results/ptq_table.json`` (with device, versions, date and the budget)
and ``experiments/results/ptq_table.png`` (perplexity against model size), and prints the
markdown table for ``experiments/RESULTS.md``.

    python experiments/ptq_table.py                       # budgeted (see --help)
    python experiments/ptq_table.py --full --calib-windows 128   # full PTB test split
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxquant.eval import tasks
from jaxquant.eval.plots import plot_ppl_vs_size
from jaxquant.io.models import load

RECIPES = tasks.DEMO_RECIPES + ("awq+gptq:int3:g128",)


def run(model: str = "smollm2-135m", recipes=RECIPES, *, eval_tokens: int | None = 16384,
        calib_windows: int = 32, calib_len: int = 512, seed: int = 0,
        out_dir: str | Path = "experiments/results", name: str = "ptq_table",
        progress: bool = True) -> dict:
    """Runs the table and writes its JSON and plot; returns the result dict."""
    budget = tasks.DemoBudget(eval_tokens=eval_tokens, calib_windows=calib_windows,
                              calib_len=calib_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(result):  # after every recipe, so a long run keeps what it measured
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))

    result = tasks.demo_rows(load(model), recipes, budget, seed=seed, progress=progress,
                             on_row=write)
    write(result)
    plot_ppl_vs_size(result["rows"], out / f"{name}.png", title=f"{model} on PTB test")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", help="comma-separated (default: the full table)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--full", action="store_true", help="the full PTB test split")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--name", default="ptq_table")
    a = p.parse_args()
    recipes = a.recipes.split(",") if a.recipes else RECIPES
    r = run(a.model, recipes, eval_tokens=None if a.full else a.eval_tokens,
            calib_windows=a.calib_windows, calib_len=a.calib_len, seed=a.seed,
            out_dir=a.out_dir, name=a.name)
    print(tasks.markdown_table(r["rows"]))


if __name__ == "__main__":
    main()
