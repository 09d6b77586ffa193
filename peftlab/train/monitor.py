"""What a run reports: the HF-Trainer-style log line, metrics.jsonl, per-module gradient norms, a progress bar."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.io import write_text


def log_line(loss: float, grad_norm: float, learning_rate: float, epoch: float) -> str:
    """The seed's line, as HF Trainer prints it: `{'loss': 31.0025, 'grad_norm': 1.39..., ...}`."""
    return str({"loss": round(loss, 4), "grad_norm": grad_norm, "learning_rate": learning_rate,
                "epoch": round(epoch, 2)})


def module_grad_norms(model: nn.Module, norms: Mapping[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each trainable tensor's gradient (`norms`: `lean.gradient_norms`, by parameter), keyed by its
    name without the adapter name (`encoder.block.0.layer.0.SelfAttention.q.lora_A`)."""
    named = {}
    for name, p in model.named_parameters():
        if (norm := norms.get(p)) is not None:
            key = re.sub(r"\.(lora_\w+)\.[^.]+\.weight$", r".\1", name)
            named[key] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP shards
    return named


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of an append-only JSON-lines log. A last line cut short (a killed run leaves one) is skipped
    with a warning; a bad line before it is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise PeftlabError(f"{path} line {number} is not valid JSON: fix or remove that line") from None
            print(f"warning: {path}: skipped its last line, cut short (the run was stopped while writing it)",
                  file=sys.stderr)
    return records


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl (flushed at once, so a crash keeps what was logged).
    `resumed_at`: the step a resumed run continues from; what the earlier run logged after it is dropped (the
    resumed run logs those steps again), so every step appears once."""

    def __init__(self, path: Path, resumed_at: int | None = None) -> None:
        if resumed_at is not None and path.is_file():
            kept = [json.dumps(r) + "\n" for r in read_log(path) if r.get("step", 0) <= resumed_at]
            write_text(path, "".join(kept))
        self.file = open(path, "w" if resumed_at is None else "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressReporter:
    """A rich progress bar with ETA on a terminal; plain printed lines otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool | None = None) -> None:
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.progress = None
        if self.enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.task = self.progress.add_task("training", total=total, completed=start, start=False)
            self.progress.start()

    def advance(self) -> None:
        if self.progress:
            self.progress.start_task(self.task)  # the clock starts at the first step, after any validation
            self.progress.advance(self.task)

    @contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A second bar for a pass inside the run (validation), removed when the pass ends; yields `advance`."""
        if not self.progress:
            yield lambda: None
            return
        task = self.progress.add_task(description, total=total)
        try:
            yield lambda: self.progress.advance(task)
        finally:
            self.progress.remove_task(task)

    def print(self, text: str) -> None:
        if self.progress:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)))
