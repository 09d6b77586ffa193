"""Same-math speed and memory devices, behind one boundary: the training loop calls `prepare` once and uses what
it returns (the loss, precision, backward and optimizer step). Which device turns on what: `policy.py`.

| module          | what it holds                                                                  |
|-----------------|--------------------------------------------------------------------------------|
| boundary.py     | `prepare(model, device, run, task)` -> `Accelerated`                          |
| policy.py       | the table of switches by device                                                |
| lean.py         | modules that keep less for backward, swapped in by class; the fused clip+step  |
| lora.py         | LoRA's mask-saving dropout path, swapped in for `methods.lora.LoraLayer`        |
| recompute.py    | tensors rebuilt in backward instead of kept                                    |
| products.py     | fp32 matrix products through oneDNN where MKL is slower                        |
| loss.py         | the LM loss in chunks, without batch x length x vocabulary logits              |
| allocator.py    | tcmalloc or jemalloc preloaded before torch starts                             |

Nothing here changes a result beyond floating-point order: each device is tested against the module it replaces.
This package's `__init__` loads nothing heavy: `peftlab` picks its allocator (allocator.py) before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftlab.accel.boundary import Accelerated, prepare

__all__ = ["Accelerated", "prepare"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from peftlab.accel import boundary

        return getattr(boundary, name)
    raise AttributeError(f"module 'peftlab.accel' has no attribute {name!r}")
