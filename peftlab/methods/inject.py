"""The injection machinery every method shares: find target modules, swap in adapter layers,
freeze the rest, and name adapter tensors as peft does on disk."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.archs import default_targets
from peftlab.errors import PeftlabError

ADAPTERS_ATTR = "peftlab_adapters"  # {adapter name: config}, set on the model by apply()
BASE_NAME = "__base__"  # in a mixed batch: the example runs through the base model alone
LINEAR_TYPES = (nn.Linear, Conv1D)
CLASSIFIER_HEADS = ("score", "classifier")  # peft's SEQ_CLS_HEAD_NAMES
NORM_CLASS_HINTS = ("LayerNorm", "RMSNorm")  # nn.LayerNorm, T5LayerNorm, LlamaRMSNorm, ...
# What each architecture calls its attention projections, so that targets written for one base (the seed's
# q, v on T5) are answered on another with its own names (q_proj, v_proj; query, value; GPT-2's fused c_attn).
ATTENTION_NAMES = ({"q", "q_proj", "query", "q_lin", "c_attn"}, {"k", "k_proj", "key", "k_lin", "c_attn"},
                   {"v", "v_proj", "value", "v_lin", "c_attn"}, {"o", "o_proj", "out_proj", "out_lin"})


def is_norm_layer(module: nn.Module) -> bool:
    return any(h in type(module).__name__ for h in NORM_CLASS_HINTS)


@dataclass(repr=False)
class MethodConfig:
    """What every method's config shares: which modules it touches and what peft records about the base.
    A method subclasses it with its own fields, `make_layer` and the peft (de)serialisation."""

    targets: list[str] | str | None = None  # list: exact name or ".suffix"; str: regex full match; "all-linear"
    exclude: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"  # "all": every bias of the model trains too
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    method: ClassVar[str]
    peft_type: ClassVar[str]
    mixed_batches: ClassVar[bool] = False  # its layers can run each example of a batch through its own adapter
    mergeable: ClassVar[bool] = True  # its update folds into the base weights (peftlab merge)
    trains_base: ClassVar[bool] = False  # the base's own weights train, nothing is injected (full fine-tuning)
    # whose default targets it takes from the model's family (peftlab/archs: peft's defaults); None: it has none
    targets_kind: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def can_mix(self) -> bool:
        """Whether this adapter can share a batch with other adapters (each example through its own): its layers
        run mixed batches, and it changes nothing the other adapters share."""
        return self.mixed_batches

    @classmethod
    def defaults_for(cls, model_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` with this model type's default targets where none are given."""
        if fields.get("targets") or cls.targets_kind is None:
            return fields
        targets = default_targets(model_type, cls.targets_kind)
        if targets is None:
            raise PeftlabError(f"no default {cls.method} targets for model type {model_type!r}: pass --targets "
                               "(see `peftlab inspect --model M`)")
        return {**fields, "targets": targets}

    def prepare(self, model: nn.Module, adapter: str) -> None:
        """Before injection: a one-line error when the method cannot apply to `model` at all, and any change
        the method makes outside its targets (QLoRA quantizes the base; prompt tuning adds its prompt)."""

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> nn.Module:
        raise NotImplementedError

    def unload(self, model: nn.Module) -> None:
        """After `merge_and_unload` removed the adapter layers: undo what `prepare` did to the base."""

    def extra_tensors(self, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        """Trained tensors outside the adapter layers (e.g. base LayerNorms trained in place, a soft prompt),
        keyed as in the adapter file."""
        return {}

    def to_peft(self) -> dict[str, Any]:
        """The adapter_config.json fields (peft's names)."""
        raise NotImplementedError

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> MethodConfig:
        raise NotImplementedError

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def __repr__(self) -> str:
        """The method's own fields first (r, alpha, ... rather than the shared targets, exclude, ...)."""
        shared = [f.name for f in dataclasses.fields(MethodConfig)]
        names = [f.name for f in dataclasses.fields(self) if f.name not in shared] + shared
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class AdapterLayer(nn.Module):
    """Base of every method's layer: wraps `base_layer` and holds adapters by name. A method's layer says
    which adapters it holds, their tensors under peft's saved names, and how to merge and remove them."""

    base_layer: nn.Module
    active_adapters: list[str]
    merged_adapters: list[str]
    batch_adapters: list[str] | None

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    # Model code reads these off the layer it called (e.g. T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class ModulesToSave(nn.Module):
    """A fully trainable copy of a module (e.g. a classification head); the original stays untouched."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.batch_adapters: list[str] | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapter = name

    def forward(self, *args, **kwargs):
        if self.batch_adapters is not None:
            return self._mixed_batch_forward(*args, **kwargs)
        module = self.modules_to_save[self.active_adapter] if self.active_adapter else self.original_module
        return module(*args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.original_module(x, *args, **kwargs).clone()
        for name, rows in rows_by_adapter(self.batch_adapters, x, self.modules_to_save):
            result[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return result


def rows_by_adapter(names: list[str], x: torch.Tensor, loaded) -> list[tuple[str, torch.Tensor | slice]]:
    """(adapter, row indices of x) for each adapter of a mixed batch that this layer holds; `slice(None)` when
    every row goes through the one adapter, so callers index with a view. Names are per example; generation
    repeats each example num_beams times, so they stretch to x's rows."""
    if x.shape[0] % len(names):
        raise RuntimeError(f"a batch of {x.shape[0]} rows does not fit {len(names)} adapter names")
    groups = _row_groups(tuple(names), x.shape[0] // len(names), x.device)
    return [(name, rows) for name, rows in groups if name in loaded]


@functools.lru_cache(maxsize=64)
def _row_groups(names: tuple[str, ...], repeat: int, device: torch.device) -> list[tuple[str, torch.Tensor | slice]]:
    """Cached: every adapter layer of a forward pass asks for the same grouping."""
    per_row = [n for n in names for _ in range(repeat)]
    if len(set(per_row)) == 1:
        return [(per_row[0], slice(None))]
    return [(name, torch.tensor([i for i, n in enumerate(per_row) if n == name], device=device))
            for name in dict.fromkeys(per_row)]


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that holds adapters (method layers and ModulesToSave), by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer | ModulesToSave)}


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the linear modules an adapter could target (the output head excluded, as peft's all-linear)."""
    excluded = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [output] if output is not None else [getattr(model, h, None) for h in CLASSIFIER_HEADS]
    for head in heads:
        if isinstance(head, nn.Module):
            excluded |= {n for n, m in model.named_modules() if m is head}
    return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in excluded]


