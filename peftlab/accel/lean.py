"""Lean kernels: the same math as a model's own modules, cheaper dropout masks and less kept for backward.

`make_lean(model)` switches modules in place by class (a subclass with a leaner forward), never their weights
or names, so state dicts, adapters and checkpoints are unchanged. What it switches:

- every `nn.Dropout`: the keep mask is drawn as integers, on CPU 8-bit ones from numpy's SFC64 with the rate
  still exact (`keep_from_8_bits`; several times as fast as `bernoulli_`), and only the mask is kept for
  backward, its bits packed eight to a byte (under `recompute.recomputing()`, as the training loss runs;
  bool masks, a byte an entry, elsewhere and for masks torch draws); with `run.redraw_masks` not even that:
  backward draws it again from its seed.
- GELU(tanh) written out in Python (`gelu_new`: T5, GPT-2), which keeps four full-size tensors for backward:
  the same function as one fused kernel that keeps its input.
- RMSNorm (T5, Llama): one function that keeps x and 1/rms, not x and the normalised x, in fewer passes.
- T5's gated-GELU feed-forward: GELU(gate) * up as one function that keeps gate and up and recomputes the
  GELU in backward (plain autograd keeps gelu(gate) too).
- LoRA's layers (`accel/lora.py`): the dropout above, inside the low-rank product.
- T5, GPT-2 and BART attention: softmax(q k^T + position bias + mask), dropout, times v, as one function
  that keeps q, k, v and the dropout mask and recomputes the probabilities in backward (the stock
  paths keep the probabilities and their dropped-out copy, batch x heads x length x length each, per layer).

Around each training step's backward (`sparse_embedding_gradients`, CPU, one process), trainable embedding
tables of 4,096 rows or more that are not tied to the output layer get sparse gradients, the rows the batch
used, made dense only for the optimizer step and after the other gradients are freed (`clipped_step`), so
the dense gradient of a large table never sits beside the activations (figures: bench/RESULTS.md).

Their outputs that are cheap to rebuild from what backward keeps anyway are marked `recomputable`
(`peftlab/accel/recompute.py`; the training loss runs under `recomputing()`): the normalised x that RMSNorm
hands to q, k, v (or to LoRA) and to the feed-forward, T5's dropout(GELU(gate) * up) that a training `wo`
keeps for its weight gradient; with `run.redraw_masks`, every dropout mask drawn by numpy (from its seed).
Where `run.linear_backend` takes oneDNN (`make_lean(onednn=True)`; AMD CPUs), every `nn.Linear` computes
its output and its input's gradient through it (`peftlab/accel/products.py`).

With `run.recompute_linear` (`make_lean(linear=True)`) every `nn.Linear` whose input is marked marks its
output too, and so do LoRA's layers, so what attention keeps of q, k and v and what T5's feed-forward keeps
of gate and up are recomputed in backward from the normalised x: a matrix product again for each, for less
memory (not every tensor backward keeps is elementwise to rebuild, so this one costs time).

Each is tested against the module it replaces (outputs and gradients, with the same dropout mask).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import AttentionInterface
from transformers.activations import NewGELUActivation
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from peftlab.accel import products
from peftlab.accel.recompute import is_recomputable, recomputable, redraws_masks
from peftlab.archs import arch_of, rms_norm_styles

LEAN_ATTENTION = "peftlab_lean"
NUMPY_MASK_MIN = 2**16  # mask entries; below this, seeding SFC64 costs more than it saves
SPARSE_GRADIENT_MIN_ROWS = 4096  # embedding tables smaller than this (T5's position buckets) gain nothing


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """A boolean mask, each entry True with probability 1 - p. Seeded from torch's generator, so
    `torch.manual_seed` reproduces it. A mask drawn by numpy (CPU) is marked `recomputable`: under
    `recompute.recomputing()` backward keeps its bits packed eight to a byte, and with `redraw_masks=True`
    only its seed (backward draws it again)."""
    count = math.prod(shape)
    if torch.device(device).type == "cpu" and count >= NUMPY_MASK_MIN:
        # numpy's SFC64 draws 8-bit lanes; torch's CPU generator (mt19937) draws 32 bits an entry, then compares
        seed, shape = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)), tuple(shape)
        keep = seeded_keep_mask(seed, shape, p)
        if redraws_masks():
            return recomputable(keep, seeded_keep_mask, (), seed, shape, p)
        # kept packed eight to a byte: unpacking in backward is cheap next to keeping a byte an entry
        return recomputable(keep, unpacked_mask, (torch.from_numpy(np.packbits(keep.numpy())),), shape)
    threshold = min(round(p * 2**32) - 2**31, 2**31 - 1)  # an int32 either way (p within 2^-33 of 1: keep ~0)
    bits = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    return (bits.view(torch.int32)[:count] >= threshold).view(shape)


def seeded_keep_mask(seed: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The mask `keep_mask` draws from `seed` with numpy's SFC64."""
    # numpy's work is no torch operator: named for profiles, only while one records (entering a record_function
    # costs time in every step, over a hundred masks a step)
    profiling = torch._C._autograd._profiler_enabled()
    with record_function("peftlab::keep_mask") if profiling else contextlib.nullcontext():
        keep = keep_from_8_bits(seeded_sfc64(seed), p, np.empty(math.prod(shape), dtype=bool))
    return torch.from_numpy(keep.reshape(shape))  # not a view: `recomputing()` finds a mark on the base


