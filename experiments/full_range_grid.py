"""RTN on the full-range symmetric int grid against the narrow one (issue 15).

The narrow grid uses codes ``-qmax..qmax`` with ``scale = absmax / qmax``; the full grid
(llama.cpp's Q4_0, Qwix) uses ``qmin..qmax`` with ``scale = signed extreme / qmin``, so one more
level and a finer step. Each recipe is scored on PTB test and on the held-out texts with the
same token budget; the JSON is rewritten after every row.

    nice -n 5 python experiments/full_range_grid.py            # int4 g128 and int3 g128, RTN
    python experiments/full_range_grid.py --model tiny --max-tokens 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from jaxquant.eval import tasks
from jaxquant.models.registry import load
from jaxquant.ptq.recipe import parse_recipe

RECIPES = ("rtn:int4:g128:narrow", "rtn:int4:g128:full", "rtn:int3:g128:narrow",
           "rtn:int3:g128:full")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(model: str = "smollm2-135m", recipes=RECIPES, *, max_tokens: int | None = 8192,
        heldout: tuple[str, ...] = tasks.HELDOUT, out: str | Path | None = None,
        progress: bool = True) -> dict:
    """Scores each recipe (PTB test plus ``heldout``); writes ``out`` after every row."""
    loaded = load(model)
    result = {"model": loaded.name, "dataset": "ptb", "split": "test", "max_tokens": max_tokens,
              "seq_len": 2048, "heldout": list(heldout), "rows": [],
              "environment": {**tasks.environment(), "commit": _commit()}}
    for text in recipes:
        recipe = parse_recipe(text)
        r = tasks.evaluate(loaded, recipe=recipe, max_tokens=max_tokens, heldout=heldout,
                           progress=progress)
        spec = recipe.dot_config.rhs if recipe.dot_config else None
        result["rows"].append({
            "recipe": text, "canonical_name": recipe.name,
            "full_range": None if spec is None else spec.full_range,
            "perplexity": r["perplexity"], "tokens_scored": r.get("tokens_scored"),
            "heldout": r["heldout"], "quantize_seconds": r.get("quantize_seconds"),
            "load_avg_1m": os.getloadavg()[0],
        })
        result["environment"]["load_avg_end"] = os.getloadavg()[0]
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--heldout", default=",".join(tasks.HELDOUT))
    ap.add_argument("--out", default="experiments/results/full_range_grid.json")
    a = ap.parse_args()
    res = run(a.model, tuple(a.recipes.split(",")), max_tokens=a.max_tokens,
              heldout=tuple(h for h in a.heldout.split(",") if h and h != "none"), out=a.out)
    print("| recipe | PTB | " + " | ".join(res["heldout"]) + " |")
    for row in res["rows"]:
        print(f"| {row['recipe']} | {row['perplexity']:.2f} | "
              + " | ".join(f"{row['heldout'][h]:.2f}" for h in res["heldout"]) + " |")


if __name__ == "__main__":
    main()
