"""QLoRA (Dettmers et al. 2023): every frozen linear layer of the base stored as NF4 (quant/nf4.py), LoRA
on top in full precision. The saved adapter is a plain peft LoRA adapter; merging dequantizes the layer
first, so a merged QLoRA model is an ordinary full-precision model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.methods.inject import linear_module_names, set_submodule
from peftlab.methods.lora import LoraConfig
from peftlab.quant.nf4 import NF4Linear, check_block_size


@dataclass(repr=False)
class QLoraConfig(LoraConfig):
    block_size: int = 64
    double_quant: bool = True
    scale_block_size: int = 256

    method: ClassVar[str] = "qlora"

    def prepare(self, model: nn.Module, adapter: str) -> None:
        """Quantize every linear layer except the output head and the modules trained in full."""
        keep = tuple(self.modules_to_save or ())
        names = [n for n in linear_module_names(model) if n.split(".")[-1] not in keep]
        for name in names:  # every layer checked before any is replaced
            check_block_size(model.get_submodule(name).weight.numel(), self.block_size, f"{name}.weight")
        for name in names:
            module = model.get_submodule(name)
            conv = isinstance(module, Conv1D)
            set_submodule(model, name, NF4Linear(as_linear(module) if conv else module, self.block_size,
                                                 self.double_quant, self.scale_block_size, from_conv1d=conv))

    def unload(self, model: nn.Module) -> None:
        """After merging: every layer back in full precision (a merged QLoRA model is a plain model)."""
        for name, layer in quantized_layers(model).items():
            set_submodule(model, name, layer.to_linear())


def as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D (weight stored as in x out) as the equivalent nn.Linear."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def quantized_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def quantization_report(model: nn.Module, originals: dict[str, torch.Tensor]) -> str:
    """Weight memory of the quantized layers and their error against the original weights (by name)."""
    layers = quantized_layers(model)
    count = sum(layer.in_features * layer.out_features for layer in layers.values())
    nbytes = sum(layer.quantized().nbytes() for layer in layers.values())
    squared_error = squared_norm = 0.0
    for name, layer in layers.items():
        original = originals[name.removesuffix(".base_layer")].float()
        original = original.T if layer.from_conv1d else original
        squared_error += (layer.dequantized_weight(torch.float32) - original).square().sum().item()
        squared_norm += original.square().sum().item()
    return (f"NF4: {len(layers)} linear layers, {count:,d} weights in {nbytes / 1e6:,.2f} MB "
            f"({nbytes / max(count, 1):.3f} bytes per weight; fp32 {4 * count / 1e6:,.2f} MB), "
            f"relative error {(squared_error / max(squared_norm, 1e-30)) ** 0.5:.2%}")
