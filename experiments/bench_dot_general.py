"""Speed of the quantized ``dot_general`` against float and raw int8 ``lax.dot_general``.

The ops, the timing (jitted, warm-up excluded, medians of calls interleaved over the ops) and
the table live in :mod:`jaxquant.eval.bench_dot`, which ``jaxquant bench`` runs too; this script
is their command line, with the peers (AQT, Qwix) and the quiet-machine wait.

Usage::

    python experiments/bench_dot_general.py            # 2048^3, 4096^3, 8x4096x4096
    python experiments/bench_dot_general.py --quick    # small shapes, a few seconds
    /tmp/peers/bin/python experiments/bench_dot_general.py --peers   # with aqtp and qwix
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from jaxquant.eval.bench_dot import (  # noqa: F401  (re-exported for callers of this script)
    FULL_SHAPES,
    OPS,
    QUICK_SHAPES,
    markdown_table,
    peer_ops,
    run,
    time_ops,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write(result: dict, path: Path | str | None = None) -> Path:
    """Writes the JSON; by default ``results/bench_dot_general-<device>[-quick].json``."""
    suffix = "-quick" if result.get("quick") else ""
    path = (
        Path(path) if path else RESULTS_DIR / f"bench_dot_general-{result['device']}{suffix}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def wait_for_quiet(max_load: float, max_wait_s: float) -> None:
    """Sleeps until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passes)."""
    t0 = time.time()
    while (load := os.getloadavg()[0]) >= max_load and time.time() - t0 < max_wait_s:
        print(f"load average {load:.2f} >= {max_load}; waiting", flush=True)
        time.sleep(15)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per op (median; >= 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peers", action="store_true", help="also time AQT / Qwix if importable")
    p.add_argument("--ops", nargs="*", default=None, help=f"subset of {list(OPS)}")
    p.add_argument("--shapes", nargs="*", default=None, help="MxKxN triples, e.g. 2048x2048x2048")
    p.add_argument("--out", default=None, help="JSON path (default results/<name>-<device>.json)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="LOAD",
        help="first wait (up to 10 min) for the 1-min load average to drop below LOAD",
    )
    args = p.parse_args(argv)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.wait_quiet is not None:
        wait_for_quiet(args.wait_quiet, 600)
    result = run(shapes, args.repeats, warmup=args.warmup, peers=args.peers, ops=args.ops)
    result["quick"] = bool(args.quick)
    path = write(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
