"""Recompute instead of keep (peftlab/accel/recompute.py): the same loss and gradients bit for bit, the
marked activations freed after the forward pass, in-place changes respected."""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5LayerFF, T5LayerSelfAttention

from peftlab import apply, load_model
from peftlab.accel import products, recompute
from peftlab.accel.lean import NUMPY_MASK_MIN, make_lean, rms_norm
from peftlab.accel.loss import lm_loss
from peftlab.accel.recompute import recomputing
from peftlab.methods import build_config


def lean_model(method: str | None, preset: str = "t5-tiny", linear: bool = False, dropout: float = 0.1,
               onednn: bool = False):
    """A lean model with its dropout on (LoRA's too), or with every weight training; `linear`: its linear
    layers' outputs recomputable too (`run.recompute_linear`); `onednn`: their products by oneDNN inside
    `products.linear_backend(True)`."""
    torch.manual_seed(0)
    model, _ = load_model(f"random:{preset}")
    if method:
        apply(model, build_config(method, model_type=model.config.model_type, dropout=dropout))
    else:
        model.requires_grad_(True)
    make_lean(model, linear=linear, onednn=onednn)
    return model.train()


def loss_and_grads(model, batch, context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for every run
    with context:
        loss = lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("preset,method", [("t5-tiny", "lora"), ("t5-tiny", None), ("llama-tiny", None)])
def test_recomputing_gives_the_same_loss_and_gradients_bit_for_bit(preset, method, bf16, linear):
    """Also under bf16 autocast, where a recipe must run as its forward ran (GELU and the products in bf16),
    and with the linear layers' outputs recomputed (LoRA's with its dropout mask)."""
    model = lean_model(method, preset, linear)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    if not model.config.is_encoder_decoder:
        batch["labels"] = batch["input_ids"].clone()
    recomputed = []

    def pack(t):
        recomputed.append(isinstance(saved := recompute._pack(t), recompute._Recomputed))
        return saved

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, grads = loss_and_grads(model, batch, contextlib.nullcontext())
        loss_again, grads_again = loss_and_grads(
            model, batch, torch.autograd.graph.saved_tensors_hooks(pack, recompute._unpack))
    # under autocast a training linear layer keeps its own bf16 copy of its input: nothing of ours to rebuild
    # but the linear layers' outputs, where those are recomputable
    assert any(recomputed) != (bf16 and method is None and not linear)
    assert torch.equal(loss_again, loss)
    assert grads.keys() == grads_again.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grads_again[name], grad), name


@pytest.mark.skipif(not products.onednn_available(), reason="needs an x86 CPU and torch with oneDNN")
@pytest.mark.parametrize("method", ["lora", None])
def test_linear_outputs_made_by_onednn_are_recomputed_by_it_bit_for_bit(monkeypatch, method):
    """A recomputed q, k, v, gate or up is rebuilt by the product that made it (`run.linear_backend` with
    `run.recompute_linear`), so the gradients stay bit for bit."""
    calls = []
    through = products._onednn_mm_t
    monkeypatch.setattr(products, "_onednn_mm_t", lambda *a: calls.append(1) or through(*a))
    model = lean_model(method, linear=True, onednn=True)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    with products.linear_backend(True):
        loss, grads = loss_and_grads(model, batch, contextlib.nullcontext())
        kept_calls = len(calls)
        loss_again, grads_again = loss_and_grads(model, batch, recomputing())
    assert kept_calls > 0 and len(calls) > 2 * kept_calls  # the recomputed outputs: products again
    assert torch.equal(loss_again, loss)
    assert grads.keys() == grads_again.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grads_again[name], grad), name


