"""Adapters on disk in peft's format: `adapter_config.json` + `adapter_model.safetensors`."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.archs import task_of_model
from peftlab.errors import PeftlabError, first_line
from peftlab.io import atomic_write, write_text
from peftlab.methods.inject import (
    MethodConfig,
    adapter_state_dict,
    apply,
    load_adapter_state_dict,
    remove_adapter,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

def task_type_of(model: nn.Module) -> str | None:
    """peft's task_type for a transformers model class, or None."""
    return {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "classification": "SEQ_CLS"}.get(
        task_of_model(model) or "")


def config_from_peft(raw: dict[str, Any], where: str) -> MethodConfig:
    """The method config an adapter_config.json describes (peft's or one of peftlab's own methods)."""
    from peftlab.methods import METHODS

    peft_type = raw.get("peft_type", "LORA")
    if peft_type == "LORA" and raw.get("use_dora"):
        return METHODS["dora"].from_peft(raw, where)
    by_type: dict[str, type[MethodConfig]] = {}
    for cls in METHODS.values():  # the first method of a peft type (lora, not its variants dora and qlora; said)
        if cls.peft_type:  # full fine-tuning writes no adapter file
            by_type.setdefault(cls.peft_type, cls)
    if peft_type not in by_type:
        raise PeftlabError(f"{where} holds a {peft_type} adapter; peftlab loads {sorted(by_type)}")
    return by_type[peft_type].from_peft(raw, where)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> Path:
    """Write `adapter` in peft's format so `peft.PeftModel.from_pretrained(base, directory)` loads it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peftlab_adapters[adapter]
    if config.task_type is None:
        config.task_type = task_type_of(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter).items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft(), indent=2, sort_keys=True)
    write_text(out / CONFIG_NAME, text)
    return out


def read_adapter_config(directory: str | os.PathLike) -> MethodConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PeftlabError(f"no {CONFIG_NAME} in {directory}: point to a directory written by "
                           "peftlab save_adapter / peft save_pretrained")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftlabError(f"{path} is not valid JSON ({e}): restore it or save the adapter again") from None
    return config_from_peft(raw, str(path))


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a `.bin` through `torch.load(weights_only=True)`; never unpickled."""
    directory = Path(directory)
    safe, pickled = directory / WEIGHTS_NAME, directory / PICKLE_WEIGHTS_NAME
    try:
        if safe.is_file():
            return load_file(safe)
        if pickled.is_file():
            return torch.load(pickled, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        bad = safe if safe.is_file() else pickled
        raise PeftlabError(f"{bad} is corrupt or not a plain tensor file ({first_line(e)}): "
                           "save the adapter again") from None
    raise PeftlabError(f"no {WEIGHTS_NAME} in {directory}: the adapter weights are missing")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
                 config: MethodConfig | None = None) -> nn.Module:
    """Inject and fill an adapter saved by peftlab or peft. On any error the model is left as it was.
    `config` replaces the file's (e.g. a QLoRA config, to load a LoRA adapter onto an NF4 base)."""
    config = config or read_adapter_config(directory)
    state = read_adapter_weights(directory)
    try:
        apply(model, config, adapter)
    except PeftlabError as e:
        raise _on_another_base(e, config, model) from None
    try:
        load_adapter_state_dict(model, state, adapter)
    except PeftlabError as e:
        remove_adapter(model, adapter)
        raise _on_another_base(e, config, model) from None
    except BaseException:
        remove_adapter(model, adapter)
        raise
    return model


def _on_another_base(error: PeftlabError, config: MethodConfig, model: nn.Module) -> PeftlabError:
    """A same-shaped adapter of another base loads on purpose; where one does not fit, say which base it is for."""
    trained_on, this = config.base_model_name_or_path, getattr(model.config, "name_or_path", None)
    if trained_on and this and trained_on != this:
        return PeftlabError(f"the adapter was trained on {trained_on}, this base is {this}: {error}")
    return error
