"""The training config: one dataclass tree, read from YAML, overridden by flags and `key=value` pairs."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import PeftlabError, first_line
from peftlab.io import load_yaml
from peftlab.methods import METHODS, check_pattern
from peftlab.train.products import BACKENDS


@dataclass
class ModelSection:
    name: str = "random:t5-tiny"  # hub id | local dir | random:<preset> | minilm
    task: str | None = None  # seq2seq | causal | classification; default: from the model
    overrides: dict | None = None  # model config fields, e.g. {dropout_rate: 0.0} for T5, {hidden_dropout_prob: 0}


@dataclass
class DataSection:
    train: str | None = None  # jsonl/json/csv/tsv/parquet file, or a hub dataset id
    validation: str | None = None  # default: hold out validation_fraction of train
    validation_fraction: float = 0.1
    column_names: list[str] | None = None  # a CSV/TSV without a header row: its columns' names, in order
    input_column: str = "text"
    target_column: str | None = "label"  # the label column for classification
    template: str | None = None  # e.g. "summarize: {dialogue}"
    pair_column: str | None = None  # classification of text pairs: the second text (e.g. RTE's sentence2)
    pack: bool = False  # causal LM on text alone (target_column ''): texts joined, cut into max_source_length blocks
    labels: list[str] | None = None  # classification label set; default: sorted labels seen in train
    max_source_length: int = 128
    max_target_length: int = 64
    group_by_length: bool = True


@dataclass
class MethodSection:
    name: str = "lora"  # lora | dora | qlora | ia3 | ln_tuning | bitfit | houlsby | prompt_tuning | said | did | full
    r: int = 8  # lora, dora
    alpha: float = 16  # lora, dora
    targets: list[str] | str | None = None  # default: per method and model type (lora: attention q and v)
    dropout: float = 0.05  # lora, dora
    bias: str = "none"  # lora, dora
    use_rslora: bool = False  # lora, dora
    modules_to_save: list[str] | None = None  # default for classification: the head
    feedforward: list[str] | None = None  # ia3: targets whose input is scaled (default per model type)
    bottleneck: int = 64  # houlsby: the adapter's inner size m
    num_virtual_tokens: int = 20  # prompt_tuning: length of the soft prompt
    d: int = 1000  # said, did: the subspace (intrinsic) dimension
    parameters: str = ".*"  # said, did: the parameters moved in the subspace (regex over parameter names)


@dataclass
class OptimSection:
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class RunSection:
    output: str = "runs/run"
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1
    max_steps: int | None = None  # overrides epochs
    logging_steps: int = 10
    eval_steps: int | None = None  # default: once at the end
    eval_before: bool = True  # score the validation set before the first step too
    save_steps: int | None = None  # default: only the final adapter
    save_total_limit: int = 2
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast where the device supports it)
    gradient_checkpointing: bool = False
    chunked_loss: bool = True  # LM loss without the full logits tensor (same math; see train/loss.py)
    lean_kernels: bool = True  # cheaper dropout masks, fused GELU/attention saving less (same math; train/lean.py)
    redraw_masks: bool = False  # dropout masks drawn again in backward, not kept (less memory, slower; recompute.py)
    recompute_linear: bool = False  # T5's q, k, v, gate and up recomputed in backward (less memory, slower; lean.py)
    # auto | torch | onednn: fp32 CPU linear products (auto: oneDNN on x86 CPUs not made by Intel, where MKL is
    # slower; same math, train/products.py)
    linear_backend: str = "auto"
    resume: str | None = None  # a checkpoint dir, or "latest"
    distributed: str = "ddp"  # ddp | fsdp: how several processes (torchrun, --nproc) share the work
    overwrite: bool = False


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> TrainConfig:
        for key, value in self.numbers():
            if not math.isfinite(value):
                raise PeftlabError(f"{key} must be a finite number, got {value}")
        m = self.method
        checks = [
            (m.r >= 1, "method.r (the rank) must be at least 1"),
            (m.alpha > 0, "method.alpha must be > 0 (the seed uses 2 * r)"),
            (0 <= m.dropout < 1, "method.dropout must be in [0, 1)"),
            (m.bottleneck >= 1 and m.num_virtual_tokens >= 1 and m.d >= 1,
             "method.bottleneck, method.num_virtual_tokens and method.d must be at least 1"),
            (0 <= self.run.seed < 2**32, f"run.seed must be in [0, {2**32 - 1}], got {self.run.seed}"),
            (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.run.device) is not None,
             f"run.device must be auto, cpu, cuda, cuda:N or mps, got {self.run.device!r}"),
            (self.model.overrides is None or isinstance(self.model.overrides, dict),
             "model.overrides must be a mapping of model config fields, e.g. {dropout_rate: 0.0}"),
            (self.run.batch_size > 0, "run.batch_size must be > 0"),
            (self.run.grad_accum > 0, "run.grad_accum must be > 0"),
            (self.run.logging_steps > 0, "run.logging_steps must be > 0"),
            (self.run.max_steps is None or self.run.max_steps > 0, "run.max_steps must be > 0"),
            (self.run.epochs > 0, "run.epochs must be > 0"),
            (self.run.save_steps is None or self.run.save_steps > 0,
             "run.save_steps must be > 0 (leave it out to save only the final adapter)"),
            (self.run.eval_steps is None or self.run.eval_steps > 0,
             "run.eval_steps must be > 0 (leave it out to evaluate once at the end)"),
            (self.run.save_total_limit >= 0, "run.save_total_limit must be >= 0 (0 keeps every checkpoint)"),
            (self.data.max_source_length > 0 and self.data.max_target_length > 0,
             "data.max_source_length and data.max_target_length must be > 0"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.max_grad_norm is None or self.optim.max_grad_norm >= 0,
             "optim.max_grad_norm must be >= 0 (0 turns clipping off): a negative norm would flip the gradients"),
            (len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             "optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
            (self.optim.eps > 0, "optim.eps must be > 0"),
            (self.optim.scheduler in ("linear", "cosine", "constant"),
             "optim.scheduler must be linear, cosine or constant"),
            (self.run.precision in ("fp32", "bf16", "fp16"), "run.precision must be fp32, bf16 or fp16"),
            (self.run.distributed in ("ddp", "fsdp"), "run.distributed must be ddp or fsdp"),
            (self.run.lean_kernels or not self.run.recompute_linear,
             "run.recompute_linear recomputes what the lean kernels mark: set run.lean_kernels=true or turn it off"),
            (self.run.linear_backend in BACKENDS, f"run.linear_backend must be one of {', '.join(BACKENDS)}"),
            (self.run.lean_kernels or self.run.linear_backend != "onednn",
             "run.linear_backend=onednn routes the lean kernels' linear layers: set run.lean_kernels=true, or "
             "linear_backend to auto or torch"),
            (self.method.name in METHOD_NAMES, f"method.name must be one of {', '.join(METHOD_NAMES)}"),
            (self.model.task in (None, "seq2seq", "causal", "classification"),
             "model.task must be seq2seq, causal or classification"),
            (0 < self.data.validation_fraction < 1, "data.validation_fraction must be in (0, 1)"),
            (self.data.train is not None, "no training data: pass --data FILE (jsonl, json, csv, tsv or parquet)"),
        ]
        for ok, message in checks:
            if not ok:
                raise PeftlabError(message)
        for key in ("targets", "feedforward"):
            check_pattern(getattr(m, key), f"method.{key}")
        return self

    def numbers(self) -> list[tuple[str, float]]:
        """Every numeric setting as (`section.key`, value), lists' items included."""
        found = []
        for section, values in self.to_dict().items():
            for key, value in values.items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, int | float) and not isinstance(item, bool):
                        found.append((f"{section}.{key}", item))
        return found


