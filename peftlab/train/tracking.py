"""`run.report_to`: the run's metrics in the trackers people use (TensorBoard, MLflow, Weights & Biases,
trackio), each a callback that logs what metrics.jsonl logs, through the tracker's own library.

Tracking never loses a run: a tracker that fails (a server gone, a full disk) warns once and is dropped, and
the training goes on. A resumed run continues the same tracked run (its id is kept in `trackers.json` in
the run directory) without logging a step twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.io import write_text
from peftlab.train.callbacks import Callback, RunInfo

STATE_FILE = "trackers.json"  # each tracker's run id and the last step it logged
SCALARS = ("loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s", "step_time_s", "peak_memory_mb")


def grouped_grad_norms(norms: dict[str, float]) -> dict[str, float]:
    """Per-tensor gradient norms folded into one norm per kind and layer (`grad_norm/lora_A/encoder.3`), so a
    tracker's UI shows dozens of curves, not thousands: the L2 norm of the group's norms."""
    squares: dict[str, float] = {}
    for name, norm in norms.items():
        kind = name.split(".")[-1] if name.split(".")[-1].startswith(("lora_", "ia3_")) else "other"
        layer = re.search(r"(?:block|layers|layer|h)\.(\d+)\.", name)
        stack = next((s for s in ("encoder", "decoder") if f"{s}." in name), "")
        where = f"{stack}.{layer.group(1)}" if stack and layer else layer.group(1) if layer else "rest"
        key = f"grad_norm/{kind}/{where}"
        squares[key] = squares.get(key, 0.0) + norm * norm
    return {k: math.sqrt(v) for k, v in squares.items()}


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, as a tracker takes them."""
    found = {k: float(record[k]) for k in SCALARS if isinstance(record.get(k), int | float)}
    found |= {k: float(v) for k, v in record.items() if k.startswith("eval_") and isinstance(v, int | float)}
    return found | grouped_grad_norms(record.get("grad_norms") or {})


def flat_config(config: Any) -> dict[str, str]:
    """The resolved config as `section.key` -> text, as trackers take hyperparameters."""
    return {f"{section}.{key}": str(value) for section, values in config.to_dict().items()
            for key, value in values.items()}


def group_name(output: Path) -> str:
    """A sweep's name for its points (the sweep directory), else the run's own directory name."""
    return output.parent.name if (output.parent / "sweep.json").is_file() else output.name


class Tracker(Callback):
    """What every tracker does: the hooks call `begin`, `log` and `finish`, guarded so that a failure warns
    once and drops the tracker. Steps already logged by the run this one resumes are skipped."""

    name = ""
    package = ""

    def __init__(self) -> None:
        self.failed, self.last_step, self.output = False, 0, None
        self.state: dict[str, Any] = {}

    def _guard(self, action, *args) -> None:
        if self.failed:
            return
        try:
            action(*args)
        except Exception as e:  # a tracker must never stop the training
            self.failed = True
            text = " ".join(str(e).split())[:200] or type(e).__name__
            print(f"warning: {self.name} tracking stopped ({text}); the run goes on and metrics.jsonl has every "
                  "value", file=sys.stderr)

    def on_train_begin(self, run: RunInfo) -> None:
        self.output = run.output
        saved = read_state(run.output).get(self.name, {}) if run.start_step else {}
        self.last_step = saved.get("last_step", 0)
        self._guard(self.begin, run, saved)

    def on_log(self, record: dict[str, Any]) -> None:
        self._log(record)

    def on_evaluate(self, metrics: dict[str, Any]) -> None:
        if "step" in metrics:
            self._log(metrics)

    def _log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step <= self.last_step and self.last_step and not self.failed:
            return  # logged by the run this one resumes
        self._guard(self.log, scalars_of(record), step)
        if not self.failed:
            self.remember(last_step=step)

    def on_train_end(self, results: dict[str, Any]) -> None:
        self._guard(self.finish, results)

    def remember(self, **values: Any) -> None:
        """Keep this tracker's run id and progress in trackers.json, for a resumed run."""
        self.state.update(values)
        state = read_state(self.output)
        state[self.name] = {**state.get(self.name, {}), **self.state}
        write_text(self.output / STATE_FILE, json.dumps(state, indent=2))

    def begin(self, run: RunInfo, saved: dict[str, Any]) -> None: ...

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, results: dict[str, Any]) -> None: ...


