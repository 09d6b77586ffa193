"""The `peftlab` command: parses flags and calls the packages; no logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peftlab.errors import PeftlabError


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora"], help="PEFT method to apply (default: none, just the base)")
    g.add_argument("--r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 8; the seed uses 2 * r)")
    g.add_argument("--targets", help="modules to adapt: 'q,v' (names or suffixes), a regex, or 'all-linear'")
    g.add_argument("--dropout", type=float, help="LoRA dropout (default 0.0)")


def method_config(args: argparse.Namespace):
    from peftlab.methods import build_config, parse_targets

    targets = parse_targets(args.targets) if args.targets else None
    alpha = int(args.alpha) if args.alpha is not None and float(args.alpha).is_integer() else args.alpha
    return build_config(args.method, r=args.r, alpha=alpha, targets=targets, dropout=args.dropout)


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftlab.measure.inspect import inspect_model

    config = method_config(args) if args.method else None
    print(inspect_model(args.model, config, task=args.task))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter counts, sizes, targetable modules, and a method's trainable line")
    p.add_argument("--model", required=True, help="hub id, local directory, random:<preset> or minilm")
    p.add_argument("--task", choices=["seq2seq", "causal", "classification"], help="model head (default: by model)")
    _add_method_flags(p)
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PeftlabError as e:
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130
