"""The `peftlab` command: parses flags and calls the packages; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from peftlab.errors import PeftlabError
from peftlab.help_defaults import METHOD_NAMES, TRAIN_DEFAULTS


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): what was wrong and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type for counts (batch sizes, lengths, steps): a mistyped 0 is refused where it is given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bounded_int(most: int):
    """argparse type for a count from 1 to `most`."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {value:,}")
        return value
    return parse


def template_text(text: str) -> str:
    """argparse type for --template: a shell passes '\\n' as two characters; a template means a newline."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHOD_NAMES, help="method to apply (default: none, just the base)")
    g.add_argument("--r", type=int, help="LoRA/DoRA/QLoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA/DoRA/QLoRA alpha (default 8; the seed uses 2 * r)")
    g.add_argument("--targets", help="modules to adapt: 'q,v' (names or suffixes), a regex, or 'all-linear' "
                                     "(default: the method's usual modules for the model type)")
    g.add_argument("--dropout", type=float, help="LoRA/DoRA dropout (default 0.0)")
    g.add_argument("--feedforward", help="IA3: targets whose input is scaled, e.g. 'wo' (default per model type)")
    g.add_argument("--bottleneck", type=int, help="Houlsby adapters: inner size m (default 64)")
    g.add_argument("--num-virtual-tokens", type=int, help="prompt tuning: soft prompt length (default 20)")
    g.add_argument("--d", type=int, help="said/did: the subspace (intrinsic) dimension (default 1000)")


def method_fields(args: argparse.Namespace) -> dict:
    """The method flags as config fields (unset flags left out, so the method's defaults apply)."""
    from peftlab.methods import parse_targets

    alpha = int(args.alpha) if args.alpha is not None and float(args.alpha).is_integer() else args.alpha
    return {"r": args.r, "alpha": alpha, "dropout": args.dropout, "bottleneck": args.bottleneck,
            "num_virtual_tokens": args.num_virtual_tokens, "d": args.d,
            "targets": parse_targets(args.targets) if args.targets else None,
            "feedforward": parse_targets(args.feedforward) if args.feedforward else None}


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftlab.measure.inspect import estimate_memory, inspect_model

    fields = method_fields(args)
    if args.estimate_memory:
        print(estimate_memory(args.model, args.method, args.task, args.batch_size, args.source_len, args.target_len,
                              fields=fields, recompute_linear=args.recompute_linear)[0])
        return 0
    print(inspect_model(args.model, args.method, task=args.task, fields=fields))
    return 0


# flag -> config key; flags left unset keep the YAML's (or the default) value
TRAIN_FLAGS = {
    "--model": ("model.name", str), "--task": ("model.task", str), "--data": ("data.train", str),
    "--validation-data": ("data.validation", str), "--input-column": ("data.input_column", str),
    "--target-column": ("data.target_column", str), "--template": ("data.template", template_text),
    "--pair-column": ("data.pair_column", str),
    "--max-source-length": ("data.max_source_length", int), "--max-target-length": ("data.max_target_length", int),
    "--method": ("method.name", str), "--r": ("method.r", int), "--alpha": ("method.alpha", float),
    "--targets": ("method.targets", str), "--dropout": ("method.dropout", float),
    "--feedforward": ("method.feedforward", str), "--bottleneck": ("method.bottleneck", int),
    "--num-virtual-tokens": ("method.num_virtual_tokens", int), "--d": ("method.d", int),
    "--batch-size": ("run.batch_size", int), "--grad-accum": ("run.grad_accum", int), "--lr": ("optim.lr", float),
    "--warmup-steps": ("optim.warmup_steps", int), "--max-steps": ("run.max_steps", int),
    "--epochs": ("run.epochs", float), "--logging-steps": ("run.logging_steps", int),
    "--eval-steps": ("run.eval_steps", int), "--save-steps": ("run.save_steps", int), "--seed": ("run.seed", int),
    "--device": ("run.device", str), "--output": ("run.output", str), "--resume": ("run.resume", str),
    "--distributed": ("run.distributed", str), "--report-to": ("run.report_to", str),
}


def train_overrides(args: argparse.Namespace) -> dict[str, object]:
    from peftlab.methods import parse_targets

    overrides: dict[str, object] = {}
    for flag, (key, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            overrides[key] = parse_targets(value) if key in ("method.targets", "method.feedforward") else value
    if args.overwrite:
        overrides["run.overwrite"] = True
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PeftlabError(f"expected key=value, got {pair!r}: e.g. optim.weight_decay=0.01")
        overrides[key] = parse_targets(value) if key.endswith("targets") else value
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.train import distributed
    from peftlab.train.config import load_config
    from peftlab.train.loop import train

    config = load_config(args.config, train_overrides(args))
    if args.nproc is not None:
        config.validate()
        distributed.check_batch(distributed.World(size=args.nproc), config.run.batch_size)
        return distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))
    result = train(config)
    if not distributed.world_from_env(config.run.distributed).is_main:  # under torchrun rank 0 reports
        return 0
    print(f"saved to {result.output}  eval before: {result.eval_before}  after: {result.eval_after}")
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `option VALUE` / `option=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def cmd_sweep(args: argparse.Namespace) -> int:
    from peftlab.study.sweep import pick, sweep

    rows = sweep(args.config, args.grid, args.output, args.set)
    print(f"{len(rows)} points; summary: {Path(args.output) / 'summary.md'}")
    if advice := pick(rows):
        print(advice)
    return 0


def cmd_intrinsic_dim(args: argparse.Namespace) -> int:
    from peftlab.study.intrinsic import intrinsic_dim

    result = intrinsic_dim(args.config, args.output, args.set, args.method, args.target, args.full_metric,
                           args.d_start, args.d_max, args.precision, args.d_min)
    found = (f"d{round(100 * args.target)} {'<=' if result['at_most'] else '='} {result['d']}" if result["d"]
             else f"not reached up to d = {args.d_max}")
    print(f"{result['method'].upper()}: {found} (full fine-tuning {result['full_metric']:.4f}, target "
          f"{result['threshold']:.4f}); curve: {Path(args.output) / 'curve.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from peftlab.study.report import report

    print(f"report: {report(args.dirs, args.output)}")
    return 0


def cmd_study_seed(args: argparse.Namespace) -> int:
    from peftlab.study.seed import run_study

    if not set(args.parts) <= set("abc") or not args.parts:
        raise PeftlabError(f"--parts takes letters from a, b, c (e.g. --parts ac), got {args.parts!r}")
    run_study(args.output, args.model, args.parts, args.steps, args.batch_size, args.memory_batch_size,
              args.memory_steps, args.source_len, args.target_len)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peftlab.demo import run_demo

    run_demo(args.output, steps=args.steps)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from peftlab.data.synth import stream, write_jsonl
    from peftlab.io import refuse_run_output

    out = Path(args.output)
    refuse_run_output(out, "-o")
    if out.is_dir():
        raise PeftlabError(f"-o {out} is a directory: name the jsonl file to write, e.g. {out / 'train.jsonl'}")
    if out.exists() and not args.overwrite:
        raise PeftlabError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    path = write_jsonl(stream(args.task, args.n, args.seed), out)
    print(f"wrote {args.n} {args.task} examples to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.eval.api import evaluate

    evaluate(args.p, args.data, args.batch_size, args.max_new_tokens, args.num_beams, args.output, args.compare_base,
             args.limit, args.model, show=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from peftlab.eval.api import generate

    adapters = dict(_name_path(spec) for spec in args.adapter)
    rows = None
    if args.file:
        from peftlab.data.loading import load_table

        rows = list(load_table(args.file))
    outputs = generate(args.p, args.inputs, rows, adapters, args.use, args.batch_size, args.max_new_tokens,
                       args.num_beams, args.max_source_length, args.model, source=args.file or "rows")
    if rows is None:
        print("\n".join(outputs))
        return 0
    from peftlab.eval.api import prompts_of
    from peftlab.eval.runs import run_config

    config = run_config(Path(args.p))
    prompts = prompts_of(rows, config.data.template if config else None, args.file)
    for prompt, output in zip(prompts, outputs, strict=True):
        print(json.dumps({"input": prompt, "output": output}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from peftlab.serve import serve

    adapters = dict(_name_path(spec) for spec in args.adapter)
    serve(args.p, args.model, adapters, args.host, args.port, args.api_key or os.environ.get("PEFTLAB_API_KEY"),
          args.allow_adapter_loading, args.adapter_root, args.request_timeout, device=args.device,
          max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
          max_tokens=args.max_tokens)
    return 0


def _name_path(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise PeftlabError(f"--adapter wants name=path, got {spec!r}")
    return name, path


def cmd_merge(args: argparse.Namespace) -> int:
    from peftlab.eval.export import check_merge_output, export_merged
    from peftlab.eval.runs import load_run

    check_merge_output(Path(args.o).absolute(), args.overwrite, Path(args.p))  # before the model is built
    out = export_merged(load_run(args.p, args.model), args.o, args.overwrite, Path(args.p))
    print(f"merged model written to {out} (load it with transformers' AutoModel*.from_pretrained)")
    return 0


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", required=True, metavar="CHECKPOINT", help="run directory or checkpoint-<step> directory")
    p.add_argument("--model", help="base model (default: the one the adapter names)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="peftlab", description="Parameter-efficient fine-tuning in plain PyTorch.",
        epilog="PEFTLAB_ALLOCATOR: auto (default on Linux: tcmalloc, else jemalloc, where installed), tcmalloc, "
               "jemalloc, system, or a library path; the command re-executes itself once with it preloaded (less "
               "peak memory on CPU).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter counts, sizes, targetable modules, and a method's trainable line")
    p.add_argument("--model", required=True, help="hub id, local directory, random:<preset> or minilm")
    p.add_argument("--task", choices=["seq2seq", "causal", "classification"], help="model head (default: by model)")
    _add_method_flags(p)
    g = p.add_argument_group("memory estimate")
    g.add_argument("--estimate-memory", action="store_true",
                   help="predict peak training memory (fp32 AdamW) of --method (default full fine-tuning)")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--source-len", type=positive_int, default=128, help="source (prompt) tokens per example")
    g.add_argument("--target-len", type=positive_int, default=64, help="target tokens per example")
    g.add_argument("--recompute-linear", action="store_true",
                   help="as training with run.recompute_linear=true (linear outputs recomputed in backward)")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("train", help="fine-tune a model (LoRA or full) on a dataset")
    p.add_argument("--config", help="YAML config (sections: model, data, method, optim, run)")
    for flag, (key, kind) in TRAIN_FLAGS.items():
        default = "" if TRAIN_DEFAULTS[key] is None else f" (default {TRAIN_DEFAULTS[key]})"
        escapes = r"; \n and \t are a newline and a tab" if kind is template_text else ""
        p.add_argument(flag, type=kind, help=f"sets {key}{default}{escapes}")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--nproc", type=int, help="run N processes on this machine (torchrun; DDP or --distributed fsdp)")
    p.add_argument("set", nargs="*", metavar="key=value", help="any other config key, e.g. optim.weight_decay=0.01")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint: generation or classification metrics, loss")
    _add_checkpoint_flags(p)
    p.add_argument("--data", help="dataset (default: the run's validation data)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=1)
    p.add_argument("--limit", type=positive_int, help="only the first N examples")
    p.add_argument("--output", help="where predictions.jsonl and metrics.json go (default: CHECKPOINT/eval)")
    p.add_argument("--compare-base", action="store_true", help="also score the base model, side by side")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="batched generation from a checkpoint")
    _add_checkpoint_flags(p)
    p.add_argument("inputs", nargs="*", help="input texts")
    p.add_argument("--file", help="jsonl rows: the run's template columns, or an 'input' (or 'text') field; "
                   "optionally 'adapter' per row")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load another adapter on the same base (repeatable)")
    p.add_argument("--use", help="the adapter to run (default: the last loaded); '__base__' for none")
    p.add_argument("--max-source-length", type=positive_int,
                   help="prompt tokens kept (default: the run's data.max_source_length, as eval; causal prompts keep "
                        "their end)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=1)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible server for many adapters on one base")
    p.add_argument("-p", metavar="RUN", help="a run directory: its adapter on its own base (served as the run's name)")
    p.add_argument("--model", help="the base model (with --adapter, or instead of -p)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter to serve "
                   "(repeatable); a request's model field picks it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--api-key", help="every request needs 'Authorization: Bearer KEY' (or set PEFTLAB_API_KEY)")
    p.add_argument("--max-batch-size", type=positive_int, default=16, help="requests generated together")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests beyond it get 503")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=512)
    p.add_argument("--max-tokens", type=positive_int, default=256, help="the most new tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds before a request gets 504")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (only from --adapter-root)")
    p.add_argument("--adapter-root", help="the directory run-time adapter loads must lie under")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("merge", help="merge an adapter into its base: a plain Hugging Face model directory")
    _add_checkpoint_flags(p)
    p.add_argument("-o", required=True, metavar="OUT", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("sweep", help="a grid of training runs, resumable, with summary.csv and summary.md")
    p.add_argument("--config", help="the base YAML config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeatable): r=4,8,16,32  alpha=2r  method=full,lora")
    p.add_argument("--output", required=True, help="sweep directory: one run directory per point")
    p.add_argument("set", nargs="*", metavar="key=value", help="fixed config keys for every point")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("intrinsic-dim", help="search the smallest subspace dimension d reaching 90%% of full "
                                             "fine-tuning (d90): doubling, then bisection")
    p.add_argument("--config", help="the base YAML config (a classification task)")
    p.add_argument("--output", required=True, help="search directory: one run per d, curve.csv/png, result.json")
    p.add_argument("--method", default="said", choices=["said", "did"])
    p.add_argument("--target", type=float, default=0.9, help="share of the full fine-tuning metric (default 0.9)")
    p.add_argument("--full-metric", type=float, help="full fine-tuning's accuracy, if known (else it is run)")
    p.add_argument("--d-start", type=positive_int, default=16)
    p.add_argument("--d-max", type=positive_int, default=1 << 20)
    p.add_argument("--d-min", type=positive_int, default=1,
                   help="halving stops here (a hit there bounds d90 from above)")
    p.add_argument("--precision", type=float, default=0.25,
                   help="stop bisecting when the miss is within this share of the hit (default 0.25)")
    p.add_argument("set", nargs="*", metavar="key=value", help="fixed config keys for every run")
    p.set_defaults(run=cmd_intrinsic_dim)

    p = sub.add_parser("report", help="plots and a Markdown + HTML report of runs and sweeps")
    p.add_argument("dirs", nargs="+", help="run or sweep directories")
    p.add_argument("-o", "--output", default="report", help="where the PNGs, report.md and report.html go")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("study", help="ready-made studies")
    study_sub = p.add_subparsers(dest="study", required=True)
    s = study_sub.add_parser("seed", help="the seed study: (a) trainable params per rank, (b) alpha and grad "
                             "norms, (c) memory of full fine-tuning against LoRA; report beside the seed's figures")
    s.add_argument("--model", default="random:flan-t5-small", help="e.g. google/flan-t5-small when online")
    s.add_argument("--output", default="studies/seed")
    s.add_argument("--parts", default="abc", help="which experiments (default abc)")
    s.add_argument("--steps", type=positive_int, default=30, help="(b) optimizer steps per alpha")
    s.add_argument("--batch-size", type=positive_int, default=8, help="(b) batch size")
    s.add_argument("--memory-batch-size", type=positive_int, default=32, help="(c) batch size")
    s.add_argument("--memory-steps", type=positive_int, default=3, help="(c) steps per method")
    s.add_argument("--source-len", type=positive_int, default=128, help="source tokens per example")
    s.add_argument("--target-len", type=positive_int, default=64, help="target tokens per example")
    s.set_defaults(run=cmd_study_seed)

    p = sub.add_parser("demo", help="offline: LoRA on the pretrained MiniLM, a synthetic task, before/after")
    p.add_argument("--output", default="runs/demo", help="run directory (replaced if it holds an earlier demo)")
    p.add_argument("--steps", type=positive_int, default=150, help="optimizer steps")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write a seeded synthetic dataset as jsonl")
    s.add_argument("--task", choices=["sentiment", "summary"], default="sentiment",
                   help="sentiment: text and label; summary: dialogue and summary (for seq2seq and causal LMs)")
    s.add_argument("-n", type=bounded_int(10**8), default=1000, help="number of examples (at most 100,000,000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True, help="jsonl file to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")
    s.set_defaults(run=cmd_data_synth)
    return parser


ARGV_ENV = "PEFTLAB_ARGV"  # the command line `train --nproc` hands to every process torchrun starts


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """The `peftlab` command; with `argv` given (in-process callers), the process is left as it is."""
    try:
        if argv is None:
            from peftlab.accel.allocator import reexec_with_allocator

            reexec_with_allocator()
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv and "WORLD_SIZE" in os.environ and ARGV_ENV in os.environ:  # a process `train --nproc` started
            argv = json.loads(os.environ[ARGV_ENV])
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.run(args)
    except PeftlabError as e:
        print(f"peftlab: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, a read-only or missing directory: what the user can fix, without a traceback
        from peftlab.io import as_os_error, os_error_message

        if (os_error := as_os_error(e)) is None:
            raise
        print(f"peftlab: error: {one_line(os_error_message(os_error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130
