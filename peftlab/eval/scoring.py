"""Loss and accuracy of a model over batches, without gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from peftlab.accel.loss import lm_loss, supports_chunked_loss
from peftlab.train.distributed import loss_units


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
          on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Mean loss over every labelled token (LMs) or example (classification), the same however the data is
    batched; perplexity for LMs, accuracy for classification; `on_batch()` is called after each batch."""
    was_training = model.training
    model.eval()
    loss_sum, units, correct, classification = 0.0, 0, 0, False
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = loss_units(batch, causal=not model.config.is_encoder_decoder)  # tokens, or examples for classification
        units += n
        if batch["labels"].dim() == 2 and supports_chunked_loss(model):  # no batch x length x vocab logits
            loss_sum += float(lm_loss(model, batch)) * n
        else:
            out = model(**batch)
            loss_sum += float(out.loss) * n
            if batch["labels"].dim() == 1:
                classification = True
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        if on_batch:
            on_batch()
    model.train(was_training)
    metrics = {"eval_loss": loss_sum / max(units, 1)}
    if classification:
        metrics["eval_accuracy"] = correct / max(units, 1)
    else:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    return metrics