_sfc64 = threading.local()  # one generator per thread, restarted for each mask


def seeded_sfc64(seed: int) -> np.random.SFC64:
    """numpy's SFC64 started from `seed` as its author seeds it from one number: a = b = c = seed, counter 1,
    12 outputs discarded. The thread's generator is restarted, not constructed: construction seeds through a
    SeedSequence, which costs more than drawing a mask."""
    generator = getattr(_sfc64, "generator", None)
    if generator is None:
        generator = _sfc64.generator = np.random.SFC64()
    generator.state = {"bit_generator": "SFC64", "state": {"state": np.array([seed, seed, seed, 1], dtype=np.uint64)},
                       "has_uint32": 0, "uinteger": 0}
    generator.random_raw(12)
    return generator


def unpacked_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean mask of `shape` whose bits `np.packbits` packed into `packed`."""
    bits = np.unpackbits(packed.numpy(), count=math.prod(shape))
    return torch.from_numpy(bits.view(bool).reshape(shape))


def keep_from_8_bits(generator: np.random.BitGenerator, p: float, out: np.ndarray) -> np.ndarray:
    """Fill `out` with booleans, each True with probability 1 - p, from eight 8-bit draws per 64-bit number.
    The one 8-bit value that straddles p (1 entry in 256) is settled by a 64-bit draw, so the rate is p to
    2^-64, not rounded to 2^-8. (Half the draws of 16-bit lanes, whose straddling value is rarer.)"""
    edge = math.floor(p * 2**8)  # 8-bit values below it drop; the value equal to it drops with the remainder
    if edge >= 2**8:
        out[:] = False
        return out
    bits = generator.random_raw((out.size + 7) // 8).view(np.uint8)[:out.size]
    np.greater(bits, edge, out=out)
    ties = np.flatnonzero(bits == edge)
    if ties.size:
        out[ties] = generator.random_raw(ties.size) >= np.uint64(int((p * 2**8 - edge) * 2**64))
    return out


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale (a new tensor of x's shape and dtype), as torch's own dropout computes it (a NaN in a
    dropped entry stays NaN). The mask is read as bytes: on CPU, converting a bool tensor or multiplying by
    one runs a slow path, ~3x the time of uint8 -> float and two in-place products."""
    return keep.view(torch.uint8).to(x.dtype).mul_(x).mul_(scale)


class MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return masked_scale(grad, keep, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout` with a cheaper mask: zero each entry with probability p, scale the rest by 1 / (1 - p).
    The dropout of a `recomputable` tensor is recomputable too (from its recipe and the mask)."""
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    keep = keep_mask(x.shape, p, x.device)
    out = MaskedScale.apply(x, keep, 1 / (1 - p))
    return recomputable(out, masked_scale, (x, keep), 1 / (1 - p)) if is_recomputable(x) else out


class LeanLinear(nn.Linear):
    """nn.Linear through `products.linear`: oneDNN's products where `run.linear_backend` takes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return products.linear(x, self.weight, self.bias)


class RecomputedLinear(LeanLinear):
    """LeanLinear whose output, when its input is `recomputable` and autograd records, is marked recomputable
    from the input and the weights (`make_lean(linear=True)`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if torch.is_grad_enabled() and is_recomputable(x):
            args = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
            recomputable(out, products.linear, args)
        return out


def recomputable_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, marked recomputable when both are."""
    out = a + b
    return recomputable(out, torch.add, (a, b)) if is_recomputable(a) and is_recomputable(b) else out


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous(); a copy of a recomputable tensor (or of a view of one) is marked recomputable."""
    copy = t.contiguous()
    return recomputable(copy, torch.Tensor.contiguous, (t,)) if copy is not t and is_recomputable(t) else copy


class LeanDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class LeanTanhGELU(NewGELUActivation):
    """transformers' NewGELUActivation (GELU, tanh approximation) as one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def gated_gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


class GatedGELU(torch.autograd.Function):
    """gelu_tanh(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return gated_gelu(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        gelu_backward = torch.ops.aten.gelu_backward
        grad_gate = gelu_backward(grad * up, gate, approximate="tanh") if ctx.needs_input_grad[0] else None
        grad_up = grad * F.gelu(gate, approximate="tanh") if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class LeanT5GatedFF(T5DenseGatedActDense):
    """T5's gated-GELU feed-forward with the GELU and the gate fused (its dtype rule for `wo` kept)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.wi_0(hidden_states), self.wi_1(hidden_states)
        hidden_states = recomputable(GatedGELU.apply(gate, up), gated_gelu, (gate, up))
        hidden_states = self.dropout(hidden_states)  # recomputable too: what `wo` keeps for its weight gradient
        weight = self.wo.weight
        if isinstance(weight, torch.Tensor) and hidden_states.dtype != weight.dtype and weight.dtype != torch.int8:
            hidden_states = hidden_states.to(weight.dtype)
        return self.wo(hidden_states)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, normed_dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        normed = (_at_least_fp32(x) * rstd).to(normed_dtype)
        # in place where the product keeps normed's dtype (one buffer, not two; the same products)
        return normed.mul_(weight) if torch.result_type(normed, weight) == normed.dtype else weight * normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, normed_dtype: torch.dtype) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) through `RMSNorm`, the output marked `recomputable` from what that
    keeps for backward."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # RMSNorm's backward covers rstd's part
        xf = _at_least_fp32(x)
        rstd = torch.rsqrt(torch.linalg.vecdot(xf, xf, dim=-1).unsqueeze(-1) / x.shape[-1] + eps)
    return recomputable(RMSNorm.apply(x, weight, rstd, normed_dtype), rms_normed, (x, weight, rstd), normed_dtype)


class RMSNorm(torch.autograd.Function):
    """weight * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) given (`rms_norm` computes it), the statistics in
    fp32, the normalised x cast to `normed_dtype` before the weight (T5's and Llama's RMSNorm). Saves x and
    rstd; backward differentiates through rstd too and recomputes the normalised x (stock autograd keeps it
    when the weight trains), in four passes over x instead of about ten."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, normed_dtype: torch.dtype):
        ctx.save_for_backward(x, weight, rstd)
        ctx.normed_dtype = normed_dtype
        return rms_normed(x, weight, rstd, normed_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = _at_least_fp32(x)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (xf * rstd).to(ctx.normed_dtype)
            grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_normed = _at_least_fp32((grad * weight).to(ctx.normed_dtype))
            # d/dx of x * rstd: rstd * g - x * rstd^3 * mean(g * x)
            coefficient = torch.linalg.vecdot(grad_normed, xf, dim=-1).unsqueeze(-1) * rstd.pow(3) / x.shape[-1]
            grad_x = torch.addcmul(grad_normed * rstd, xf, coefficient, value=-1).to(x.dtype)
        return grad_x, grad_weight, None, None


def _t5_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's RMSNorm as one function (the normalised x goes to the weight's dtype only when that is half)."""
    half = self.weight.dtype in (torch.float16, torch.bfloat16)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.weight.dtype if half else torch.float32)


def _llama_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (Mistral's, Qwen2's) as one function (the normalised x goes back to the input's dtype)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, hidden_states.dtype)


RMS_FORWARDS = {"t5": _t5_rms_forward, "llama": _llama_rms_forward}  # by the arithmetic a family declares


@functools.cache
def lean_rms_norm(cls: type[nn.Module], style: str) -> type[nn.Module]:
    """`cls` (a family's RMSNorm, peftlab/archs) with the one-function forward of its arithmetic."""
    return type(f"Lean{cls.__name__}", (cls,), {"forward": RMS_FORWARDS[style], "__module__": __name__})


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dimensions that were broadcast from `shape`."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class BiasedAttention(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + bias + mask)) v, saving q, k, v, the (shared) bias and mask tensors and
    the keep mask; backward recomputes the probabilities. Products run in the inputs' dtype, the
    softmax in fp32 at least, both ways (as autocast runs the stock attention; autocast itself is off inside)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, p: float, scale: float):
        with torch.autocast(q.device.type, enabled=False):
            # heads arrive as transposed views: matmul would copy them on every use, twice in backward
            q, k, v = contiguous(q), contiguous(k), contiguous(v)  # recomputable with run.recompute_linear
            probs = BiasedAttention._probs(q, k, bias, mask, scale)
            keep = keep_mask(probs.shape, p, probs.device) if p > 0 else None
            ctx.save_for_backward(q, k, v, bias, mask, keep)
            ctx.p, ctx.scale = p, scale
            return torch.matmul(BiasedAttention._dropped(probs, keep, p).to(v.dtype), v)

    @staticmethod
    def _probs(q, k, bias, mask, scale: float) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        if scale != 1:
            scores.mul_(scale)
        for extra in (bias, mask):
            if extra is not None:
                scores.add_(extra.to(scores.dtype))
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
        return probs if keep is None else masked_scale(probs, keep, 1 / (1 - p))

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, keep = ctx.saved_tensors
        probs = BiasedAttention._probs(q, k, bias, mask, ctx.scale)
        grad_out = grad_out.to(v.dtype).contiguous()
        grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = torch.matmul(BiasedAttention._dropped(probs, keep, ctx.p).to(v.dtype).transpose(-1, -2), grad_out)
        grad_probs = BiasedAttention._dropped(torch.matmul(grad_out, v.transpose(-1, -2)).to(probs.dtype), keep, ctx.p)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_bias = _reduce_to(grad_scores, bias.shape).to(bias.dtype) if ctx.needs_input_grad[3] else None
        grad_mask = _reduce_to(grad_scores, mask.shape).to(mask.dtype) if ctx.needs_input_grad[4] else None
        if ctx.scale != 1:  # T5's is 1
            grad_scores = grad_scores * ctx.scale
        grad_scores = grad_scores.to(q.dtype)
        grad_q = torch.matmul(grad_scores, k) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, grad_bias, grad_mask, None, None


def lean_attention(module: nn.Module, query, key, value, attention_mask, scaling: float | None = None,
                   dropout: float = 0.0, position_bias: torch.Tensor | None = None, **kwargs):
    """An attention function for transformers' AttentionInterface (eager semantics, masks additive)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = BiasedAttention.apply(query, key, value, position_bias, attention_mask, dropout, scale)
    return output.transpose(1, 2).contiguous(), None


# stock class -> (lean subclass, what the summary line calls it)
LEAN_MODULES = {nn.Dropout: (LeanDropout, "dropout"), NewGELUActivation: (LeanTanhGELU, "gelu_new"),
                T5DenseGatedActDense: (LeanT5GatedFF, "gated-GELU feed-forward"),
}


@contextlib.contextmanager
def sparse_embedding_gradients(model: nn.Module, enabled: bool = True) -> Iterator[list[nn.Embedding]]:
    """Inside the block, backward gives each trainable embedding table (of at least SPARSE_GRADIENT_MIN_ROWS
    rows, not tied to the output layer) a sparse gradient: the rows the batch used, not the whole table (a dense
    one is allocated, zero-filled and summed while the encoder's activations are still alive: flan-t5-small's
    is 63 MiB, and the top of full fine-tuning's memory). `clipped_step` clips and steps with them. Yields the
    tables switched."""
    head = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse and m.weight.requires_grad
              and m.num_embeddings >= SPARSE_GRADIENT_MIN_ROWS and m.weight is not head] if enabled else []
    for table in tables:
        table.sparse = True
    try:
        yield tables
    finally:
        for table in tables:
            table.sparse = False


def gradient_norms(parameters: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """Each gradient's L2 norm by parameter, parameters without one left out: one pass over the gradients that
    serves both the clip (`clipped_step`) and the per-module norms a log step records (not a second pass over
    every gradient). A sparse gradient is coalesced in place first, so that
    rows the batch used twice count once."""
    dense = [p for p in parameters if p.grad is not None and not p.grad.is_sparse]
    # torch._foreach_norm, as get_total_norm takes them (on CPU one linalg.vector_norm each)
    norms = dict(zip(dense, torch._foreach_norm([p.grad for p in dense]), strict=True)) if dense else {}
    for p in parameters:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # `clipped_step`'s coalesce() then returns it as it is
            norms[p] = torch.linalg.vector_norm(p.grad.values())
    return norms


def clipped_step(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_norm: float,
                 norms: Mapping[torch.Tensor, torch.Tensor] | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """`clip_grad_norm_(parameters, max_norm)`, `optimizer.step()` and `zero_grad(set_to_none=True)`, for
    gradients dense or sparse (`sparse_embedding_gradients`); returns the gradient norm before clipping. `norms`:
    what `gradient_norms(parameters)` returned for these gradients, where the caller wanted them too. With a
    `scaler` (fp16), the gradients were unscaled before `norms` (`scaler.unscale_`), and the scaler steps: it
    skips a step whose gradients overflowed and adjusts the scale.

    Parameters with a sparse gradient step after the others, their gradient made dense once the others' are
    freed, so that it takes their memory: made dense beside them, a large table's gradient (flan-t5-small's is
    63 MiB) adds its size to the peak. Each parameter's
    update reads only its own gradient and state, so the two steps are the one step."""
    norms = gradient_norms(parameters) if norms is None else norms
    # get_total_norm's reduction of the per-tensor norms
    norm = torch.linalg.vector_norm(torch.stack(list(norms.values()))) if norms else torch.tensor(0.0)
    if scaler is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm
    sparse = [(p, p.grad.coalesce()) for p in parameters if p.grad is not None and p.grad.is_sparse]

    def step(group: list[torch.Tensor]) -> None:
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused optimizer divides each gradient by grad_scale as it reads it (AMP's unscaling): the clip
            # without a pass over the gradients of its own; the
            # coefficient is clip_grads_with_norm_'s, its 1e-6 included
            optimizer.grad_scale = 1 / torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        else:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        try:
            optimizer.step()  # skips parameters without a gradient
        finally:
            optimizer.__dict__.pop("grad_scale", None)
        optimizer.zero_grad(set_to_none=True)

    for p, _ in sparse:
        p.grad = None
    step(parameters)
    if sparse:
        for p, grad in sparse:
            p.grad = grad.to_dense()
        step([p for p, _ in sparse])
    return norm


def make_lean(model: nn.Module, attention: bool = True, linear: bool = False, onednn: bool = False) -> list[str]:
    """Switch `model`'s modules to the lean versions above, in place; returns a line per kind switched.
    `attention=False` keeps the model's own attention; `linear=True` switches `nn.Linear` to `RecomputedLinear`
    (`run.recompute_linear`: their outputs recomputed in backward), `onednn=True` to `LeanLinear` (products
    by oneDNN inside `products.linear_backend(True)`; a RecomputedLinear's are too)."""
    from peftlab.accel.lora import LeanLoraLayer  # it builds on this module's kernels
    from peftlab.methods.lora import LoraLayer

    switched: Counter[str] = Counter()
    linears = ({nn.Linear: (RecomputedLinear, "linear (recomputed in backward)")} if linear
               else {nn.Linear: (LeanLinear, "linear (oneDNN products)")} if onednn else {})
    modules = LEAN_MODULES | {LoraLayer: (LeanLoraLayer, "LoRA")} | linears
    rms_styles = rms_norm_styles()
    for module in model.modules():
        lean, kind = modules.get(type(module), (None, None))
        if lean is None and (style := rms_styles.get(type(module).__name__)):
            lean, kind = lean_rms_norm(type(module), style), "RMSNorm"
        if lean is LeanT5GatedFF and not isinstance(module.act, NewGELUActivation):
            continue  # the fused function is GELU(tanh)'s: other gated activations keep the stock module
        if lean is not None:
            module.__class__ = lean
            switched[kind] += 1
    if attention and (count := _switch_attention(model)):
        switched["attention"] = count
    return [f"{kind} x{count}" for kind, count in switched.items()]


def _switch_attention(model: nn.Module) -> int:
    """Route the model's attention through `lean_attention` where that saves memory; returns the number of
    attention modules switched (0: none)."""
    # A family declares its attention (peftlab/archs). T5 has no fused kernel (position bias: eager only); the
    # others are switched only with attention dropout, where sdpa on CPU falls back to its math path and keeps the
    # probabilities twice; without it, sdpa's fused kernel keeps as little (and Llama-style models train without).
    config = getattr(model, "config", None)
    arch = arch_of(getattr(config, "model_type", None))
    if (arch is None or arch.attention is None
            or (arch.attention_dropout is not None and not getattr(config, arch.attention_dropout, 0) > 0)
            or getattr(config, "reorder_and_upcast_attn", False)):
        return 0
    attention_class = arch.attention
    AttentionInterface.register(LEAN_ATTENTION, lean_attention)
    AttentionMaskInterface.register(LEAN_ATTENTION, eager_mask)
    model.set_attn_implementation(LEAN_ATTENTION)
    return sum(type(m).__name__ == attention_class for m in model.modules())