def _name_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{s}") for s in spec)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(match["idx"]) if match else None


def is_target(config: Any, name: str) -> bool:
    """peft's `check_target_module_exists`, for one module name."""
    if config.exclude and _name_matches(config.exclude, name):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
        return False
    if not _name_matches(config.targets, name):
        return False
    if config.layers_to_transform and not isinstance(config.targets, str):
        return _layer_index(name, config.layers_pattern) in config.layers_to_transform
    return True


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """Qualified names of the modules the config adapts; a one-line error if there are none."""
    if config.targets == "all-linear":
        config.targets = sorted(linear_module_names(model))
    names = [n for n, _ in model.named_modules() if n and is_target(config, n)]
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        wanted = [config.targets] if isinstance(config.targets, str) else config.targets
        close = closest_names(wanted, suffixes)
        raise PeftlabError(f"targets {config.targets!r} match no module of {type(model).__name__}; "
                           f"closest that exist: {close or suffixes[:10]} (list all: `peftlab inspect --model M`)")
    return names


def closest_names(wanted: list[str], names: list[str]) -> list[str]:
    """The names playing the same attention role as a wanted one, then those spelt like one."""
    same_role = [n for w in wanted for group in ATTENTION_NAMES if w in group for n in names if n in group]
    similar = [n for w in wanted for n in difflib.get_close_matches(w, names, n=3, cutoff=0.3)]
    return list(dict.fromkeys(same_role + similar))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply(model: nn.Module, config: Any, adapter: str = "default") -> nn.Module:
    """Inject `config`'s adapter into `model` in place under the name `adapter`, freeze everything else,
    and return the model."""
    if config.trains_base:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    adapters: dict = getattr(model, ADAPTERS_ATTR, None) or {}
    if adapter in adapters:
        raise PeftlabError(f"the model already has an adapter named {adapter!r}: pick another name")
    targets = find_targets(model, config) if config.targets is not None else []  # errors before any change
    config.prepare(model, adapter)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.config, "name_or_path", None) or None
    for name in targets:
        module = model.get_submodule(name)
        new = config.make_layer(module, name, adapter)
        if new is not module:
            set_submodule(model, name, new)
    for name in _modules_to_save_names(model, config):
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter)
        set_submodule(model, name, wrapper)
    adapters[adapter] = config
    model.peftlab_adapters = adapters
    set_trainable(model, adapter)
    return model


def _modules_to_save_names(model: nn.Module, config: Any) -> list[str]:
    if not config.modules_to_save:
        return []
    return [n for n, _ in model.named_modules() if n and _name_matches(config.modules_to_save, n)
            and ".original_module" not in n and ".modules_to_save" not in n]


