"""Everything a run needs before its first step: device, model with its method applied, encoded data."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftlab.data.loading import load_table, require_columns
from peftlab.data.tasks import Formatter, required_columns
from peftlab.errors import PeftlabError
from peftlab.methods import build_config
from peftlab.methods.checkpoint import save_adapter
from peftlab.methods.inject import CLASSIFIER_HEADS, apply
from peftlab.train.config import TrainConfig, changed_settings, load_config

RUN_FILES = ("config.yaml", "metrics.jsonl", "adapter_config.json", "model.safetensors")  # these mark a run
RUN_OUTPUTS = (*RUN_FILES, "adapter_model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
               "results.json")  # everything a run writes at its root; --overwrite removes exactly these


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PeftlabError(f"device {name} requested but CUDA is not available: use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PeftlabError("device mps requested but MPS is not available: use --device cpu or auto")
    return torch.device(name)


def prepare_output(cfg: TrainConfig, create: bool = True) -> Path:
    """The run directory; refuses to mix two runs unless --overwrite (clears ours) or --resume.
    With create=False it only checks (every process, before the run reads anything)."""
    out = Path(cfg.run.output)
    holds_run = out.is_dir() and any((out / f).exists() for f in RUN_FILES)
    if holds_run and not (cfg.run.overwrite or cfg.run.resume):
        raise PeftlabError(f"{out} already holds a run: pass --overwrite to replace it, --resume to continue it, "
                           "or choose another --output")
    if not create:
        return out
    if holds_run and cfg.run.overwrite and not cfg.run.resume:
        for child in out.iterdir():
            if child.name.startswith("checkpoint-"):
                shutil.rmtree(child)
            elif child.name in RUN_OUTPUTS:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def absolute_local_paths(cfg: TrainConfig) -> None:
    """A local model directory and data files as absolute paths (hub ids stay as they are): config.yaml and
    the adapter's base_model_name_or_path then name them from any directory."""
    d = cfg.data
    d.train, d.validation = (str(Path(f).resolve()) if f and Path(f).is_file() else f for f in (d.train, d.validation))
    if Path(cfg.model.name).is_dir():
        cfg.model.name = str(Path(cfg.model.name).resolve())


def check_resumable(cfg: TrainConfig, checkpoint: Path) -> None:
    """A resumed run continues the same model and method: refuse settings that would change what its weights are."""
    saved_path = checkpoint.parent / "config.yaml"
    if not saved_path.is_file():
        return
    saved_config = load_config(saved_path)
    absolute_local_paths(saved_config)  # as this run's own were made (a run saved before that kept them relative)
    saved, now = saved_config.to_dict(), cfg.to_dict()
    changed = changed_settings(saved, now, ["model", "method"])
    if changed:
        raise PeftlabError(f"--resume: {'; '.join(changed)} (against {saved_path}): resume with the run's own "
                           "settings, or start a new run in another --output")


def apply_method(model: nn.Module, cfg: TrainConfig, task: str) -> nn.Module:
    """The configured method through the shared injection; `full` trains every weight."""
    m = cfg.method
    if m.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    modules_to_save = m.modules_to_save
    if modules_to_save is None and task == "classification":
        modules_to_save = [h for h in CLASSIFIER_HEADS if hasattr(model, h)][:1]
    fields = {k: v for k, v in dataclasses.asdict(m).items() if k != "name"}
    config = build_config(m.name, model.config.model_type, **{**fields, "modules_to_save": modules_to_save})
    return apply(model, config)


def save_trained(model: nn.Module, directory: Path, tokenizer=None) -> None:
    """The adapter in peft's format, or for full fine-tuning the whole model as safetensors + config."""
    if getattr(model, "peftlab_adapters", None):
        save_adapter(model, directory)
    else:
        from safetensors.torch import save_model

        from peftlab.io import atomic_write

        atomic_write(directory / "model.safetensors", lambda tmp: save_model(model, tmp))
        model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@dataclass
class EncodedData:
    train: list[dict]
    validation: list[dict]
    formatter: Formatter


def read_tables(cfg: TrainConfig):
    """Train and validation tables, checked for the needed columns; validation held out if not given."""
    d = cfg.data
    formatter_columns = required_columns(d.template, d.input_column, d.target_column, d.pair_column)
    table = load_table(d.train, column_names=d.column_names)
    require_columns(table, formatter_columns, d.train)
    if d.validation:
        validation = load_table(d.validation, split="validation", column_names=d.column_names)
        require_columns(validation, formatter_columns, d.validation)
        return table, validation
    if len(table) < 2:
        raise PeftlabError(f"{d.train} has {len(table)} example: need at least 2 to hold out validation, "
                           "or pass --validation-data")
    split = table.train_test_split(test_size=d.validation_fraction, seed=cfg.run.seed)
    return split["train"], split["test"]


def encode(cfg: TrainConfig, tokenizer, task: str, tables, labels: list[str]) -> EncodedData:
    d = cfg.data
    formatter = Formatter.for_data(task, tokenizer, d, labels)
    train = formatter.encode_all(tables[0])
    truncated_train = formatter.truncated
    validation = formatter.encode_all(tables[1])
    if d.pack:
        print(f"Packed {len(tables[0])} training texts into {len(train)} blocks of {d.max_source_length} tokens")
    if truncated_train:
        print(f"warning: {truncated_train} texts (sources or targets) of {len(train)} training examples were cut to "
              f"max_source_length={d.max_source_length} / max_target_length={d.max_target_length}")
    return EncodedData(train, validation, formatter)


def label_set(cfg: TrainConfig, table) -> list[str]:
    return list(cfg.data.labels) if cfg.data.labels else sorted({str(x) for x in table[cfg.data.target_column]})


def load_trained(model: nn.Module, directory: Path) -> None:
    """Restore what `save_trained` wrote into a model prepared the same way."""
    if getattr(model, "peftlab_adapters", None):
        from peftlab.methods.checkpoint import read_adapter_weights
        from peftlab.methods.inject import load_adapter_state_dict

        load_adapter_state_dict(model, read_adapter_weights(directory))
    else:
        from safetensors.torch import load_model

        load_model(model, directory / "model.safetensors")
