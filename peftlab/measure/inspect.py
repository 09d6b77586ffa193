"""`peftlab inspect`: what a model is made of and what a method would train."""

from __future__ import annotations

from peftlab.measure.sizes import bytes_by_dtype, count_parameters, module_suffix_counts, trainable_line
from peftlab.methods.inject import apply, linear_module_names
from peftlab.models import load_model


def inspect_model(name: str, config=None, task: str | None = None) -> str:
    """A plain-text report; with a method config, ends with peft's trainable-parameter line."""
    model, _ = load_model(name, task=task)
    _, total = count_parameters(model)
    buffers = sum(b.numel() for b in model.buffers())
    lines = [f"model: {name} ({type(model).__name__})",
             f"parameters: {total:,d}   buffers: {buffers:,d}"]
    for dtype, (elements, nbytes) in sorted(bytes_by_dtype(model).items()):
        lines.append(f"  {dtype}: {elements:,d} elements, {nbytes / 1e6:,.1f} MB")
    suffixes = module_suffix_counts(linear_module_names(model))
    lines.append("targetable linear modules (suffix x count): "
                 + ", ".join(f"{s} x{n}" for s, n in sorted(suffixes.items())))
    if config is not None:
        adapted = apply(model, config)
        lines.append(f"Using {config.method.upper()}: {config}")
        lines.append(trainable_line(adapted))
    return "\n".join(lines)
