"""Everything a run needs before its first step: device, model with its method applied, encoded data."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch import nn

from peftlab.data.loading import load_table, require_columns
from peftlab.data.tasks import Formatter, required_columns
from peftlab.errors import PeftlabError
from peftlab.io import file_in_the_way, fsync_path, move_files_into, temp_dir_beside
from peftlab.methods import build_config
from peftlab.methods.checkpoint import save_adapter
from peftlab.methods.inject import CLASSIFIER_HEADS, apply
from peftlab.train.config import TrainConfig, changed_settings, load_config
from peftlab.train.state import list_checkpoints

RUN_FILES = ("config.yaml", "metrics.jsonl", "adapter_config.json", "model.safetensors")  # these mark a run
# what a run writes at its root (trackers' folders included): --overwrite replaces exactly these
RUN_OUTPUTS = (*RUN_FILES, "adapter_model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
               "results.json", "trackers.json", "tensorboard", "wandb")


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


REPLACED = ".replaced-run"  # where --overwrite keeps the old run until the new one has finished


def check_output(cfg: TrainConfig) -> Path:
    """The run directory, checked before the run reads anything (every process): it refuses to mix two runs
    unless --overwrite or --resume, and an output that cannot be a directory."""
    out = Path(cfg.run.output)
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--output {out} is a file, not a directory: choose another --output")
    if blocking := file_in_the_way(out):
        raise PeftlabError(f"--output {out}: {blocking} is a file, not a directory: choose another --output")
    if _holds_run(out) and not (cfg.run.overwrite or cfg.run.resume):
        raise PeftlabError(f"{out} already holds a run: pass --overwrite to replace it, --resume to continue it, "
                           "or choose another --output")
    if cfg.run.overwrite and not cfg.run.resume and (out / REPLACED).exists():
        raise PeftlabError(f"{out / REPLACED} holds the run an interrupted --overwrite was replacing: move it "
                           "elsewhere (or delete it if it is not needed), then run again")
    return out


def _holds_run(out: Path) -> bool:
    return out.is_dir() and (any((out / f).exists() for f in RUN_FILES) or bool(list_checkpoints(out)))


def _run_outputs(out: Path) -> list[Path]:
    """What a run wrote at its root: its files, its checkpoints and any checkpoint left half-written."""
    checkpoints = set(list_checkpoints(out))
    return [child for child in out.iterdir() if child.name in RUN_OUTPUTS or child in checkpoints
            or (child.name.startswith(".checkpoint-") and child.name.endswith(".tmp"))]


@contextmanager
def replacing_output(cfg: TrainConfig, enabled: bool = True) -> Iterator[None]:
    """The run directory opened for writing (`open_output`) around the run; if the run fails, the run it was
    replacing comes back (`restore_replaced`), and once it finishes that run goes (`drop_replaced`)."""
    out = Path(cfg.run.output)
    aside = open_output(cfg) if enabled else None
    try:
        yield
    except BaseException:
        if enabled and (note := restore_replaced(out, aside)):
            print(f"peftlab: {note}", file=sys.stderr)
        raise
    if enabled:
        drop_replaced(out)


def open_output(cfg: TrainConfig) -> Path | None:
    """Create the run directory; with --overwrite, move the old run's files into `REPLACED` (returned) instead
    of deleting them: they come back if the new run fails before its first checkpoint (`restore_replaced`)
    and are deleted only once it has finished (`drop_replaced`). Files a run does not write stay as they are."""
    out = check_output(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not (_holds_run(out) and cfg.run.overwrite and not cfg.run.resume):
        return None
    aside = out / REPLACED
    aside.mkdir()
    for child in _run_outputs(out):
        os.replace(child, aside / child.name)
    fsync_path(out)
    return aside


def restore_replaced(out: Path, aside: Path | None) -> str | None:
    """After a failed run: put the replaced run back unless the new one saved a checkpoint (then both stay,
    and the new one can be resumed); returns what to tell the user."""
    if aside is None or not aside.is_dir():
        return None
    if list_checkpoints(out):
        return f"the run --overwrite was replacing is kept in {aside} until this one finishes"
    for child in _run_outputs(out):
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in aside.iterdir():
        os.replace(child, out / child.name)
    aside.rmdir()
    return f"the run --overwrite was replacing is back in {out}"


def drop_replaced(out: Path) -> None:
    """The new run has finished: the run it replaced goes."""
    shutil.rmtree(out / REPLACED, ignore_errors=True)


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
    saved["method"], now["method"] = saved_config.resolved_method(), cfg.resolved_method()
    changed = changed_settings(saved, now, ["model", "method"])
    if changed:
        raise PeftlabError(f"--resume: {'; '.join(changed)} (against {saved_path}): resume with the run's own "
                           "settings, or start a new run in another --output")


def apply_method(model: nn.Module, cfg: TrainConfig, task: str) -> nn.Module:
    """The configured method through the shared injection (`full`: every weight trains, nothing injected)."""
    m = cfg.method
    if getattr(model, "peftlab_adapters", None):  # the caller applied a method already
        return model
    modules_to_save = m.modules_to_save
    if modules_to_save is None and task == "classification":
        modules_to_save = [h for h in CLASSIFIER_HEADS if hasattr(model, h)][:1]
    config = build_config(m.name, model.config.model_type,
                          **{**cfg.method_fields(), "modules_to_save": modules_to_save})
    model = apply(model, config)
    widths = [min(layer.in_features, layer.out_features) for layer in model.modules()
              if hasattr(layer, "lora_A") and hasattr(layer, "in_features")]
    if widths and getattr(config, "r", 0) > max(widths):
        print(f"warning: rank {config.r} is above the width of every adapted layer (at most {max(widths)}): a rank "
              f"beyond {max(widths)} adds parameters but no capacity")
    return model


def save_final(model: nn.Module, out: Path, tokenizer) -> None:
    """The run's final weights and tokenizer, written beside the run and renamed into it file by file (the
    tokenizer's own writer is not atomic)."""
    with temp_dir_beside(out / "final") as tmp:
        save_trained(model, tmp, tokenizer)
        move_files_into(tmp, out)


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


