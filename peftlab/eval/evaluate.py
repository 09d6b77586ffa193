"""`peftlab eval -p CKPT`: score a checkpoint on a dataset, write predictions.jsonl and metrics.json."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from peftlab.data.batching import collate
from peftlab.data.loading import BUILDERS, load_table, require_columns
from peftlab.data.tasks import Formatter, required_columns
from peftlab.errors import PeftlabError
from peftlab.eval.generation import generate
from peftlab.eval.metrics import label_metrics, text_metrics
from peftlab.eval.runs import LoadedRun
from peftlab.eval.scoring import score
from peftlab.io import output_lock, refuse_run_output, write_text
from peftlab.methods.inject import adapters_disabled
from peftlab.train.config import DataSection


@dataclass
class EvalOptions:
    data: Any = None  # a file (default: the run's validation data), or in Python a Dataset or a list of dicts
    batch_size: int = 8
    max_new_tokens: int = 64
    num_beams: int = 1
    output: str | None = None  # default: <checkpoint>/eval
    compare_base: bool = False
    limit: int | None = None  # evaluate the first N examples only


def _data_settings(run: LoadedRun) -> DataSection:
    return run.config.data if run.config else DataSection()


def _rows(run: LoadedRun, options: EvalOptions) -> list[dict]:
    settings = _data_settings(run)
    if options.data is not None and not isinstance(options.data, str):  # a Dataset or a list of dicts
        from peftlab.train.setup import as_table

        table, source = as_table(options.data, None, settings.column_names, "the evaluation data")
    elif options.data:
        table = load_table(options.data, column_names=settings.column_names)
        source = options.data
    elif run.config and (settings.validation or settings.train):
        _check_run_data(settings)
        if settings.validation:
            table, source = load_table(settings.validation, column_names=settings.column_names), settings.validation
        else:
            from peftlab.train.setup import read_tables

            table, source = read_tables(run.config)[1], f"{settings.train} (held-out validation split)"
    elif run.config:
        raise PeftlabError("no evaluation data: the run was trained on data passed as objects, so pass --data FILE "
                           "(in Python, data= a file, a Dataset or a list of dicts)")
    else:
        raise PeftlabError("no evaluation data: pass --data FILE (the checkpoint has no run config naming one)")
    require_columns(table, required_columns(settings.template, settings.input_column, settings.target_column,
                                            settings.pair_column),
                    source, fix="pass --data with the columns the run was trained on")
    rows = list(table)
    return rows[:options.limit] if options.limit else rows


def _check_run_data(settings: DataSection) -> None:
    """The run's own data, named in its config.yaml, must still be there (a hub id always is)."""
    name = settings.validation or settings.train
    if Path(name).suffix in BUILDERS and not Path(name).is_file():
        raise PeftlabError(f"the run's data {name} is not found from {Path.cwd()} (moved, or a path relative to "
                           "where it was trained): pass --data FILE")


def _evaluate_once(run: LoadedRun, rows: list[dict], options: EvalOptions, progress) -> tuple[dict, list[dict]]:
    d = _data_settings(run)
    labels = list(d.labels or sorted({str(r[d.target_column]) for r in rows})) if run.task == "classification" else []
    formatter = Formatter.for_data(run.task, run.tokenizer, d, labels)
    encoded = formatter.encode_all(rows)
    device = next(run.model.parameters()).device
    batches = [collate(encoded[s:s + options.batch_size], run.tokenizer.pad_token_id)
               for s in range(0, len(encoded), options.batch_size)]
    metrics = {k.removeprefix("eval_"): v for k, v in score(run.model, batches, device).items()}
    sources = [formatter.source(r) for r in rows]
    if not d.target_column:  # a causal LM trained on the text alone: its loss and perplexity are the scores
        progress(len(rows))
        return metrics, [{"input": s} for s in sources]
    if run.task == "classification":
        predicted = _classify(run, batches, device)
        predictions = [labels[i] for i in predicted]
        references = [str(r[d.target_column]) for r in rows]
        metrics |= label_metrics(predictions, references)
        progress(len(rows))
    else:
        predictions = generate(run.model, run.tokenizer, sources, run.task, options.batch_size,
                               options.max_new_tokens, options.num_beams, d.max_source_length, on_batch=progress)
        references = [str(r[d.target_column]) for r in rows]
        metrics |= text_metrics(predictions, references)
    records = [{"input": s, "reference": r, "prediction": p} for s, r, p in zip(sources, references, predictions,
                                                                                 strict=True)]
    if d.pair_column:
        for record, row in zip(records, rows, strict=True):
            record["input_pair"] = str(row[d.pair_column])
    return metrics, records


@torch.no_grad()
def _classify(run: LoadedRun, batches, device) -> list[int]:
    return [i for b in batches for i in run.model(**{k: v.to(device) for k, v in b.items()}).logits.argmax(-1)
            .tolist()]


def evaluate(run: LoadedRun, checkpoint: Path, options: EvalOptions, show: bool = True) -> dict[str, dict]:
    """Metrics of the checkpoint (and of its base with --compare-base); files written under options.output."""
    rows = _rows(run, options)
    out = Path(options.output) if options.output else checkpoint / "eval"
    refuse_run_output(out, "--output", (checkpoint,), may_be_child_of=checkpoint)
    with output_lock(out, "eval"):
        out.mkdir(parents=True, exist_ok=True)
        return _evaluate_into(run, rows, options, checkpoint, out, show)


def _evaluate_into(run: LoadedRun, rows: list[dict], options: EvalOptions, checkpoint: Path, out: Path,
                   show: bool) -> dict[str, dict]:
    passes = [("adapter", contextlib.nullcontext)]
    if options.compare_base:
        passes.insert(0, ("base", lambda: adapters_disabled(run.model)))
    results: dict[str, dict] = {}
    with Progress(disable=not show) as bar:
        for name, context in passes:
            task = bar.add_task(f"eval {name}", total=len(rows))
            with context():
                metrics, records = _evaluate_once(run, rows, options, lambda n, t=task: bar.advance(t, n))
            results[name] = metrics
            suffix = "" if name == "adapter" else f"_{name}"
            write_text(out / f"predictions{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text(out / "metrics.json", json.dumps({"checkpoint": str(checkpoint), "examples": len(rows), **results},
                                                indent=2))
    if show:
        print_table(results, len(rows), out)
    return results


def print_table(results: dict[str, dict], examples: int, out: Path) -> None:
    table = Table(title=f"{examples} examples -> {out}")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for metric in next(iter(results.values())):
        table.add_row(metric, *(f"{results[n][metric]:.4f}" for n in results))
    Console().print(table)
