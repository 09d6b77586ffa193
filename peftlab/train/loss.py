"""Language-model loss without the full logits tensor.

A plain LM loss materialises batch x length x vocabulary logits (flan-t5-small at batch 32, 64 target
tokens: 2048 x 32128 fp32 = 263 MB), keeps its log-softmax for backward and allocates its gradient too.
`ChunkedCrossEntropy` scores only positions that carry a label, a chunk of rows at a time, and saves only
the hidden states: backward recomputes each chunk's logits. Same math as `F.cross_entropy(h @ W.T, y)`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.tasks import IGNORE_INDEX

CHUNK_ROWS = 1024
SUPPORTED = ("t5", "mt5", "gpt2", "llama", "mistral", "qwen2")  # lm_head output is the logits, nothing added


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start:start + chunk] @ weight.T
            total += F.cross_entropy(logits.float(), targets[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return total / max(hidden.shape[0], 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        scale = grad_output / max(hidden.shape[0], 1)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            probs = torch.softmax((h @ weight.T).float(), dim=-1)
            probs[torch.arange(h.shape[0]), targets[start:start + ctx.chunk]] -= 1  # d loss / d logits
            probs = (probs * scale).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = probs @ weight
            if grad_weight is not None:
                grad_weight += probs.T @ h
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, over positions whose label is not -100."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    return ChunkedCrossEntropy.apply(hidden[keep], weight, labels[keep], chunk)


def supports_chunked_loss(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return (model.config.model_type in SUPPORTED and isinstance(head, nn.Linear) and head.bias is None)


@contextlib.contextmanager
def _hidden_states_out(model: nn.Module):
    """Inside the block the model returns its final hidden states where it would return logits."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own LM loss (HF semantics: mean over labelled tokens), computed chunk by chunk."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = model._shift_right(labels)
    with _hidden_states_out(model) as head:
        hidden = model(**inputs, use_cache=False).logits
    if not model.config.is_encoder_decoder:  # position t predicts token t + 1
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    return chunked_cross_entropy(hidden, head.weight, labels)
