"""Training memory in four parts: weights, gradients, optimizer state, activations (and the rest).

Measured: the peak above the process's memory before the model loaded; weights, gradients and optimizer
state are the sizes of those tensors, activations the remainder, so the parts sum to the measured total.

Predicted (`peftlab inspect --estimate-memory`): the first three from the parameter counts (fp32 AdamW
keeps two moments per trainable value), activations from one forward pass at batch size 1 and the full
sequence lengths, counting every tensor autograd saves for backward (the model's weights excluded), scaled
by the batch size, plus a backward workspace: the largest saved tensor twice over and the loss's
per-chunk logits and their softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from peftlab.train.loss import CHUNK_ROWS

MB = 2**20


@dataclass
class MemoryParts:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_mb(self) -> dict[str, float]:
        return {k: round(v / MB, 1) for k, v in {**asdict(self), "total": self.total}.items()}

    def line(self) -> str:
        mb = self.as_mb()
        return " | ".join(f"{k} {v:,.1f} MB" for k, v in mb.items())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (a DTensor); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = _local(t).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers, shared storage counted once."""
    return sum(dict(_storage(t) for t in [*model.parameters(), *model.buffers()]).values())


def trainable_bytes(model: nn.Module) -> int:
    return sum(_nbytes(p) for p in model.parameters() if p.requires_grad)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def measured_parts(peak_above_baseline: float, model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryParts:
    weights, gradients, optim = weight_bytes(model), trainable_bytes(model), optimizer_bytes(optimizer)
    return MemoryParts(weights, gradients, optim, peak_above_baseline - weights - gradients - optim)


def saved_for_backward(model: nn.Module, batch: dict[str, torch.Tensor], compute_loss) -> tuple[int, int]:
    """(bytes autograd keeps for backward, largest such tensor) for one forward pass; weights excluded."""
    weights = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in weights and ptr != 0:
            saved[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_loss(model, batch)
    return sum(saved.values()), max(saved.values(), default=0)


def estimate_parts(model: nn.Module, one_example: dict[str, torch.Tensor], batch_size: int, compute_loss,
                   chunked_vocab: int | None) -> MemoryParts:
    """Predicted peak training memory for `batch_size` copies of `one_example` (fp32 AdamW)."""
    was_training = model.training
    model.train()
    saved, largest = saved_for_backward(model, one_example, compute_loss)
    model.train(was_training)
    workspace = 2 * largest * batch_size
    if chunked_vocab:
        rows = min(CHUNK_ROWS, batch_size * int((one_example["labels"] != -100).sum()))
        workspace = max(workspace, 2 * rows * chunked_vocab * 4)
    gradients = trainable_bytes(model)
    return MemoryParts(weight_bytes(model), gradients, 2 * gradients, saved * batch_size + workspace)
