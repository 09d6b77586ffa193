"""Language-model loss without the full logits tensor.

A plain LM loss materialises batch x length x vocabulary logits (flan-t5-small at batch 32, 64 target
tokens: 2048 x 32128 fp32 = 263 MB), keeps its log-softmax for backward and allocates its gradient too.
`ChunkedCrossEntropy` scores only positions that carry a label, a chunk of rows at a time, and computes the
gradient as it goes, keeping only that (the size of the hidden states). Same math as
`F.cross_entropy(h @ W.T, y)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from peftlab.accel import products
from peftlab.accel.recompute import recomputing
from peftlab.archs import arch_of
from peftlab.data.tasks import IGNORE_INDEX

CHUNK_ROWS = 128  # rows per chunk: 128 x 32,128 fp32 = 16 MiB alive; smaller chunks were slower (bench/)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Forward scores each chunk once and, when a gradient is wanted, computes the gradient of the summed
    loss right there (softmax - one-hot, times W and h): backward only scales it by the incoming gradient,
    so the logits are never recomputed (the saved gradient is the size of the hidden states)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, y = hidden[rows], targets[rows]
            if not (want_hidden or want_weight):
                total -= torch.log_softmax((h @ weight.T).float(), dim=-1).gather(1, y[:, None]).sum()
                continue
            # one call per chunk: its vocabulary-sized buffer is freed before the next chunk's is made
            log_likelihood, grad_weight = chunk_loss_and_gradients(
                h, weight, y, want_weight, grad_weight, None if grad_hidden is None else grad_hidden[rows])
            total -= log_likelihood
        if want_weight and grad_weight is None:  # no position carried a label
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        count = max(hidden.shape[0], 1)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # scaled in place: a scaled copy would hold a second head-sized tensor (vocabulary x width: 63 MiB for
        # flan-t5-small) at the top of the step's memory, so the saved gradients serve one backward only
        if getattr(ctx, "scaled", False):
            raise RuntimeError("the chunked loss takes one backward per forward (retain_graph): compute the loss "
                               "again, or use training_loss(model, chunked=False)")
        ctx.scaled = True
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.count
        return (None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype)),
                None if grad_weight is None else grad_weight.mul_(scale.to(grad_weight.dtype)), None, None)


def chunk_loss_and_gradients(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, want_weight: bool,
                             grad_weight: torch.Tensor | None, grad_hidden: torch.Tensor | None):
    """One chunk's summed log-likelihood of its targets, with the gradient of the summed loss written into
    `grad_hidden` (where given) and added into `grad_weight` (made on the first chunk; returned)."""
    logits = products.mm_t(h, weight).float()
    target_logit, top_logit = logits.gather(1, y[:, None]), logits.amax(-1, keepdim=True)
    d_logits = flushed_softmax_(logits, top_logit)
    log_likelihood = log_softmax_at(target_logit, top_logit, d_logits).sum()
    d_logits[torch.arange(h.shape[0]), y] -= 1  # d (summed loss) / d logits
    d_logits = d_logits.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden.copy_(products.mm_t(d_logits, weight.T))
    if want_weight:  # in the weight's dtype for every chunk (autocast leaves out= products alone), in
        # place: no zero fill, no temporary per chunk
        d_logits_t, h_w = d_logits.T.to(weight.dtype), h.to(weight.dtype)
        if grad_weight is None:
            grad_weight = torch.mm(d_logits_t, h_w, out=torch.empty_like(weight))
        else:
            grad_weight.addmm_(d_logits_t, h_w)
    return log_likelihood, grad_weight


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written over `logits` (a chunk of the vocabulary's size that is not
    needed again): one such buffer alive instead of two. The kernels finish reading a row before writing it
    (tests compare it with `torch.softmax` bit for bit)."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def flushed_softmax_(logits: torch.Tensor, top_logit: torch.Tensor) -> torch.Tensor:
    """`flush_subnormal_(softmax_(logits))`, written over `logits` (each row's top given), without computing the
    probabilities that the flush zeroes anyway. A logit more than -ln(tiny / 2) (87.3 in fp32) below its row's
    top has exp under half the smallest normal number, and the row's sum is at least 1 (the top's own term): it
    is set to -inf first, so exp returns zero. On Intel CPUs an exp with a subnormal result runs through a
    microcode assist, several times slower (a random-init model's softmax holds many subnormals). The terms left
    out are below what the sum (>= 1) can register, so the result is the flushed softmax bit for bit (tests)."""
    logits.sub_(top_logit)  # softmax subtracts the row's top itself: the same differences, and it now subtracts 0
    cut = math.log(torch.finfo(logits.dtype).tiny / 2)
    torch.nn.functional.threshold_(logits, cut, -math.inf)  # NaN compares false: it stays NaN in the sum below
    return flush_subnormal_(softmax_(logits))


def flush_subnormal_(probs: torch.Tensor) -> torch.Tensor:
    """Set probabilities not above the dtype's smallest normal number (fp32: 1.2e-38) to zero, in place.

    A spread-out softmax (a random-init model starts at a loss near 94) puts part of each chunk below that,
    and Intel CPUs multiply subnormals through microcode assists: the chunk's `d_logits @ W` ran at 6 GFLOP/s
    against 300 (bench/RESULTS.md). Terms this small vanish in the rounding of the sums they join: the hidden
    states' gradient comes out the same bit for bit, the head's differs only in entries that are themselves
    ~1e-38 (tests). Local to the loss: torch.set_flush_denormal would flush every operator of the process
    and need not reach threads already started."""
    return torch.nn.functional.threshold_(probs, torch.finfo(probs.dtype).tiny, 0.0)


def log_softmax_at(target_logit: torch.Tensor, top_logit: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, y_i] from the softmax already computed: z_y - z_max + log(p_max), where
    p_max >= 1 / vocabulary never underflows (p_y may: a loss of 94 is e^-94), so no second pass of exp."""
    return (target_logit - top_logit + probs.amax(-1, keepdim=True).log()).squeeze(1)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, over positions whose label is not -100."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    return ChunkedCrossEntropy.apply(hidden[keep], weight, labels[keep], chunk)


def supports_chunked_loss(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    arch = arch_of(model.config.model_type)
    return arch is not None and arch.plain_lm_head and isinstance(head, nn.Linear) and head.bias is None


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


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model itself returns for a batch with labels."""
    return model(**batch).loss


def training_loss(model: nn.Module, chunked: bool = True, redraw_masks: bool = False,
                  recompute: bool = True) -> Callable[[nn.Module, dict], torch.Tensor]:
    """The loss a training step backpropagates: `lm_loss` where `chunked` and the model supports it, else the
    model's own; with `recompute`, its forward runs under `recompute.recomputing(redraw_masks)`."""
    compute = lm_loss if chunked and supports_chunked_loss(model) else model_loss
    if not recompute:
        return compute

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with recomputing(redraw_masks):
            return compute(m, batch)
    return loss