@pytest.mark.parametrize("method", ["lora", None])
def test_recomputing_frees_the_normalised_x_and_what_wo_reads(method):
    """After the forward pass nothing holds RMSNorm's outputs (q, k, v, LoRA and the feed-forward read them)
    nor, with `wo` training, its input dropout(GELU(gate) * up); without `recomputing()` the graph does."""
    model = lean_model(method)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    watched = []  # (whether training keeps it without recomputing, a weak reference)

    def watch(module, kept: bool):
        return module.register_forward_hook(lambda m, args, out: watched.append((kept, weakref.ref(out))))

    # with LoRA the feed-forward's norm output is read by frozen layers only, which keep nothing of it
    sublayers = T5LayerFF | T5LayerSelfAttention | T5LayerCrossAttention
    hooks = [watch(layer.layer_norm, method is None or not isinstance(layer, T5LayerFF))
             for layer in model.modules() if isinstance(layer, sublayers)]
    if method is None:
        hooks += [m.register_forward_pre_hook(lambda m, args: watched.append((True, weakref.ref(args[0]))))
                  for n, m in model.named_modules() if n.endswith(".wo")]
    for context, recomputes in ((contextlib.nullcontext(), False), (recomputing(), True)):
        watched.clear()
        with context:
            loss = lm_loss(model, batch)
        assert len(watched) == len(hooks) and any(kept for kept, _ in watched)
        for kept, ref in watched:
            assert (ref() is not None) == (kept and not recomputes)
        loss.backward()
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("method,lora_dropout", [("lora", 0.1), ("lora", 0.0), (None, 0.0)])
def test_recompute_linear_keeps_no_projection_of_attention_or_the_feed_forward(method, lora_dropout):
    """With the linear layers' outputs recomputable, backward keeps no q, k, v (attention's contiguous heads)
    and no gate or up of T5's feed-forward: only what it keeps anyway (the residual stream, 1/rms, masks, the
    attention output that `o` reads, LoRA's rank-r products). The same model without it keeps them; LoRA
    with and without its dropout gets the same gradients either way."""
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    kept_shapes, results = [], []
    for linear in (False, True):
        model = lean_model(method, linear=linear, dropout=lora_dropout)
        config = model.config
        heads = {(3, config.num_heads, length, config.d_kv) for length in (12, 6)}
        gate_up = {(3, length, config.d_ff) for length in (12, 6)}
        shapes: set[tuple] = set()
        def observe(t, shapes=shapes):
            if t.is_floating_point():  # not the dropout masks, of the same shapes
                shapes.add(tuple(t.shape))

        with recompute.observing_kept(observe):
            results.append(loss_and_grads(model, batch, recomputing()))
        kept_shapes.append((shapes & heads, shapes & gate_up))
    assert kept_shapes[0] == (heads, gate_up)
    assert kept_shapes[1] == (set(), set())
    (loss, grads), (loss_again, grads_again) = results
    assert torch.equal(loss_again, loss) and grads.keys() == grads_again.keys()
    assert all(torch.equal(grads_again[name], grad) for name, grad in grads.items())