METHOD_NAMES = (*METHODS, "full")
SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def changed_settings(saved: dict[str, dict], now: dict[str, dict], sections: list[str]) -> list[str]:
    """`section.key old -> new` for each setting of `sections` that differs between two configs' dicts."""
    return [f"{section}.{key} {saved.get(section, {}).get(key)!r} -> {value!r}" for section in sections
            for key, value in now[section].items() if saved.get(section, {}).get(key) != value]


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, section in _section_classes().items() for f in dataclasses.fields(section)]


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in SECTIONS}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5) if "." in key else []
    if not close:  # a bare field name: match it against the last component
        by_field = {k.split(".")[-1]: k for k in all_keys()}
        close = [by_field[c] for c in difflib.get_close_matches(key.split(".")[-1], list(by_field), n=1)]
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(all_keys())}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a value against the field's type; a string for a non-string field is read as YAML ("16", "[q, v]")."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    origins = [typing.get_origin(kind) or kind for kind in allowed]
    if value == "" and type(None) in origins:
        return None
    if isinstance(value, str) and str not in origins:
        try:
            value = load_yaml(value, key)
        except yaml.YAMLError:
            pass
    if value is None and type(None) in origins:
        return None
    for origin in origins:
        if isinstance(origin, type) and origin is not type(None) and isinstance(value, origin):
            if origin is int and isinstance(value, bool):
                continue
            return value
    if float in origins and isinstance(value, int) and not isinstance(value, bool):
        return value  # an int is a valid float (alpha=16 stays 16, as peft writes it)
    if list in origins and isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if float in origins and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 5e-4 as a string
        except ValueError:
            pass
    expected = getattr(annotation, "__name__", str(annotation))
    raise PeftlabError(f"{key}={value!r} has the wrong type: expected {expected}")


def full_key(key: str) -> str:
    """The dotted key (`optim.lr`) for a dotted key or a unique bare field name (`lr`)."""
    if key in all_keys():
        return key
    owners = [k for k in all_keys() if k.split(".")[-1] == key]
    if "." in key or len(owners) != 1:
        raise PeftlabError(f"unknown config key {key!r}{_suggest(key)}")
    return owners[0]


def set_key(config: TrainConfig, key: str, value: Any) -> None:
    """Set a dotted key (`optim.lr`) or a unique bare field name (`lr`)."""
    section_name, name = full_key(key).split(".")
    annotation = typing.get_type_hints(_section_classes()[section_name])[name]
    setattr(getattr(config, section_name), name, _coerce(key, value, annotation))


def from_dict(raw: dict[str, Any], config: TrainConfig | None = None) -> TrainConfig:
    config = config or TrainConfig()
    for section, values in (raw or {}).items():
        if not isinstance(values, dict):
            set_key(config, section, values)
            continue
        for name, value in values.items():
            set_key(config, f"{section}.{name}", value)
    return config


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) then overrides, in that order; values are type-checked."""
    config = TrainConfig()
    if path:
        try:
            raw = load_yaml(Path(path).read_text(encoding="utf-8"), f"config file {path}")
        except FileNotFoundError:
            raise PeftlabError(f"config file {path} not found: check the path") from None
        except UnicodeDecodeError as e:
            raise PeftlabError(f"config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise PeftlabError(f"config file {path} is not valid YAML ({first_line(e)})") from None
        if raw is not None and not isinstance(raw, dict):
            raise PeftlabError(f"config file {path} must hold a mapping of sections (model, data, ...)")
        from_dict(raw or {}, config)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    return config
