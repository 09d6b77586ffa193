"""peftlab: parameter-efficient fine-tuning in plain PyTorch, adapters in peft's format."""

from peftlab.errors import PeftlabError
from peftlab.measure.sizes import count_parameters, trainable_line
from peftlab.methods.checkpoint import load_adapter, save_adapter
from peftlab.methods.inject import apply, merge, merge_and_unload, remove_adapter, set_active, unmerge
from peftlab.methods.lora import LoraConfig
from peftlab.models import load_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "PeftlabError", "apply", "count_parameters", "load_adapter", "load_model", "merge",
           "merge_and_unload", "remove_adapter", "save_adapter", "set_active", "trainable_line", "unmerge"]
