"""`peftlab.Trainer`: training from Python with your own model, tokenizer and data, writing the run directory
`peftlab train` writes.

    trainer = peftlab.Trainer(model, tokenizer, rows, config={"method": {"name": "lora", "r": 8},
                                                              "run": {"output": "runs/x", "max_steps": 200}})
    result = trainer.train()          # result.model is the trained model; runs/x holds the adapter and logs
    trainer.evaluate()                # eval -p runs/x
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from peftlab.errors import PeftlabError
from peftlab.train.callbacks import Callback
from peftlab.train.config import TrainConfig, from_dict, load_config
from peftlab.train.loop import Inputs, RunResult, train


def as_config(config: TrainConfig | dict | str | Path | None) -> TrainConfig:
    """A TrainConfig from the dataclass itself, a dict of sections ({"method": {"r": 8}}) or of dotted keys
    ({"method.r": 8}), or a YAML path."""
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return copy.deepcopy(config)
    if isinstance(config, str | Path):
        return load_config(config)
    if isinstance(config, dict):
        return from_dict(config)
    raise PeftlabError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")


class Trainer:
    """Fine-tune `model` (a transformers model, with or without a peftlab method applied; None: the config's
    model.name) on `train_data` (a datasets.Dataset or DatasetDict, a list of dicts, or a file; None: the
    config's data.train). `compute_metrics(predictions, references) -> {name: value}` is called at every
    validation with the generated texts (or predicted labels) and the targets; its values are logged as
    `eval_<name>`. `callbacks` get every event of the run (`peftlab.train.callbacks.Callback`)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, train_data: Any = None, eval_data: Any = None,
                 config: TrainConfig | dict | str | Path | None = None,
                 compute_metrics: Callable[[list, list], dict[str, float]] | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        if model is not None and tokenizer is None:
            raise PeftlabError("a model object needs its tokenizer: Trainer(model, tokenizer, ...)")
        self.config = as_config(config)
        self.model, self.tokenizer = model, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.compute_metrics, self.callbacks = compute_metrics, list(callbacks)
        self.result: RunResult | None = None

    def train(self, progress: bool | None = None) -> RunResult:
        """Train as configured; writes config.yaml, metrics.jsonl, the adapter (or model), results.json and
        checkpoints under run.output. The returned result holds the logs, evaluations and the trained model."""
        config = copy.deepcopy(self.config)  # a run fills in paths and labels: the Trainer's config stays as given
        inputs = Inputs(self.model, self.tokenizer, self.train_data, self.eval_data, self.compute_metrics,
                        self.callbacks)
        self.result = train(config, progress, inputs)
        self.model = self.result.model
        return self.result

    def evaluate(self, data: Any = None, **options: Any) -> dict[str, float]:
        """Score the trained run as `peftlab eval -p RUN` does (generation metrics, loss); `data` a file, a Dataset
        or a list of dicts (default: the eval_data given, else the run's validation file); `options` as
        `peftlab.evaluate`'s."""
        if self.result is None:
            raise PeftlabError("nothing trained yet: call trainer.train() first")
        from peftlab.eval.api import evaluate

        data = data if data is not None else self.eval_data
        if isinstance(data, datasets.DatasetDict):
            data = next((data[s] for s in ("validation", "test") if s in data), None)
        return evaluate(self.result.output, data, **options)["adapter"]
