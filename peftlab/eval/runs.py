"""Open what `peftlab train` (or peft) saved: the base model it names, with the adapter or weights loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods import METHODS
from peftlab.methods.checkpoint import CONFIG_NAME, load_adapter, read_adapter_config
from peftlab.models import load_model, resolve_task
from peftlab.train.config import TrainConfig, load_config

TASK_TYPES = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal", "SEQ_CLS": "classification"}


@dataclass
class LoadedRun:
    model: nn.Module
    tokenizer: object
    task: str
    base_name: str
    config: TrainConfig | None  # the run's config.yaml, when the checkpoint came from `peftlab train`


def run_config(path: Path) -> TrainConfig | None:
    """config.yaml beside the checkpoint, or in the run directory above a checkpoint-<step>."""
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    return None


def load_run(path: str | Path, model_name: str | None = None, adapter: str = "default") -> LoadedRun:
    """The model of a checkpoint directory: base from the adapter's config (or --model), adapter loaded."""
    path = Path(path)
    if not path.is_dir():
        raise PeftlabError(f"checkpoint {path} does not exist: pass -p a run directory or its checkpoint-<step>")
    config = run_config(path)
    if (path / CONFIG_NAME).is_file():
        adapter_config = read_adapter_config(path)
        base = model_name or adapter_config.base_model_name_or_path or (config.model.name if config else None)
        if not base:
            raise PeftlabError(f"{path / CONFIG_NAME} names no base model: pass --model")
        task = _task(config, base, TASK_TYPES.get(adapter_config.task_type or ""))
        model, tokenizer = _load_base(base, task, config, named=model_name is not None)
        trained_as = METHODS.get(config.method.name) if config else None
        if trained_as is not None and trained_as is not type(adapter_config) and issubclass(trained_as,
                                                                                        type(adapter_config)):
            # the file's format is its parent's (a QLoRA adapter is a LoRA file): load it as the run trained it
            adapter_config = trained_as(**dataclasses.asdict(adapter_config))
        load_adapter(model, path, adapter, adapter_config)
    elif (path / "model.safetensors").is_file() and config is not None:
        from safetensors.torch import load_model as load_weights

        base = model_name or config.model.name
        task = _task(config, base, None)
        model, tokenizer = _load_base(base, task, config, named=model_name is not None)
        load_weights(model, path / "model.safetensors")
    else:
        raise PeftlabError(f"no adapter in {path}: expected {CONFIG_NAME} (an adapter) or model.safetensors "
                           "with the run's config.yaml (full fine-tuning)")
    return LoadedRun(model.eval(), tokenizer, task, base, config)


def _load_base(base: str, task: str, config: TrainConfig | None, named: bool):
    try:
        return load_model(base, task=task, num_labels=_num_labels(config),
                          overrides=config.model.overrides if config else None)
    except PeftlabError as e:
        if named:
            raise
        raise PeftlabError(f"{e}; or pass --model with the base this was trained on (the run names {base!r})") from None


def _task(config: TrainConfig | None, base: str, from_adapter: str | None) -> str:
    if config and config.model.task:
        return config.model.task
    return from_adapter or resolve_task(base)


def _num_labels(config: TrainConfig | None) -> int:
    return max(len(config.data.labels or []), 2) if config else 2