def read_state(output: Path) -> dict[str, Any]:
    try:
        return json.loads((output / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


class TensorBoard(Tracker):
    """Event files under <run>/tensorboard/ (torch.utils.tensorboard); a resumed run purges the steps it
    logs again."""

    name, package = "tensorboard", "tensorboard"

    def begin(self, run: RunInfo, saved: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = run.start_step + 1 if run.start_step else None  # what the earlier run logged after its checkpoint
        self.writer = SummaryWriter(str(run.output / "tensorboard"), purge_step=purge)
        if not run.start_step:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(run.config).items()))
        self.last_step = 0  # the purge drops those steps, so they are logged again

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, results: dict[str, Any]) -> None:
        self.writer.add_scalar("trainable_params", results["trainable_params"], results["steps"])
        self.writer.add_scalar("all_params", results["all_params"], results["steps"])
        self.writer.close()

    def close(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class MLflow(Tracker):
    """A run in MLFLOW_TRACKING_URI (MLflow's default store where unset), in the experiment
    MLFLOW_EXPERIMENT_NAME, else the sweep's (or the run's) name; the adapter is logged as an artifact."""

    name, package = "mlflow", "mlflow"

    def begin(self, run: RunInfo, saved: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or group_name(run.output)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run.output.name).info.run_id
        self.remember(run_id=self.run_id)
        params = [Param(k, v[:6000]) for k, v in flat_config(run.config).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keys = {k: re.sub(r"[^\w./ -]", "_", k) for k in scalars}  # MLflow's allowed characters
        self.client.log_batch(self.run_id, metrics=[Metric(keys[k], v, now, step) for k, v in scalars.items()])

    def finish(self, results: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param("trainable_params", str(results["trainable_params"])),
                                                   Param("all_params", str(results["all_params"]))])
        for path in adapter_files(self.output):
            self.client.log_artifact(self.run_id, str(path), "adapter")
        self.client.set_terminated(self.run_id)


class Wandb(Tracker):
    """A W&B run (WANDB_PROJECT, WANDB_MODE: offline works without network), grouped by sweep; the adapter is
    logged as a model artifact."""

    name, package = "wandb", "wandb"

    def begin(self, run: RunInfo, saved: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftlab"), dir=str(run.output),
                              id=saved.get("run_id"), resume="allow", group=group_name(run.output),
                              name=run.output.name, config=run.config.to_dict(), reinit="create_new")
        self.remember(run_id=self.run.id)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, results: dict[str, Any]) -> None:
        import wandb

        self.run.summary.update({"trainable_params": results["trainable_params"], "all_params": results["all_params"]})
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{self.output.name}-adapter"), type="model")
        for path in adapter_files(self.output):
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)
        self.run.finish()

    def close(self) -> None:
        if hasattr(self, "run") and self.failed:
            self.run.finish(exit_code=1)


class Trackio(Tracker):
    """A local trackio project (trackio.init / log / finish), named by the sweep or the run."""

    name, package = "trackio", "trackio"

    def begin(self, run: RunInfo, saved: dict[str, Any]) -> None:
        import trackio

        self.run = trackio.init(project=group_name(run.output), name=run.output.name, config=flat_config(run.config),
                                resume="allow" if saved else "never")
        self.remember(run_id=run.output.name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        import trackio

        trackio.log(scalars, step=step)

    def finish(self, results: dict[str, Any]) -> None:
        import trackio

        trackio.finish()


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, MLflow, Wandb, Trackio)}


def adapter_files(output: Path) -> list[Path]:
    """The run's result files (adapter or model, its config, the tokenizer): what an artifact holds."""
    return sorted(child for child in output.iterdir() if child.is_file() and child.name.startswith(
        ("adapter_", "model.safetensors", "config.json", "tokenizer", "special_tokens")))


def make_trackers(names: list[str]) -> list[Tracker]:
    """The callbacks of run.report_to; a tracker whose library is missing is a one-line error naming the extra."""
    import importlib.util

    trackers = []
    for name in names:
        if name not in TRACKERS:
            raise PeftlabError(f"run.report_to: unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.package) is None:
            raise PeftlabError(f"run.report_to {name} needs the {tracker.package} package: pip install "
                               f"'peftlab[{name}]' (or 'peftlab[tracking]' for every tracker)")
        trackers.append(tracker())
    return trackers
