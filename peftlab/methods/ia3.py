"""(IA)^3 (Liu et al. 2022, arXiv 2205.05638): learned vectors that rescale activations. A targeted
linear layer's output is multiplied by l (one value per output feature); a feed-forward layer's input is
(one value per input feature). Vectors start at one, so the model starts as the base. Same tensors, names
and numerics as peft's IA3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.archs import arch_of
from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig, is_target, rows_by_adapter


@dataclass(repr=False)
class IA3Config(MethodConfig):
    feedforward: list[str] | str | None = None  # the targets whose input (not output) is scaled

    method: ClassVar[str] = "ia3"
    mixed_batches: ClassVar[bool] = True
    peft_type: ClassVar[str] = "IA3"
    targets_kind: ClassVar[str] = "ia3"

    @classmethod
    def defaults_for(cls, model_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        if not fields.get("targets") and fields.get("feedforward") is None:
            arch = arch_of(model_type)
            fields = {**fields, "feedforward": list(arch.ia3_feedforward or []) if arch else []}
        return super().defaults_for(model_type, fields)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise PeftlabError("IA3 needs targets: e.g. targets=['k', 'v', 'wo'] (see `peftlab inspect --model M`)")
        if self.feedforward is None:
            self.feedforward = []
        if isinstance(self.targets, list) and isinstance(self.feedforward, list):
            stray = [f for f in self.feedforward if f not in self.targets]
            if stray:
                raise PeftlabError(f"IA3 feedforward modules {stray} are not among the targets {self.targets}: "
                                   "every feedforward module must also be a target")

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> IA3Layer:
        feedforward = _is_feedforward(self.feedforward, module_name)
        layer = base if isinstance(base, IA3Layer) else IA3Layer(base, feedforward)
        layer.add_adapter(adapter)
        return layer

    def to_peft(self) -> dict[str, Any]:
        def listed(x):
            return x if isinstance(x, str) else sorted(x)

        return {"auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
                "exclude_modules": self.exclude, "fan_in_fan_out": False,
                "feedforward_modules": listed(self.feedforward), "inference_mode": True, "init_ia3_weights": True,
                "modules_to_save": self.modules_to_save, "peft_type": self.peft_type, "revision": None,
                "target_modules": listed(self.targets), "task_type": self.task_type}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> IA3Config:
        return cls(targets=raw.get("target_modules"), feedforward=raw.get("feedforward_modules") or [],
                   exclude=raw.get("exclude_modules"), modules_to_save=raw.get("modules_to_save"),
                   base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


def _is_feedforward(spec: list[str] | str, name: str) -> bool:
    probe = MethodConfig(targets=spec)  # the same name rule as targets
    return bool(spec) and is_target(probe, name)


class IA3Layer(AdapterLayer):
    """A frozen `nn.Linear` or `Conv1D` with named rescaling vectors `ia3_l`."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise PeftlabError(f"IA3 applies to nn.Linear and Conv1D, not {type(base_layer).__name__}: "
                               "pick linear modules as targets (see `peftlab inspect`)")
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        out_features, in_features = weight.T.shape if self.fan_in_fan_out else weight.shape
        self.shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.batch_adapters: list[str] | None = None

    def add_adapter(self, name: str) -> None:
        weight = self.base_layer.weight
        self.ia3_l[name] = nn.Parameter(torch.ones(self.shape, device=weight.device, dtype=weight.dtype))
        self.active_adapters = [name]

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[name]}

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.ia3_l[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _scaled(self, x: torch.Tensor, scale: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.batch_adapters is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale = torch.ones((), dtype=self.ia3_l[names[0]].dtype, device=x.device)
        for name in names:
            scale = scale * self.ia3_l[name].flatten()
        return self._scaled(x, scale, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_adapters:
            raise RuntimeError("unmerge adapters before running a mixed batch")
        result = self.base_layer(x, *args, **kwargs).clone()
        for name, rows in rows_by_adapter(self.batch_adapters, x, self.ia3_l):
            result[rows] = self._scaled(x[rows], self.ia3_l[name].flatten(), *args, **kwargs).to(result.dtype)
        return result

    def _weight_scale(self, name: str) -> torch.Tensor:
        scale = self.ia3_l[name]  # (out, 1) or (1, in): broadcasts over W in (out, in)
        return scale.T if self.fan_in_fan_out else scale

    @torch.no_grad()
    def merge(self) -> None:
        base = self.base_layer
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            base.weight.data = (base.weight * self._weight_scale(name)).to(base.weight.dtype)
            if not self.feedforward and base.bias is not None:
                base.bias.data = (base.bias * self.ia3_l[name].reshape(base.bias.shape)).to(base.bias.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data = (base.weight / self._weight_scale(name)).to(base.weight.dtype)
            if not self.feedforward and base.bias is not None:
                base.bias.data = (base.bias / self.ia3_l[name].reshape(base.bias.shape)).to(base.bias.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, shape={self.shape}"