def set_trainable(model: nn.Module, adapter: str) -> None:
    """Freeze the base; make exactly the tensors saved for `adapter` trainable (and biases per its config)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_state_dict(model, adapter).values():
        p.requires_grad_(True)


def adapter_parameters(module: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """One layer's tensors of `adapter` under their saved (peft) names, relative to the layer."""
    if isinstance(module, ModulesToSave):
        if adapter not in module.modules_to_save:
            return {}
        return dict(module.modules_to_save[adapter].named_parameters())
    if adapter not in module.adapter_names():
        return {}
    return module.adapter_parameters(adapter)


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Any]:
    """The adapter's live parameters keyed as in peft's `adapter_model.safetensors`."""
    config = model.peftlab_adapters[adapter]
    state: dict[str, nn.Parameter] = {}
    for layer_name, module in adapter_layers(model).items():
        for key, p in adapter_parameters(module, adapter).items():
            state[f"base_model.model.{layer_name}.{key}"] = p
        if config.bias == "lora_only" and not isinstance(module, ModulesToSave):
            if getattr(module.base_layer, "bias", None) is not None:
                state[f"base_model.model.{layer_name}.base_layer.bias"] = module.base_layer.bias
    state.update(config.extra_tensors(model, adapter))
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias") and ".original_module." not in n and ".modules_to_save." not in n:
                state[f"base_model.model.{n}"] = p
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, Any], adapter: str = "default") -> None:
    """Copy saved tensors into `adapter`; every expected tensor must be present with its exact shape."""
    expected = adapter_state_dict(model, adapter)
    for key, target in expected.items():
        if key not in state:
            raise PeftlabError(f"adapter file lacks {key!r}: it was saved for a different model or config; "
                               "save it again from the matching base")
        if state[key].shape != target.shape:
            module = key.removeprefix("base_model.model.")
            raise PeftlabError(f"adapter does not fit the base at {module}: file has {tuple(state[key].shape)}, "
                               f"model needs {tuple(target.shape)}; load it on the base it was trained on")
        with torch.no_grad():
            target.copy_(state[key].to(target.dtype))


def set_active(model: nn.Module, adapter: str) -> None:
    """Route the forward pass through `adapter` (one adapter active at a time)."""
    if adapter not in getattr(model, ADAPTERS_ATTR, {}):
        raise PeftlabError(f"no adapter named {adapter!r}; loaded: {sorted(getattr(model, ADAPTERS_ATTR, {}))}")
    for module in adapter_layers(model).values():
        if isinstance(module, ModulesToSave):
            module.active_adapter = adapter if adapter in module.modules_to_save else None
        else:
            module.unmerge()
            module.active_adapters = [adapter] if adapter in module.adapter_names() else []
    set_trainable(model, adapter)


@contextlib.contextmanager
def per_example_adapters(model: nn.Module, names: list[str], layers: list[nn.Module] | None = None):
    """Inside the block, example i of each batch runs through adapter names[i] ("__base__": none). `layers`:
    the model's `adapter_layers`, for a caller that steps often and keeps them."""
    loaded = set(getattr(model, ADAPTERS_ATTR, {}))
    unknown = sorted(set(names) - loaded - {BASE_NAME})
    if unknown:
        raise PeftlabError(f"unknown adapter(s) {unknown}; loaded: {sorted(loaded)} (or {BASE_NAME!r} for none)")
    layers = adapter_layers(model).values() if layers is None else layers
    for module in layers:
        module.batch_adapters = list(names)
    try:
        yield model
    finally:
        for module in layers:
            module.batch_adapters = None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the bare base model inside the block (adapters stay loaded; merged ones are unmerged first)."""
    layers = adapter_layers(model)
    saved = {}
    for name, module in layers.items():
        if isinstance(module, ModulesToSave):
            saved[name], module.active_adapter = module.active_adapter, None
        else:
            module.unmerge()
            saved[name], module.active_adapters = module.active_adapters, []
    try:
        yield model
    finally:
        for name, module in layers.items():
            if isinstance(module, ModulesToSave):
                module.active_adapter = saved[name]
            else:
                module.active_adapters = saved[name]


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (reversible with `unmerge`)."""
    for module in adapter_layers(model).values():
        if not isinstance(module, ModulesToSave):
            module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for module in adapter_layers(model).values():
        if not isinstance(module, ModulesToSave):
            module.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapter layer by its plain base module: a model transformers knows."""
    merge(model)
    for name, module in adapter_layers(model).items():
        if isinstance(module, ModulesToSave):
            plain = module.modules_to_save[module.active_adapter] if module.active_adapter else module.original_module
        else:
            plain = module.base_layer
        set_submodule(model, name, plain)
    for config in getattr(model, ADAPTERS_ATTR, {}).values():
        config.unload(model)
    model.__dict__.pop(ADAPTERS_ATTR, None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def remove_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """Take `adapter` out of the model; layers left with no adapter turn back into their base modules."""
    adapters = getattr(model, ADAPTERS_ATTR, {})
    if adapter not in adapters:
        raise PeftlabError(f"no adapter named {adapter!r}; loaded: {sorted(adapters)}")
    for name, module in adapter_layers(model).items():
        if isinstance(module, ModulesToSave):
            if adapter in module.modules_to_save:
                del module.modules_to_save[adapter]
            remaining = list(module.modules_to_save)
            module.active_adapter = remaining[0] if remaining else None
            if not remaining:
                set_submodule(model, name, module.original_module)
        elif adapter in module.adapter_names():
            module.remove_adapter(adapter)
            if not module.adapter_names():
                set_submodule(model, name, module.base_layer)
    del adapters[adapter]
    if adapters:
        set_active(model, next(iter(adapters)))
    else:
        model.__dict__.pop(ADAPTERS_ATTR, None)
    return model