def test_recomputing_respects_in_place_changes():
    """A marked tensor changed in place before it is saved is kept as it is; a recipe's input changed in place
    after the forward pass is an error, as autograd makes it for a saved tensor."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=generator, requires_grad=True)
    weight, w = torch.randn(6, generator=generator), torch.randn(6, 3, generator=generator, requires_grad=True)

    def grads(context, change):
        x.grad = w.grad = None
        with context:
            y = rms_norm(x * 1, weight, 1e-6, torch.float32)
            if change:
                y.mul_(2)
            (y @ w).pow(2).sum().backward()
        return x.grad.clone(), w.grad.clone()

    for change in (False, True):
        for ours, theirs in zip(grads(recomputing(), change), grads(contextlib.nullcontext(), change),
                                strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with recomputing():
        x_in = torch.randn(4, 6, generator=generator)
        out = (rms_norm(x_in, weight, 1e-6, torch.float32) @ w).sum()
    x_in.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def test_a_recipe_runs_under_the_autocast_state_of_its_forward_pass():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=generator), torch.randn(16, 4, generator=generator)
    scale = torch.ones(4, requires_grad=True)  # its gradient is the column sums of what `*` saved

    def grad(context):
        scale.grad = None
        with context, torch.autocast("cpu", dtype=torch.bfloat16):
            product = recompute.recomputable(a @ b, torch.matmul, (a, b))  # a bf16 product under autocast
            (product * scale).float().sum().backward()
        return scale.grad

    assert torch.equal(grad(recomputing()), grad(contextlib.nullcontext()))


def counted_doubling(calls: list):
    """x * 2, appending to `calls` each time it runs."""
    def doubled(x):
        calls.append(1)
        return x * 2
    return doubled


def test_a_tensor_read_several_times_is_recomputed_once_per_backward():
    """q, k and v (or LoRA's q and v) read one normalised x: one recomputation serves them all; a second
    backward through a retained graph recomputes again and gets the same gradients."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=generator)
    scales = [torch.randn(3, generator=generator, requires_grad=True) for _ in range(3)]
    calls = []
    doubled = counted_doubling(calls)
    with recomputing():
        product = recompute.recomputable(doubled(a), doubled, (a,))
        loss = sum((product * s).pow(2).sum() for s in scales)  # each `*` keeps `product`
    calls.clear()
    first = torch.autograd.grad(loss, scales, retain_graph=True)
    assert len(calls) == 1
    second = torch.autograd.grad(loss, scales)
    expected = [2 * (a * 2 * s) * (a * 2) for s in scales]
    for got in (first, second):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e.sum(0))


def test_a_recipe_read_by_another_recipe_first_is_computed_once():
    """A dropout mask is saved by its dropout and is an input of the dropped-out tensor's recipe, which
    backward reads first: that computation serves the mask's own read too."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=generator)
    s, t = (torch.randn(3, generator=generator, requires_grad=True) for _ in range(2))
    calls = []
    doubled = counted_doubling(calls)
    with recomputing():
        inner = recompute.recomputable(doubled(a), doubled, (a,))
        outer = recompute.recomputable(inner + 1, torch.add, (inner,), 1)
        loss = (inner * s).sum() + (outer * t).pow(2).sum()  # `outer * t` is later: its backward runs first
    calls.clear()
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert len(calls) == 1
    torch.testing.assert_close(grad_s, (a * 2).sum(0))
    torch.testing.assert_close(grad_t, (2 * (a * 2 + 1) ** 2 * t).sum(0))


def test_redraw_masks_draws_dropout_masks_again_in_backward():
    """Masks of NUMPY_MASK_MIN entries or more (every dropout of a real batch) are kept as packed bits, not as
    bytes; with `redraw_masks` not at all (redrawn from their seed in backward). The loss and every gradient
    are the same either way."""
    model = lean_model("lora")  # T5's dropout and LoRA's, rate 0.1 each
    batch = {"input_ids": torch.randint(2, 500, (8, 128)), "labels": torch.randint(2, 500, (8, 128))}
    assert batch["input_ids"].numel() * model.config.d_model >= NUMPY_MASK_MIN
    results, kept = [], []
    for redraw in (False, True):
        masks: dict[int, torch.dtype] = {}

        def count(t, masks=masks):
            if t.dtype == torch.uint8 or (t.dtype == torch.bool and t.numel() >= NUMPY_MASK_MIN):
                masks[t.untyped_storage().data_ptr()] = t.dtype

        with recompute.observing_kept(count):
            results.append(loss_and_grads(model, batch, recomputing(redraw_masks=redraw)))
        kept.append(Counter(masks.values()))
    assert kept[0][torch.uint8] > 0 and kept[0][torch.bool] == 0  # packed bits, no byte masks
    assert kept[1] == Counter()
    (loss, grads), (loss_again, grads_again) = results
    assert torch.equal(loss_again, loss)
    assert grads.keys() == grads_again.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grads_again[name], grad), name
