"""The `vlrlhf` command."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_tiny_model(args) -> int:
    from vlrlhf.models.tiny import build_tiny_model

    path = build_tiny_model(args.family, args.out_dir, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0


def cmd_demo(args) -> int:
    from jobs.demo import run_model_demo

    run_model_demo(args.out_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlrlhf.models.tiny import FAMILIES

    parser = argparse.ArgumentParser(
        prog="vlrlhf", description="Preference learning and RL for vision-language models on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write a tiny random checkpoint of a VLM family",
                               description="Write a tiny random checkpoint (HF layout, local tokenizer) "
                                           "of one VLM family; nothing is downloaded.")
    tiny.add_argument("family", choices=FAMILIES)
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)

    demo = commands.add_parser("demo", help="run the demo on tiny models (CPU, no downloads)",
                               description="Build every tiny checkpoint, then encode, score and "
                                           "generate with each; prints a table.")
    demo.add_argument("--out-dir", default=".demo/tiny", help="where the tiny checkpoints go")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
