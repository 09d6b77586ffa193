"""Full fine-tuning: every weight of the base trains and nothing is injected. A run saves the whole model
(safetensors and config, which transformers loads), not an adapter; it has no settings of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftlab.methods.inject import MethodConfig


@dataclass(repr=False)
class FullConfig(MethodConfig):
    method: ClassVar[str] = "full"
    peft_type: ClassVar[str] = ""  # no adapter file: peft has no format for it
    trains_base: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False  # nothing to fold: the weights are the result

    @classmethod
    def field_names(cls) -> set[str]:
        return set()  # the shared fields (targets, ...) choose modules to adapt: full fine-tuning adapts none
