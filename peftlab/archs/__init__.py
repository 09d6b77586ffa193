"""Model families: what peftlab needs to know of each, one small spec a family, one module a spec (or a few).

A module in this package that defines `SPEC` (an `Arch`) or `SPECS` (a list of them) is a family: models.py
takes its task and random presets from it, the methods their default targets, the chunked loss whether its
LM head gives the logits plainly, and the lean kernels its attention and RMSNorm. Adding a family is adding a
file here; `families()` finds it. Everything here is plain data: no model code is imported.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["seq2seq", "causal", "classification"]
# The tiny random presets are ours (no checkpoint to match): a wider init than the usual 0.02 gives their 64-wide
# embeddings logits with enough range that a few LoRA steps visibly lower the loss in tests.
TINY_INIT_STD = 0.2


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object a family
class Tokens:
    """The offline byte-level tokenizer of a family's random presets: its special tokens (text -> the config
    attribute holding the id; `extra`: more, at the lowest free ids), how a text (and a pair) is wrapped, and
    which special token plays which role."""

    specials: Mapping[str, str]
    roles: Mapping[str, str]
    extra: tuple[str, ...] = ()
    template: tuple[str, str] | None = None  # (single, pair) in tokenizers' TemplateProcessing syntax
    input_names: tuple[str, ...] | None = None  # the tokenizer's model_input_names, where not the default


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object a family
class Arch:
    """One model family (one or more transformers `model_type`s with the same module names)."""

    model_types: tuple[str, ...]
    task: Task | None = None  # the task its base models are for; None: from the config's architectures
    targets: Mapping[str, list[str]] = field(default_factory=dict)  # method kind -> default targets (peft's)
    ia3_feedforward: list[str] | None = None  # IA3 targets whose input, not output, is scaled
    plain_lm_head: bool = False  # lm_head(hidden) is the logits, nothing added: the chunked loss applies
    attention: str | None = None  # the attention module class the lean attention can stand in for
    attention_dropout: str | None = None  # its config field: the lean attention only where it is > 0 (None: always)
    rms_norms: Mapping[str, str] = field(default_factory=dict)  # RMSNorm class name -> "t5" or "llama" arithmetic
    presets: Mapping[str, Callable[[], Any]] = field(default_factory=dict)  # random:<name> -> its config
    untied_lm_head: bool = False  # transformers ties the LM head to the embeddings; the checkpoints have their own
    tokens: Tokens | None = None


@functools.cache
def families() -> dict[str, Arch]:
    """Every spec in this package, by model type."""
    found: dict[str, Arch] = {}
    for module in pkgutil.iter_modules(__path__):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for spec in getattr(loaded, "SPECS", []) + ([loaded.SPEC] if hasattr(loaded, "SPEC") else []):
            for model_type in spec.model_types:
                found[model_type] = spec
    return found


def arch_of(model_type: str | None) -> Arch | None:
    return families().get(model_type) if model_type else None


def default_targets(model_type: str, kind: str) -> list[str] | None:
    """A family's default targets for one kind of method (None: the family has none)."""
    arch = arch_of(model_type)
    if arch is None or kind not in arch.targets:
        return None
    targets = arch.targets[kind]
    return targets if isinstance(targets, str) else list(targets)  # a string is a regex (peft's llava)


def presets() -> dict[str, tuple[Callable[[], Any], Arch]]:
    """Every random preset: name -> (its config factory, its family)."""
    found = {name: (make, arch) for arch in dict.fromkeys(families().values()) for name, make in arch.presets.items()}
    return dict(sorted(found.items()))


def task_of_model(model: Any) -> Task | None:
    """The task a built model is for, from its head class (None: a bare model, no head peftlab knows)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return None


def rms_norm_styles() -> dict[str, str]:
    """Every RMSNorm class a family declares, by class name -> how it computes ("t5": in fp32, back to a half
    weight's dtype; "llama": back to the input's dtype)."""
    return {name: style for arch in families().values() for name, style in arch.rms_norms.items()}
