"""Which same-math speed and memory switches a run uses, by device: the one table to read.

Every switch below was measured on CPU only (bench/RESULTS.md). On CUDA and MPS the model runs as transformers
ships it (its SDPA attention, its own loss, no saved-tensor hooks) until a switch is measured there; the
run.* settings then have no effect, and the run says so.

| switch            | what it does (same math)                                         | cpu | cuda | mps |
|-------------------|------------------------------------------------------------------|-----|------|-----|
| lean_kernels      | modules that keep less for backward (accel/lean.py)              | on  | off  | off |
| chunked_loss      | LM loss in chunks, no batch x length x vocab logits (loss.py)    | on  | off  | off |
| recompute         | backward rebuilds cheap tensors instead of keeping them          | on  | off  | off |
| sparse_embeddings | sparse embedding gradients until the optimizer step (one process)| on  | off  | off |
| onednn            | fp32 linear products through oneDNN where MKL is slower          | on  | off  | off |

("on" = as run.* asks; each also needs its own setting: run.lean_kernels, run.chunked_loss, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEASURED = {"cpu": {"lean_kernels", "chunked_loss", "recompute", "sparse_embeddings", "onednn"}}


@dataclass(frozen=True)
class Switches:
    lean_kernels: bool
    chunked_loss: bool
    recompute: bool
    sparse_embeddings: bool
    onednn: bool

    def off_here(self, run) -> list[str]:
        """The switches run.* asks for that this device leaves off (for the run's header)."""
        asked = {"lean_kernels": run.lean_kernels, "chunked_loss": run.chunked_loss}
        return [name for name, wanted in asked.items() if wanted and not getattr(self, name)]


def switches(run, device: torch.device, distributed: bool = False, fsdp: bool = False) -> Switches:
    """What this run uses: what run.* asks, where it was measured on this device's type."""
    measured = MEASURED.get(device.type, set())
    lean = run.lean_kernels and "lean_kernels" in measured
    from peftlab.accel import products

    return Switches(
        lean_kernels=lean,
        chunked_loss=run.chunked_loss and "chunked_loss" in measured and not fsdp,  # FSDP: lm_head is sharded
        recompute="recompute" in measured,
        # fp16's loss scaler unscales and steps all gradients at once, not the sparse ones after the others
        sparse_embeddings=lean and "sparse_embeddings" in measured and not distributed and run.precision != "fp16",
        onednn=lean and "onednn" in measured and products.wants_onednn(run.linear_backend))
