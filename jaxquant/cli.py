"""The ``jaxquant`` command line. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    print(
        "jaxquant demo will quantize SmolLM2-135M (fp32; int8 per channel; int4 g128 and int3 g128 "
        "with RTN, GPTQ and AWQ; W8A8 with SmoothQuant), calibrate on Penn Treebank train and "
        "report each recipe's bits per weight, size, PTB test perplexity and quantization time.\n"
        "The PTQ algorithms have not landed yet; this placeholder does no work."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: PTQ recipes on SmolLM2-135M, PTB perplexity")
    demo.add_argument("--json", help="write the result as JSON to this path")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
