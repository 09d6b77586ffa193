"""Training memory in four parts: weights, gradients, optimizer state, activations (and the rest).

Measured: the peak above the process's memory before the model loaded; weights, gradients and optimizer
state are the sizes of those tensors, activations the remainder, so the parts sum to the measured total.

Predicted (`peftlab inspect --estimate-memory`): weights, gradients and optimizer state from the parameter
counts (fp32 AdamW keeps two moments per trainable value). A training step's own memory (activations,
temporaries, gradients) is measured at two small batches (8 and 16 copies of one example at the full lengths)
and extrapolated linearly to the batch size: on Linux, where the process's peak can be reset. Elsewhere it
counts what autograd saves for backward at batch 1 (weights excluded) times the batch, plus a workspace;
that count misses temporaries (e.g. ~25% under for LoRA on CPU).
"""

from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from peftlab.accel.loss import CHUNK_ROWS
from peftlab.accel.recompute import observing_kept, recomputing
from peftlab.measure.memory import peak_rss_bytes

MB = 2**20
CLEAR_REFS = "/proc/self/clear_refs"
PROBE_BATCHES = (8, 16)  # (4, 8) overshot batch 32 by ~28% for T5 LoRA with the lean kernels


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
    """(bytes autograd keeps for backward, largest such tensor) for one forward pass; weights excluded, and
    what `recompute.recomputing()` rebuilds in backward instead of keeping."""
    weights = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        ptr, nbytes = _storage(t)
        if ptr not in weights and ptr != 0:
            saved[ptr] = nbytes

    with observing_kept(count), recomputing():
        compute_loss(model, batch)
    return sum(saved.values()), max(saved.values(), default=0)


def estimate_parts(model: nn.Module, one_example: dict[str, torch.Tensor], batch_size: int, compute_loss,
                   chunked_vocab: int | None) -> MemoryParts:
    """Predicted peak training memory for `batch_size` copies of `one_example` (fp32 AdamW)."""
    was_training = model.training
    model.train()
    try:
        step = probed_step_bytes(model, one_example, batch_size, compute_loss)
        if step is None:
            step = saved_step_bytes(model, one_example, batch_size, compute_loss, chunked_vocab)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    gradients = trainable_bytes(model)
    return MemoryParts(weight_bytes(model), gradients, 2 * gradients, max(step - gradients, 0))


def saved_step_bytes(model: nn.Module, one_example, batch_size: int, compute_loss, chunked_vocab: int | None) -> int:
    """A step's memory from what autograd saves at batch 1, times the batch, plus a backward workspace
    (used where the process's peak memory cannot be read and reset)."""
    saved, largest = saved_for_backward(model, one_example, compute_loss)
    workspace = 2 * largest * batch_size
    if chunked_vocab:
        rows = min(CHUNK_ROWS, batch_size * int((one_example["labels"] != -100).sum()))
        workspace = max(workspace, rows * chunked_vocab * 4)  # one chunk's logits (softmax in place)
    return saved * batch_size + workspace + trainable_bytes(model)


def probed_step_bytes(model: nn.Module, one_example, batch_size: int, compute_loss) -> int | None:
    """A step's memory (forward + backward: activations, temporaries, gradients) measured at two small
    batches and extrapolated linearly; None where the peak cannot be reset (only Linux /proc can)."""
    if not os.path.exists(CLEAR_REFS):
        return None
    sizes = sorted({min(PROBE_BATCHES[0], batch_size), min(PROBE_BATCHES[1], batch_size)})
    gc.collect()
    _release_freed_memory()
    base = _current_rss()
    with open(CLEAR_REFS, "w") as f:
        f.write("5")  # resets this process's peak RSS (VmHWM) to its current RSS
    peaks = []
    for n in sizes:
        batch = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in one_example.items()}
        compute_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        peaks.append(peak_rss_bytes() - base)
    if len(sizes) == 1:
        return peaks[0]
    slope = max(peaks[1] - peaks[0], 0) / (sizes[1] - sizes[0])
    return int(peaks[0] + slope * (batch_size - sizes[0]))


def _release_freed_memory() -> None:
    """Hand memory that the allocator keeps after frees back to the system, so the probes' peaks are their
    own: tcmalloc's or jemalloc's cache where `peftlab` preloaded one (peftlab/accel/allocator.py), else
    glibc's heap."""
    try:
        process = ctypes.CDLL(None)
    except (OSError, TypeError):
        return
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        process.MallocExtension_ReleaseFreeMemory()
    elif hasattr(process, "mallctl"):
        process.mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
    elif hasattr(process, "malloc_trim"):
        process.malloc_trim(0)


def _current_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
