"""`peftlab inspect`: what a model is made of and what a method would train."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from peftlab.accel.lean import make_lean
from peftlab.accel.loss import supports_chunked_loss, training_loss
from peftlab.errors import PeftlabError
from peftlab.measure.estimate import MemoryParts, estimate_parts
from peftlab.measure.sizes import bytes_by_dtype, count_parameters, module_suffix_counts, trainable_line
from peftlab.methods import build_config
from peftlab.methods.inject import LINEAR_TYPES, MethodConfig, apply, linear_module_names
from peftlab.methods.qlora import quantization_report, quantized_layers
from peftlab.models import check_lengths, load_model, position_limit, resolve_task


def _method_config(model: nn.Module, method: MethodConfig | str | None, fields: dict | None) -> MethodConfig | None:
    """A config as given, or built from a method name and fields with the model's default targets."""
    if isinstance(method, str):
        method = build_config(method, model.config.model_type, **(fields or {}))
    return None if method is None or method.trains_base else method


def inspect_model(name: str, method: MethodConfig | str | None = None, task: str | None = None,
                  fields: dict | None = None) -> str:
    """A plain-text report; with a method, ends with peft's trainable-parameter line."""
    model, _ = load_model(name, task=task)
    config = _method_config(model, method, fields)
    _, total = count_parameters(model)
    buffers = sum(b.numel() for b in model.buffers())
    lines = [f"model: {name} ({type(model).__name__})",
             f"parameters: {total:,d}   buffers: {buffers:,d}"]
    for dtype, (elements, nbytes) in sorted(bytes_by_dtype(model).items()):
        lines.append(f"  {dtype}: {elements:,d} elements, {nbytes / 1e6:,.1f} MB")
    lines.append(f"checkpoint on disk: {checkpoint_bytes(name, model) / 1e6:,.1f} MB (safetensors)")
    suffixes = module_suffix_counts(linear_module_names(model))
    lines.append("targetable linear modules (suffix x count): "
                 + ", ".join(f"{s} x{n}" for s, n in sorted(suffixes.items())))
    if config is not None:
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
        adapted = apply(model, config)
        lines.append(f"Using {config.method.upper()}: {config}")
        if quantized_layers(adapted):
            lines.append(quantization_report(adapted, originals))
        lines.append(trainable_line(adapted))
    return "\n".join(lines)


def checkpoint_bytes(name: str, model: nn.Module) -> int:
    """The weight files of a local directory, or the size of the model saved as safetensors."""
    files = [p for p in Path(name).glob("*") if p.suffix in (".safetensors", ".bin")] if Path(name).is_dir() else []
    if files:
        return sum(p.stat().st_size for p in files)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/model.safetensors")
        return (Path(tmp) / "model.safetensors").stat().st_size


MAX_PROBE_TOKENS = 32_768  # the probe runs real steps: a model without a position limit still needs a bound


def estimate_memory(name: str, method: MethodConfig | str | None = None, task: str | None = None,
                    batch_size: int = 8, source_len: int = 128, target_len: int = 64, overrides: dict | None = None,
                    fields: dict | None = None, lean_kernels: bool = True,
                    recompute_linear: bool = False) -> tuple[str, MemoryParts]:
    """Predicted peak training memory (fp32, AdamW) of full fine-tuning (method None or "full"), or of a
    method (a config, or a name and `fields`); with the lean kernels as training uses them by default, and
    `recompute_linear` as `run.recompute_linear`."""
    for flag, value in (("--batch-size", batch_size), ("--source-len", source_len), ("--target-len", target_len)):
        if value <= 0:
            raise PeftlabError(f"{flag} must be positive, got {value}")
    model, _ = load_model(name, task=task, overrides=overrides)
    flags = ("--source-len", "--target-len")
    check_lengths(model.config, resolve_task(name, task), source_len, target_len, flags=flags)
    if position_limit(model.config) is None and source_len + target_len > MAX_PROBE_TOKENS:
        raise PeftlabError(f"--source-len {source_len} + --target-len {target_len} is more than the {MAX_PROBE_TOKENS} "
                           "tokens the estimate's probe steps run at: give realistic lengths")
    config = _method_config(model, method, fields)
    if config is not None:
        model = apply(model, config)
    else:
        model.requires_grad_(True)
    if lean_kernels:
        make_lean(model, linear=recompute_linear)
    example = _example(model, source_len, target_len)
    chunked = supports_chunked_loss(model) and example["labels"].dim() == 2
    parts = estimate_parts(model, example, batch_size, training_loss(model, chunked),
                           model.config.vocab_size if chunked else None)
    what = config.method.upper() if config is not None else "full fine-tuning"
    return (f"estimated peak training memory, {what}, batch {batch_size}, {source_len} source / {target_len} target "
            f"tokens (fp32, AdamW):\n  {parts.line()}"), parts


def _example(model: nn.Module, source_len: int, target_len: int) -> dict[str, torch.Tensor]:
    """One example of the given lengths (token ids drawn from the vocabulary, no padding)."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 259)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, vocab, (1, n), generator=generator)

    if model.config.is_encoder_decoder:
        return {"input_ids": ids(source_len), "attention_mask": torch.ones(1, source_len, dtype=torch.long),
                "labels": ids(target_len)}
    if type(model).__name__.endswith("ForSequenceClassification"):
        return {"input_ids": ids(source_len), "attention_mask": torch.ones(1, source_len, dtype=torch.long),
                "labels": torch.tensor([0])}
    input_ids = ids(source_len + target_len)
    labels = input_ids.clone()
    labels[:, :source_len] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
