"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA's update split into direction and magnitude,

    W' = m * (W + s B A) / ||W + s B A||_row,

with a trainable magnitude m per output row (initialised to the row norms of W) and the norm detached
from the graph, as the paper recommends and peft's `use_dora` does. Same tensors, names and numerics as
peft, so adapters move between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.lora import LoraConfig, LoraLayer


@dataclass(repr=False)
class DoraConfig(LoraConfig):
    method: ClassVar[str] = "dora"
    use_dora: ClassVar[bool] = True

    def make_layer(self, base: nn.Module, module_name: str, adapter: str) -> LoraLayer:
        layer = super().make_layer(base, module_name, adapter)
        layer.lora_magnitude_vector[adapter] = DoraMagnitude(layer, adapter)
        return layer


class DoraMagnitude(nn.Module):
    """One adapter's magnitude vector (`weight`, saved as peft's `lora_magnitude_vector`) and the DoRA math
    for the LoRA layer that holds it."""

    def __init__(self, layer: LoraLayer, adapter: str) -> None:
        super().__init__()
        with torch.no_grad():
            norm = self.row_norm(layer, adapter, layer.weight_matrix(layer.base_layer.weight))
        self.weight = nn.Parameter(norm)
        self.merged_norm: torch.Tensor | None = None  # the norm used at merge time, to undo it exactly

    @staticmethod
    def row_norm(layer: LoraLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row, in the (out, in) layout."""
        lora_weight = (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight).detach()
        return torch.linalg.norm(weight + layer.scaling[adapter] * lora_weight.to(weight.dtype), dim=1)

    def delta(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base layer's `result` for input `x`."""
        lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
        weight = layer.weight_matrix(layer.base_layer.weight).to(x.dtype)
        scale = (self.weight / self.row_norm(layer, adapter, weight).detach()).view(1, -1)
        if isinstance(dropout, nn.Dropout) and layer.training:
            x = dropout(x)  # the base term must see the same dropped-out input, so recompute it
            base = F.linear(x, weight)
        else:
            bias = layer.base_layer.bias
            base = result - bias if bias is not None else result
        return (scale - 1) * base + scale * lora_B(lora_A(x)) * layer.scaling[adapter]

    @torch.no_grad()
    def merge(self, layer: LoraLayer, adapter: str) -> None:
        weight = layer.base_layer.weight
        delta = layer.delta_weight(adapter)
        self.merged_norm = torch.linalg.norm(layer.weight_matrix(weight + delta), dim=1)
        factor = layer.weight_matrix((self.weight / self.merged_norm).view(-1, 1))
        weight.data = (factor * (weight + delta)).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, adapter: str) -> None:
        weight = layer.base_layer.weight
        factor = layer.weight_matrix((self.weight / self.merged_norm).view(-1, 1))
        weight.data = (weight / factor - layer.delta_weight(adapter)).to(weight.dtype)
        self.merged_norm = None
