"""peftlab: parameter-efficient fine-tuning in plain PyTorch, adapters in peft's format."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that the `peftlab` command starts (and picks its allocator) before torch and
# transformers load.
_EXPORTS = {
    "LoraConfig": "peftlab.methods.lora", "PeftlabError": "peftlab.errors",
    "count_parameters": "peftlab.measure.sizes", "trainable_line": "peftlab.measure.sizes",
    "load_adapter": "peftlab.methods.checkpoint", "save_adapter": "peftlab.methods.checkpoint",
    "apply": "peftlab.methods.inject", "merge": "peftlab.methods.inject",
    "merge_and_unload": "peftlab.methods.inject", "remove_adapter": "peftlab.methods.inject",
    "set_active": "peftlab.methods.inject", "unmerge": "peftlab.methods.inject", "load_model": "peftlab.models",
    "Trainer": "peftlab.train.trainer", "Callback": "peftlab.train.callbacks", "evaluate": "peftlab.eval.api",
    "generate": "peftlab.eval.api",
}
__all__ = ["Callback", "LoraConfig", "PeftlabError", "Trainer", "apply", "count_parameters", "evaluate", "generate",
           "load_adapter", "load_model", "merge", "merge_and_unload", "remove_adapter", "save_adapter", "set_active",
           "trainable_line", "unmerge"]

if TYPE_CHECKING:
    from peftlab.errors import PeftlabError
    from peftlab.eval.api import evaluate, generate
    from peftlab.measure.sizes import count_parameters, trainable_line
    from peftlab.methods.checkpoint import load_adapter, save_adapter
    from peftlab.methods.inject import apply, merge, merge_and_unload, remove_adapter, set_active, unmerge
    from peftlab.methods.lora import LoraConfig
    from peftlab.models import load_model
    from peftlab.train.callbacks import Callback
    from peftlab.train.trainer import Trainer


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
