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

from peftlab.accel.products import BACKENDS
from peftlab.errors import PeftlabError, first_line
from peftlab.io import load_yaml
from peftlab.methods import METHODS, check_pattern


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


RECORDED = {"base_model_name_or_path", "task_type"}  # what a method config records about the base, not a setting


def _method_section() -> type:
    """The `method` section: `name` (a method, "full" included) and every field of every method's config class, each
    None unless set, which means that method's own default. Built from the classes, so YAML, flags and Python
    (`peftlab.LoraConfig(...)`) share one set of fields and defaults; `TrainConfig.validate` refuses a field the
    named method does not have."""
    fields: dict[str, Any] = {}
    for cls in METHODS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in RECORDED:
                fields.setdefault(f.name, hints[f.name])
    return dataclasses.make_dataclass(
        "MethodSection", [("name", str, field(default="lora")),
                          *((name, kind | None, field(default=None)) for name, kind in fields.items())])


MethodSection = _method_section()


def method_default(key: str, method: str = "lora") -> Any:
    """The default of a method field: `method`'s own, else the first method that has the field."""
    owners = [METHODS[method]] if method in METHODS and key in METHODS[method].field_names() else \
        [c for c in METHODS.values() if key in c.field_names()]
    f = next(f for f in dataclasses.fields(owners[0]) if f.name == key)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


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
    # each validation also computes the task's metrics: ROUGE/exact match from greedy generation (seq2seq, causal;
    # up to max_target_length new tokens) or accuracy/macro-F1 (classification), and a Trainer's compute_metrics
    eval_metrics: bool = True
    save_steps: int | None = None  # default: only the final adapter
    save_total_limit: int = 2
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast where the device supports it)
    gradient_checkpointing: bool = False
    chunked_loss: bool = True  # LM loss without the full logits tensor (same math; see accel/loss.py)
    lean_kernels: bool = True  # cheaper dropout masks, fused GELU/attention saving less (same math; accel/lean.py)
    redraw_masks: bool = False  # dropout masks drawn again in backward, not kept (less memory, slower; recompute.py)
    recompute_linear: bool = False  # T5's q, k, v, gate and up recomputed in backward (less memory, slower; lean.py)
    # auto | torch | onednn: fp32 CPU linear products (auto: oneDNN on x86 CPUs not made by Intel, where MKL is
    # slower; same math, accel/products.py)
    linear_backend: str = "auto"
    report_to: list[str] | None = None  # trackers: tensorboard, mlflow, wandb, trackio (train/tracking.py)
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
        """Every section as a dict; the method section lists the settings given (the rest are its defaults)."""
        raw = dataclasses.asdict(self)
        raw["method"] = {"name": self.method.name, **self.method_fields()}
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, data_given: bool = False) -> TrainConfig:
        """Refuse any setting out of range; `data_given`: the training data comes as an object, not data.train."""
        for key, value in self.numbers():
            if not math.isfinite(value):
                raise PeftlabError(f"{key} must be a finite number, got {value}")
        m = self.method
        self._check_method_fields()
        checks = [
            (m.r is None or m.r >= 1, "method.r (the rank) must be at least 1"),
            (m.alpha is None or m.alpha > 0, "method.alpha must be > 0 (the seed uses 2 * r)"),
            (m.dropout is None or 0 <= m.dropout < 1, "method.dropout must be in [0, 1)"),
            (all(v is None or v >= 1 for v in (m.bottleneck, m.num_virtual_tokens, m.d)),
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
            (data_given or self.data.train is not None,
             "no training data: pass --data FILE (jsonl, json, csv, tsv or parquet)"),
        ]
        for ok, message in checks:
            if not ok:
                raise PeftlabError(message)
        for key in ("targets", "feedforward"):
            check_pattern(getattr(m, key), f"method.{key}")
        return self

    def _check_method_fields(self) -> None:
        """Each method field set belongs to the named method (`block_size` is QLoRA's, not IA3's)."""
        name = self.method.name
        own = METHODS[name].field_names() if name in METHODS else set()
        for key, value in dataclasses.asdict(self.method).items():
            if key != "name" and value is not None and key not in own:
                owners = [n for n, cls in METHODS.items() if key in cls.field_names()]
                raise PeftlabError(f"method.{key} is a setting of {', '.join(owners)}, not of {name}: drop it, or set "
                                   f"method.name to {owners[0]}")

    def resolved_method(self) -> dict[str, Any]:
        """Every setting of the named method, defaults filled in: what two runs must share to be the same method."""
        name = self.method.name
        own = sorted(METHODS[name].field_names() - RECORDED) if name in METHODS else []
        given = self.method_fields()
        return {"name": name, **{k: given[k] if k in given else method_default(k, name) for k in own}}

    def method_fields(self) -> dict[str, Any]:
        """The method settings given (those left out take the method's defaults)."""
        return {k: v for k, v in dataclasses.asdict(self.method).items() if k != "name" and v is not None}

    def numbers(self) -> list[tuple[str, float]]:
        """Every numeric setting as (`section.key`, value), lists' items included."""
        found = []
        for section, values in self.to_dict().items():
            for key, value in values.items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, int | float) and not isinstance(item, bool):
                        found.append((f"{section}.{key}", item))
        return found


METHOD_NAMES = tuple(METHODS)
SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def key_defaults() -> dict[str, Any]:
    """Each config key's default (`method.alpha` -> 8, LoRA's own): what `train --help` shows
    (peftlab/help_defaults.py holds a copy that needs no torch; a test keeps the two equal)."""
    config = TrainConfig()
    defaults = {f"{section}.{f.name}": getattr(getattr(config, section), f.name)
                for section in SECTIONS for f in dataclasses.fields(getattr(config, section))}
    return {k: method_default(k.split(".")[1]) if k.startswith("method.") and k != "method.name" else v
            for k, v in defaults.items()}


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
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    allowed = typing.get_args(annotation) if union else (annotation,)
    literals = [a for kind in allowed if typing.get_origin(kind) is typing.Literal for a in typing.get_args(kind)]
    if literals and value in literals:
        return value
    origins = [typing.get_origin(kind) or kind for kind in allowed if typing.get_origin(kind) is not typing.Literal]
    origins += [type(a) for a in literals][:1]
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
