"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751): after a sub-layer's output projection,

    h = y + W_up act(W_down y + b_down) + b_up,   y = the projection's output,

placed after the attention block (self and, in decoders, cross attention) and after the feed-forward block
of every layer, with the model's LayerNorms trainable as in the paper. W_up starts at zero, so the model
starts exactly as the base; 2·m·d + d + m parameters per adapter. peft has no such method: the adapter file
uses peft's layout with peftlab's own `peft_type` "BOTTLENECK" (peftlab loads it; peft does not)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig, adapter_layers, is_norm_layer, rows_by_adapter


@dataclass(repr=False)
class HoulsbyConfig(MethodConfig):
    bottleneck: int = 64  # m, the adapter's inner size
    activation: str = "gelu"
    init_std: float = 1e-2  # W_down ~ N(0, init_std); W_up = 0
    train_layer_norms: bool = True

    method: ClassVar[str] = "houlsby"
    mixed_batches: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False  # a nonlinear bottleneck: no weight holds it
    peft_type: ClassVar[str] = "BOTTLENECK"
    # the output projections of attention and feed-forward blocks (cross-attention included)
    targets_kind: ClassVar[str] = "houlsby"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise PeftlabError(f"Houlsby bottleneck size m must be a positive integer, got {self.bottleneck!r}: "
                               "use e.g. bottleneck=64")
        if self.activation not in ACT2FN:
            raise PeftlabError(f"unknown activation {self.activation!r}: use one of gelu, relu, silu, tanh")
        if not self.targets:
            raise PeftlabError("Houlsby adapters need targets: the output projections, e.g. targets=['o', 'wo']")

    def can_mix(self) -> bool:
        return not self.train_layer_norms  # trained LayerNorms are the base's own, shared by every adapter

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> HoulsbyLayer:
        layer = base if isinstance(base, HoulsbyLayer) else HoulsbyLayer(base, module_name)
        layer.add_adapter(adapter, self.bottleneck, self.activation, self.init_std)
        return layer

    def extra_tensors(self, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        if not self.train_layer_norms:
            return {}
        inside = tuple(f"{n}." for n in adapter_layers(model))
        return {f"base_model.model.{name}.{key}": p for name, module in model.named_modules()
                if is_norm_layer(module) and not name.startswith(inside)
                for key, p in module.named_parameters(recurse=False)}

    def to_peft(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else sorted(self.targets)
        return {"activation": self.activation, "base_model_name_or_path": self.base_model_name_or_path,
                "bottleneck": self.bottleneck, "exclude_modules": self.exclude, "inference_mode": True,
                "init_std": self.init_std, "modules_to_save": self.modules_to_save, "peft_type": self.peft_type,
                "target_modules": targets, "task_type": self.task_type, "train_layer_norms": self.train_layer_norms}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> HoulsbyConfig:
        return cls(targets=raw.get("target_modules"), exclude=raw.get("exclude_modules"),
                   modules_to_save=raw.get("modules_to_save"), bottleneck=raw.get("bottleneck", 64),
                   activation=raw.get("activation", "gelu"), init_std=raw.get("init_std", 1e-2),
                   train_layer_norms=raw.get("train_layer_norms", True),
                   base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


class HoulsbyLayer(AdapterLayer):
    """An output projection followed by named bottleneck adapters with a skip connection."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise PeftlabError(f"Houlsby adapters follow a linear output projection; {name} is a "
                               f"{type(base_layer).__name__}: target e.g. the attention output and FF output")
        self.base_layer = base_layer
        weight = base_layer.weight
        self.features = weight.shape[1] if isinstance(base_layer, Conv1D) else weight.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.batch_adapters: list[str] | None = None

    def add_adapter(self, name: str, bottleneck: int, activation: str, init_std: float) -> None:
        weight = self.base_layer.weight
        down = nn.Linear(self.features, bottleneck, device=weight.device, dtype=weight.dtype)
        up = nn.Linear(bottleneck, self.features, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(down.weight, std=init_std)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.activation[name] = activation
        self.active_adapters = [name]

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def remove_adapter(self, name: str) -> None:
        del self.adapter_down[name], self.adapter_up[name], self.activation[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def bottleneck(self, y: torch.Tensor, name: str) -> torch.Tensor:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return up(ACT2FN[self.activation[name]](down(y.to(down.weight.dtype)))).to(y.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            result = y.clone()
            for name, rows in rows_by_adapter(self.batch_adapters, y, self.adapter_down):
                result[rows] = y[rows] + self.bottleneck(y[rows], name)
            return result
        for name in self.active_adapters:
            y = y + self.bottleneck(y, name)
        return y

    def merge(self) -> None:
        if self.active_adapters:
            raise PeftlabError("bottleneck adapters are nonlinear and cannot be merged into the weights: "
                               "keep the adapter (peftlab load_adapter) instead of merging or exporting")

    def unmerge(self) -> None:
        """Nothing is ever merged."""
