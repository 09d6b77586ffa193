"""Parameter counts and sizes, in peft's wording where peft has one."""

from __future__ import annotations

from collections import Counter, defaultdict

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, counted as peft's `print_trainable_parameters` does."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    """The exact line peft prints: `trainable params: 172,032 || all params: ... || trainable%: 0.2230`."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def bytes_by_dtype(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{dtype: (elements, bytes)} over parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        entry = sizes[str(t.dtype).removeprefix("torch.")]
        entry[0] += t.numel()
        entry[1] += t.numel() * t.element_size()
    return {k: (v[0], v[1]) for k, v in sizes.items()}


def module_suffix_counts(names: list[str]) -> Counter:
    """How many modules end in each last name component (`q`: 24, `v`: 24, ...)."""
    return Counter(n.rsplit(".", 1)[-1] for n in names)
