"""BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): train only the bias terms (and, for classification,
the head). No module is replaced; the biases are the adapter. peft has no BitFit, so the adapter file uses
peft's layout with peftlab's own `peft_type` "BITFIT" (peft will not load it; peftlab will)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.inject import MethodConfig


@dataclass(repr=False)
class BitFitConfig(MethodConfig):
    bias: str = "all"

    method: ClassVar[str] = "bitfit"
    peft_type: ClassVar[str] = "BITFIT"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = None  # nothing is injected
        self.bias = "all"  # every bias trains, whatever a LoRA-minded config says

    def prepare(self, model: nn.Module, adapter: str) -> None:
        if not any(n.endswith("bias") for n, _ in model.named_parameters()):
            raise PeftlabError(f"{type(model).__name__} has no bias terms, so BitFit has nothing to train "
                               "(T5 and Llama-style models use none): pick another method, e.g. ln_tuning or lora")

    def to_peft(self) -> dict[str, Any]:
        return {"base_model_name_or_path": self.base_model_name_or_path, "bias": "all", "inference_mode": True,
                "modules_to_save": self.modules_to_save, "peft_type": self.peft_type, "target_modules": None,
                "task_type": self.task_type}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> BitFitConfig:
        return cls(modules_to_save=raw.get("modules_to_save"),
                   base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))
