"""The PTQ table: each recipe's bits/weight, size, PTB perplexity, delta and PTQ time.

Writes ``experiments/results/ptq_table.json`` (with device, versions, date and the budget)
and ``experiments/results/ptq_table.png`` (perplexity against model size), and prints the
markdown table for ``experiments/RESULTS.md``.

    python experiments/ptq_table.py                       # budgeted (see --help)
    python experiments/ptq_table.py --full --calib-windows 128   # full PTB test split
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from pathlib import Path

from jaxquant.eval import tasks
from jaxquant.eval.plots import plot_ppl_vs_size
from jaxquant.models.registry import load

RECIPES = tasks.DEMO_RECIPES + ("awq+gptq:int3:g128",)


def run(model: str = "smollm2-135m", recipes=RECIPES, *, eval_tokens: int | None = 16384,
        calib_windows: int = 32, calib_len: int = 512, seed: int = 0,
        out_dir: str | Path = "experiments/results", name: str = "ptq_table",
        merge: bool = False, progress: bool = True, calib_data: str = "ptb",
        heldout: tuple[str, ...] = tasks.HELDOUT) -> dict:
    """Runs the table and writes its JSON and plot; returns the result dict.

    Every recipe is scored on PTB test (in-domain) and on each ``heldout`` text's test split;
    calibration uses ``calib_data`` (train splits only).

    ``merge=True`` re-runs only ``recipes`` and replaces their rows in the existing JSON
    (which must have the same model, budget and seed); each row keeps the environment
    (date, versions, commit, load) of the run that measured it. Rows of an old JSON measured
    before commits were recorded get ``"commit": "unrecorded"``."""
    budget = tasks.DemoBudget(eval_tokens=eval_tokens, calib_windows=calib_windows,
                              calib_len=calib_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    loaded = load(model)
    old = json.loads(path.read_text()) if merge else None
    if old is not None and (old["model"] != loaded.name or old["seed"] != seed
                            or old["budget"] != dataclasses.asdict(budget)
                            or old.get("calib_data", "ptb") != calib_data
                            or old.get("heldout", []) != list(heldout)):
        raise ValueError(f"--merge needs the settings of {path}: model {old['model']}, "
                         f"seed {old['seed']}, budget {old['budget']}, calibration "
                         f"{old.get('calib_data', 'ptb')}, held-out {old.get('heldout', [])}.")

    provenance = measured_by()

    def write(result):  # after every recipe, so a long run keeps what it measured
        result = {**result, "environment": {**result["environment"], **provenance,
                                            "load_avg_end": os.getloadavg()[0]}}
        if old is not None:
            result = _merged(old, result)
        path.write_text(json.dumps(result, indent=2))

    result = tasks.demo_rows(loaded, recipes, budget, seed=seed, progress=progress,
                             calib_data=calib_data, heldout=tuple(heldout), on_row=write)
    write(result)
    result = json.loads(path.read_text())
    plot_ppl_vs_size(result["rows"], out / f"{name}.png", title=f"{model} on PTB test")
    return result


def measured_by() -> dict:
    """The commit that measures (``-dirty`` when jaxquant/ or experiments/ have uncommitted
    changes) and the load at the start: recorded in the environment of every row."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "jaxquant", "experiments/ptq_table.py"):
        commit += "-dirty"
    return {"commit": commit, "load_avg_1m": os.getloadavg()[0]}


def _merged(old: dict, new: dict) -> dict:
    """``old``'s rows with those of ``new`` replaced (or appended), deltas recomputed."""
    env = new["environment"]
    fresh = {r["recipe"]: {**r, "environment": env} for r in new["rows"]}
    rows = [fresh.pop(r["recipe"], r) for r in old["rows"]] + list(fresh.values())
    for r in rows:
        r.setdefault("environment", old["environment"])
        r["environment"] = {"commit": "unrecorded", **r["environment"]}
    base = next((r["perplexity"] for r in rows if r["recipe"] == "fp32"), None)
    for r in rows:
        r.pop("recovered", None)
        if base is not None:
            r["delta"] = r["perplexity"] - base
            r["delta_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
    tasks.add_recovery(rows)
    return {**old, "rows": rows, "environment": env}


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
    p.add_argument("--merge", action="store_true",
                   help="re-run only --recipes and replace their rows in the existing JSON")
    p.add_argument("--calib-data", default="ptb",
                   help="calibration set: ptb | a text file | a mix such as ptb+shakespeare+kjv")
    p.add_argument("--heldout", default=",".join(tasks.HELDOUT),
                   help="held-out texts scored next to PTB test (comma-separated, or none)")
    a = p.parse_args()
    recipes = a.recipes.split(",") if a.recipes else RECIPES
    heldout = () if a.heldout == "none" else tuple(a.heldout.split(","))
    r = run(a.model, recipes, eval_tokens=None if a.full else a.eval_tokens,
            calib_windows=a.calib_windows, calib_len=a.calib_len, seed=a.seed,
            out_dir=a.out_dir, name=a.name, merge=a.merge, calib_data=a.calib_data,
            heldout=heldout)
    print(tasks.markdown_table(r["rows"]))


if __name__ == "__main__":
    main()
