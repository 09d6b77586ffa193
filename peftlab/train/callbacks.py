"""What a run tells the outside world, as callbacks: metrics.jsonl and the progress bar are two of them, and a
user's own (`peftlab.Trainer(callbacks=[...])`) see the same events in the same order.

Hooks, in the order a run calls them: `on_train_begin`, then per optimizer step `on_step_end` (and
`on_log` on a logging step, `on_evaluate` after a validation pass, `on_save` after a checkpoint), and
`on_train_end` once the final adapter is saved. Under torchrun only rank 0 calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.train.monitor import MetricsLog, ProgressReporter, log_line


@dataclass
class RunInfo:
    """What a callback may want to know about the run it watches."""

    output: Path
    total_steps: int
    start_step: int  # > 0 when resumed
    config: Any  # the TrainConfig
    model: Any


class Callback:
    """Override the hooks you need; each gets plain values (dicts of floats, paths)."""

    def on_train_begin(self, run: RunInfo) -> None: ...

    def on_step_end(self, step: int) -> None: ...

    def on_log(self, record: dict[str, Any]) -> None: ...

    def on_evaluate(self, metrics: dict[str, Any]) -> None: ...

    def on_save(self, checkpoint: Path) -> None: ...

    def on_train_end(self, results: dict[str, Any]) -> None: ...

    @contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A pass inside the run (validation) of `total` batches; yields what to call after each."""
        yield lambda: None


class Callbacks(Callback):
    """Several callbacks as one, called in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def on_train_begin(self, run: RunInfo) -> None:
        self._each("on_train_begin", run)

    def on_step_end(self, step: int) -> None:
        self._each("on_step_end", step)

    def on_log(self, record: dict[str, Any]) -> None:
        self._each("on_log", record)

    def on_evaluate(self, metrics: dict[str, Any]) -> None:
        self._each("on_evaluate", metrics)

    def on_save(self, checkpoint: Path) -> None:
        self._each("on_save", checkpoint)

    def on_train_end(self, results: dict[str, Any]) -> None:
        self._each("on_train_end", results)

    def close(self) -> None:
        """Whatever happened (a failed or interrupted run too): bars stop, files close."""
        for callback in self.callbacks:
            if hasattr(callback, "close"):
                callback.close()

    @contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        with ExitStack() as stack:
            steps = [stack.enter_context(c.phase(description, total)) for c in self.callbacks]

            def advance() -> None:
                for step in steps:
                    step()

            yield advance


class MetricsFile(Callback):
    """metrics.jsonl: one JSON object per log line and per evaluation (the final one marked "final")."""

    def __init__(self) -> None:
        self.log: MetricsLog | None = None

    def on_train_begin(self, run: RunInfo) -> None:
        self.log = MetricsLog(run.output / "metrics.jsonl", resumed_at=run.start_step or None)

    def on_log(self, record: dict[str, Any]) -> None:
        self.log.write(record)

    def on_evaluate(self, metrics: dict[str, Any]) -> None:
        if "step" in metrics:  # eval_before has no step: it goes to results.json
            self.log.write(metrics)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class ProgressBar(Callback):
    """A rich bar with ETA on a terminal (plain printed lines otherwise) and the seed's log line per log step."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled, self.bar = enabled, None

    def on_train_begin(self, run: RunInfo) -> None:
        self.bar = ProgressReporter(run.total_steps, start=run.start_step, enabled=self.enabled)

    def on_step_end(self, step: int) -> None:
        self.bar.advance()

    def on_log(self, record: dict[str, Any]) -> None:
        self.bar.print(log_line(record["loss"], record["grad_norm"], record["learning_rate"], record["epoch"]))

    def on_evaluate(self, metrics: dict[str, Any]) -> None:
        if "step" in metrics and not metrics.get("final"):
            self.bar.print(str(metrics))

    @contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        with self.bar.phase(description, total) as advance:
            yield advance

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
