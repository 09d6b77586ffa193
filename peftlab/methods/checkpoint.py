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

from peftlab.errors import PeftlabError, first_line
from peftlab.io import atomic_write, write_text
from peftlab.methods.inject import adapter_state_dict, apply, load_adapter_state_dict, remove_adapter
from peftlab.methods.lora import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

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
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
                "use_qalora": False, "target_parameters": None}


def task_type_of(model: nn.Module) -> str | None:
    """peft's task_type for a transformers model class, or None."""
    cls = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def config_to_peft(config: LoraConfig) -> dict[str, Any]:
    targets = config.targets if isinstance(config.targets, str) else sorted(config.targets)
    return {**_PEFT_DEFAULTS, "alpha_pattern": dict(config.alpha_pattern),
            "base_model_name_or_path": config.base_model_name_or_path, "bias": config.bias,
            "exclude_modules": config.exclude, "init_lora_weights": True if config.init == "kaiming" else "gaussian",
            "layers_pattern": config.layers_pattern, "layers_to_transform": config.layers_to_transform,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout, "modules_to_save": config.modules_to_save,
            "r": config.r, "rank_pattern": dict(config.rank_pattern), "target_modules": targets,
            "task_type": config.task_type, "use_rslora": config.use_rslora}


def config_from_peft(raw: dict[str, Any], where: str) -> LoraConfig:
    if raw.get("peft_type", "LORA") != "LORA":
        raise PeftlabError(f"{where} holds a {raw['peft_type']} adapter; peftlab loads LORA adapters")
    for key, fine in _UNSUPPORTED.items():
        if raw.get(key, fine) not in (fine, None, False, {}, []):
            raise PeftlabError(f"{where} uses peft option {key}={raw[key]!r}, which peftlab does not load yet")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise PeftlabError(f"{where} uses init_lora_weights={init!r} (it changes the base weights); "
                           "merge it with peft first, or retrain with the default init")
    targets = raw.get("target_modules")
    return LoraConfig(
        r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
        targets=targets if isinstance(targets, str) else list(targets or []), exclude=raw.get("exclude_modules"),
        bias=raw.get("bias", "none"), modules_to_save=raw.get("modules_to_save"),
        use_rslora=raw.get("use_rslora", False), init="gaussian" if init == "gaussian" else "kaiming",
        layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"),
        rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
        base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> Path:
    """Write `adapter` in peft's format so `peft.PeftModel.from_pretrained(base, directory)` loads it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peftlab_adapters[adapter]
    if config.task_type is None:
        config.task_type = task_type_of(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter).items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_to_peft(config), indent=2, sort_keys=True)
    write_text(out / CONFIG_NAME, text)
    return out


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
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


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Inject and fill an adapter saved by peftlab or peft. On any error the model is left as it was."""
    config = read_adapter_config(directory)
    state = read_adapter_weights(directory)
    apply(model, config, adapter)
    try:
        load_adapter_state_dict(model, state, adapter)
    except BaseException:
        remove_adapter(model, adapter)
        raise
    return model