def as_table(data, source: str | None, column_names: list[str] | None, what: str,
             split: str = "train") -> tuple[datasets.Dataset, str]:
    """A datasets.Dataset and a name for messages: from the data given (a Dataset, a list of dicts, a file path)
    or from the config's `source`."""
    if data is None or isinstance(data, str | Path):
        path = str(data if data is not None else source)
        return load_table(path, split=split, column_names=column_names), path
    if isinstance(data, datasets.Dataset):
        table = data
    elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
        table = datasets.Dataset.from_list(data)
    else:
        raise PeftlabError(f"{what} must be a datasets.Dataset, a DatasetDict, a list of dicts or a file path, got "
                           f"{type(data).__name__}")
    if len(table) == 0:
        raise PeftlabError(f"{what} is empty: it needs at least one example")
    return table, what


def describe_given_model(cfg: TrainConfig, model: nn.Module) -> None:
    """A model object handed to the Trainer: config.yaml names its base (what eval -p rebuilds) and, where a
    method is applied already, that method and its settings."""
    cfg.model.name = getattr(model.config, "name_or_path", None) or cfg.model.name
    for adapter in getattr(model, "peftlab_adapters", {}).values():
        cfg.method.name = adapter.method
        for key, value in dataclasses.asdict(adapter).items():
            if hasattr(cfg.method, key) and value is not None and key != "name":
                setattr(cfg.method, key, value)


@dataclass
class EncodedData:
    train: list[dict]
    validation: list[dict]
    formatter: Formatter
    validation_rows: list[dict]  # as read: what generation starts from, and what its predictions are scored against


def read_tables(cfg: TrainConfig, train=None, validation=None):
    """Train and validation tables, checked for the needed columns; validation held out if not given. `train`
    and `validation`, where given, are the data itself (a datasets.Dataset or DatasetDict, a list of dicts, or
    a file), in place of data.train and data.validation."""
    d = cfg.data
    formatter_columns = required_columns(d.template, d.input_column, d.target_column, d.pair_column)
    if isinstance(train, datasets.DatasetDict):
        train, validation = train["train"], validation or next((train[s] for s in ("validation", "test") if s in train),
                                                               None)
    table, name = as_table(train, d.train, d.column_names, "the training data")
    require_columns(table, formatter_columns, name)
    if validation is not None or d.validation:
        validation, val_name = as_table(validation, d.validation, d.column_names, "the validation data", "validation")
        require_columns(validation, formatter_columns, val_name)
        return table, validation
    if len(table) < 2:
        raise PeftlabError(f"{name} has {len(table)} example: need at least 2 to hold out validation, "
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
    if all(not formatter.source(row).strip() for row in tables[0]):  # stops at the first text that has words
        print(f"warning: all {len(train)} training texts are empty after formatting: check --input-column or "
              "--template")
    if truncated_train:
        print(f"warning: {truncated_train} texts (sources or targets) of {len(train)} training examples were cut to "
              f"max_source_length={d.max_source_length} / max_target_length={d.max_target_length}")
    return EncodedData(train, validation, formatter, list(tables[1]))


def label_set(cfg: TrainConfig, table) -> list[str]:
    """The classes: data.labels, or the sorted labels seen in training. Labels are all numbers or all names (a
    mix, such as 0, 1 and "negative", would silently make extra classes); one class is warned about."""
    d = cfg.data
    values = table[d.target_column]
    if (missing := next((i for i, v in enumerate(values) if v is None or str(v).strip() == ""), None)) is not None:
        raise PeftlabError(f"{d.train}: example {missing + 1} has no {d.target_column!r} label: fill it in or drop it")
    seen = sorted({str(v) for v in values})
    if d.labels:
        labels = [str(x) for x in d.labels]
        if unknown := [v for v in seen if v not in labels]:
            raise PeftlabError(f"{d.train}: label(s) {unknown[:5]} are not in data.labels {labels}: add them there "
                               "or fix the data")
        return labels
    numbers = [v for v in seen if _is_number(v)]
    if numbers and len(numbers) < len(seen):
        names = [v for v in seen if not _is_number(v)]
        raise PeftlabError(f"{d.train}: the {d.target_column!r} column mixes numbers ({', '.join(numbers[:3])}) and "
                           f"names ({', '.join(names[:3])}): write every label the same way, or list the classes in "
                           "data.labels")
    if len(seen) < 2:
        print(f"warning: every training example has the label {seen[0]!r}: the model can only learn that one class")
    return seen


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_trained(model: nn.Module, directory: Path) -> None:
    """Restore what `save_trained` wrote into a model prepared the same way."""
    if getattr(model, "peftlab_adapters", None):
        from peftlab.methods.checkpoint import read_adapter_weights
        from peftlab.methods.inject import load_adapter_state_dict

        load_adapter_state_dict(model, read_adapter_weights(directory))
    else:
        from safetensors.torch import load_model

        load_model(model, directory / "model.safetensors")
