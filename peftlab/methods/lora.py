"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A dropout(x), with W frozen.

Numerically identical to Hugging Face peft's `lora.Linear` (same init, same scaling, same order of
operations), so adapters move between the two unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig, rows_by_adapter
from peftlab.quant.nf4 import NF4Linear

# Fields peft 0.21 writes that peftlab leaves at peft's defaults.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "fan_in_fan_out": False, "inference_mode": True,
    "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "revision": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "velora_config": None,
}
# peft options peftlab cannot load faithfully: (key, the value that is fine).
_UNSUPPORTED = {"lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
                "use_qalora": False, "target_parameters": None}


@dataclass(repr=False)
class LoraConfig(MethodConfig):
    """What to adapt and how. Field meanings follow peft's `LoraConfig` (names shortened)."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    method: ClassVar[str] = "lora"
    mixed_batches: ClassVar[bool] = True
    peft_type: ClassVar[str] = "LORA"
    targets_kind: ClassVar[str] = "lora"  # the attention query and value projections (the seed's, the paper's)
    use_dora: ClassVar[bool] = False  # DoraConfig (methods/dora.py) sets it

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, r in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if not isinstance(r, int) or r <= 0:
                raise PeftlabError(f"LoRA {name} must be a positive integer, got {r!r}: use e.g. r=8")
        alphas = {"alpha": self.alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for name, a in alphas.items():
            if not isinstance(a, int | float) or a <= 0:
                raise PeftlabError(f"LoRA {name} must be positive, got {a!r}: a common choice is alpha = 2 * r")
        if not 0 <= self.dropout < 1:
            raise PeftlabError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}: use e.g. dropout=0.05")
        if self.bias not in ("none", "all", "lora_only"):
            raise PeftlabError(f"LoRA bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise PeftlabError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if not self.targets:
            raise PeftlabError("LoRA needs targets: e.g. targets=['q', 'v'] (see `peftlab inspect --model M`)")

    def to_peft(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else sorted(self.targets)
        return {**_PEFT_DEFAULTS, "alpha_pattern": dict(self.alpha_pattern),
                "base_model_name_or_path": self.base_model_name_or_path, "bias": self.bias,
                "exclude_modules": self.exclude, "init_lora_weights": True if self.init == "kaiming" else "gaussian",
                "layers_pattern": self.layers_pattern, "layers_to_transform": self.layers_to_transform,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout, "modules_to_save": self.modules_to_save,
                "r": self.r, "rank_pattern": dict(self.rank_pattern), "target_modules": targets,
                "task_type": self.task_type, "use_dora": self.use_dora, "use_rslora": self.use_rslora}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> LoraConfig:
        for key, fine in _UNSUPPORTED.items():
            if raw.get(key, fine) not in (fine, None, False, {}, []):
                raise PeftlabError(f"{where} uses peft option {key}={raw[key]!r}, which peftlab does not load yet")
        init = raw.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            raise PeftlabError(f"{where} uses init_lora_weights={init!r} (it changes the base weights); "
                               "merge it with peft first, or retrain with the default init")
        targets = raw.get("target_modules")
        return cls(
            r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
            targets=targets if isinstance(targets, str) else list(targets or []), exclude=raw.get("exclude_modules"),
            bias=raw.get("bias", "none"), modules_to_save=raw.get("modules_to_save"),
            use_rslora=raw.get("use_rslora", False), init="gaussian" if init == "gaussian" else "kaiming",
            layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"),
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after rank_pattern and alpha_pattern (peft's matching rule)."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> LoraLayer:
        r, alpha = self.rank_and_alpha(module_name)
        layer = base if isinstance(base, LoraLayer) else LoraLayer(base)
        layer.add_adapter(adapter, r, alpha, self.dropout, self.use_rslora, self.init)
        return layer


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class LoraLayer(AdapterLayer):
    """Wraps a frozen `nn.Linear` or GPT-2 `Conv1D` as `base_layer` and adds named low-rank adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear | Conv1D | NF4Linear):
            raise PeftlabError(f"LoRA applies to nn.Linear and Conv1D, not {type(base_layer).__name__}: "
                               "pick linear modules as targets (see `peftlab inspect`)")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D stores W as (in, out)
        out_features, in_features = self.weight_matrix(base_layer.weight).shape
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (methods/dora.py)
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.batch_adapters: list[str] | None = None  # one adapter name per example (a mixed batch)

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        weight = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.active_adapters = [name]

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        del self.scaling[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """B A * scaling, in the base layer's own layout."""
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        return self.weight_matrix(delta)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """scaling * B A dropout(x), as peft's `lora.Linear` computes it."""
        lora_A = self.lora_A[name]
        return self.lora_B[name](lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]

    def adapter_delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base layer's `result` for input `x`."""
        if name in self.lora_magnitude_vector:
            return self.lora_magnitude_vector[name].delta(self, name, x.to(self.lora_A[name].weight.dtype), result)
        return self.lora_delta(x, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self._mixed_batch_forward(x, result)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.add(result, self.adapter_delta(x, name, result))
        return result

    @staticmethod
    def add(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return result + delta

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each example through its own adapter (names not loaded here, e.g. "__base__", get none)."""
        if self.merged_adapters:
            raise RuntimeError("unmerge adapters before running a mixed batch")
        groups = rows_by_adapter(self.batch_adapters, x, self.lora_A)
        if len(groups) == 1 and isinstance(groups[0][1], slice):  # one adapter for all: no copy, no indexing
            return result + self.adapter_delta(x, groups[0][0], result).to(result.dtype)
        result = result.clone()
        for name, rows in groups:
            result[rows] += self.adapter_delta(x[rows], name, result[rows]).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.base_layer, NF4Linear) and self.active_adapters:
            self.base_layer = self.base_layer.to_linear()  # merging a QLoRA adapter yields a dequantized layer
            self.fan_in_fan_out = isinstance(self.base_layer, Conv1D)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].merge(self, name)
            else:
                self.base_layer.weight.data += self.delta_weight(name).to(self.base_layer.weight.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].unmerge(self, name)
            else:
                self.base_layer.weight.data -= self.delta_weight(name).to(self.base_layer.weight.dtype)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of one adapter, under peft's saved names (adapter name left out)."""
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return tensors

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"ranks={ranks}, scaling={self.scaling}"
