"""The one place a training run meets the speed and memory devices: `prepare` switches what the device's policy
allows (policy.py) and returns what the loop uses each step: the loss, precision, backward and optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.accel import policy, products
from peftlab.accel.lean import clipped_step, gradient_norms, make_lean, sparse_embedding_gradients
from peftlab.accel.loss import training_loss
from peftlab.errors import PeftlabError


@dataclass
class Accelerated:
    """What `prepare` chose for a run, and the per-step operations that depend on it."""

    switches: policy.Switches
    switched: list[str]  # a line per kind of module switched to its lean version (for the run's header)
    loss: Callable[[nn.Module, dict], torch.Tensor]
    precision: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # fp16: scales the loss so small gradients do not underflow
    warnings: list[str] = field(default_factory=list)  # for the run's header
    _inside: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def __enter__(self) -> Accelerated:
        self._inside.enter_context(products.linear_backend(self.switches.onednn))
        return self

    def __exit__(self, *exc) -> None:
        self._inside.close()

    def autocast(self):
        """The forward pass's precision: fp32 as it is, bf16 or fp16 under autocast."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def backward_scope(self, model: nn.Module):
        """Around a step's backward passes (sparse embedding gradients, where on)."""
        return sparse_embedding_gradients(model, enabled=self.switches.sparse_embeddings)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def gradient_norms(self, optimizer: torch.optim.Optimizer,
                       parameters: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Each gradient's norm, unscaled first under fp16 (so the clip and the logged norms are the true ones)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return gradient_norms(parameters)

    def step(self, optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_norm: float,
             norms: Mapping[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Clip, step and zero the gradients; returns the norm before clipping. Under fp16 a step whose gradients
        overflowed is skipped and the loss scale lowered, as torch.amp.GradScaler does."""
        return clipped_step(optimizer, parameters, max_norm, norms, self.scaler)


def prepare(model: nn.Module, device: torch.device, run, task: str, distributed: bool = False,
            fsdp: bool = False) -> Accelerated:
    """Check the precision for this device and switch `model` to what the device's policy and `run` (a config's
    run section) turn on, now; inside `with` the returned object, products go through the chosen backend.
    Weights, names and state dicts are unchanged."""
    check_precision(run.precision, device)
    on = policy.switches(run, device, distributed, fsdp)
    switched = make_lean(model, linear=run.recompute_linear, onednn=on.onednn) if on.lean_kernels else []
    loss = training_loss(model, on.chunked_loss and task != "classification", run.redraw_masks, on.recompute)
    scaler = torch.amp.GradScaler(device.type) if run.precision == "fp16" else None
    warnings = []
    if run.precision == "fp16" and device.type == "cpu":
        warnings.append("fp16 on a CPU runs its products without fp16 hardware on most CPUs, many times slower "
                        "than fp32: use --precision bf16 or fp32 here")
    return Accelerated(on, switched, loss, run.precision, device, scaler, warnings)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp32":
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not torch.amp.is_autocast_available(device.type):
        raise PeftlabError(f"--precision {precision} needs autocast, which {device.type} lacks: use fp32")
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except (RuntimeError, AssertionError) as e:
        raise PeftlabError(f"--precision {precision} does not run on {device.type} ({' '.join(str(e).split())[:120]}):"
                           " use fp32 or bf16") from None
