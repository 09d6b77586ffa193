"""LayerNorm tuning (Zhao et al. 2023, arXiv 2312.11420; peft's LN_TUNING): train a copy of each targeted
normalisation layer; the base copy stays frozen, so adapters can be swapped and removed."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig, is_norm_layer


@dataclass(repr=False)
class LNTuningConfig(MethodConfig):
    method: ClassVar[str] = "ln_tuning"
    peft_type: ClassVar[str] = "LN_TUNING"
    targets_kind: ClassVar[str] = "ln_tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise PeftlabError("LN tuning needs targets: e.g. targets=['layer_norm'] (the model's norm layers)")

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> LNTuningLayer:
        layer = base if isinstance(base, LNTuningLayer) else LNTuningLayer(base, module_name)
        layer.add_adapter(adapter)
        return layer

    def to_peft(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else sorted(self.targets)
        return {"auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
                "exclude_modules": self.exclude, "inference_mode": True, "modules_to_save": self.modules_to_save,
                "peft_type": self.peft_type, "revision": None, "target_modules": targets,
                "task_type": self.task_type}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> LNTuningConfig:
        return cls(targets=raw.get("target_modules"), exclude=raw.get("exclude_modules"),
                   modules_to_save=raw.get("modules_to_save"),
                   base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


class LNTuningLayer(AdapterLayer):
    """A frozen norm layer and, per adapter, a trainable copy that runs in its place."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        if not is_norm_layer(base_layer):
            raise PeftlabError(f"LN tuning targets norm layers; {name} is a {type(base_layer).__name__}: "
                               "pick the model's LayerNorm/RMSNorm modules as targets")
        self.base_layer = base_layer
        self.ln_tuning_layers = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.batch_adapters: list[str] | None = None

    def add_adapter(self, name: str) -> None:
        self.ln_tuning_layers[name] = copy.deepcopy(self.base_layer)
        self.active_adapters = [name]

    def adapter_names(self) -> list[str]:
        return list(self.ln_tuning_layers)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"ln_tuning_layers.{k}": p for k, p in self.ln_tuning_layers[name].named_parameters()}

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.ln_tuning_layers[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def forward(self, x, *args, **kwargs):
        if self.batch_adapters is not None:
            raise RuntimeError("LN tuning cannot run a mixed batch (one norm layer per adapter): use one adapter")
        if self.merged_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.ln_tuning_layers[self.active_adapters[0]](x, *args, **kwargs)

    def merge(self) -> None:
        """Swap the adapter's copy in as the base layer (as peft does)."""
        if self.merged_adapters or not self.active_adapters:
            return
        name = self.active_adapters[0]
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer
