"""The chunked LM loss equals the plain loss and its gradients, and the model's own loss."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import example_batch, fresh_base
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
import peftlab.accel.loss as loss_module
from peftlab.accel import products
from peftlab.accel.loss import (
    chunked_cross_entropy,
    flush_subnormal_,
    flushed_softmax_,
    lm_loss,
    softmax_,
    supports_chunked_loss,
)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=pytest.mark.skipif(
    not products.onednn_available(), reason="needs an x86 CPU and torch with oneDNN"))])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_cross_entropy_equals_plain(monkeypatch, chunk, onednn):
    """Also with its two products by oneDNN (`run.linear_backend`)."""
    calls = []
    through = products._onednn_mm_t
    monkeypatch.setattr(products, "_onednn_mm_t", lambda *a: calls.append(1) or through(*a))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, 5:] = -100
    plain = F.cross_entropy((hidden @ weight.T).view(-1, 50), labels.view(-1), ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    with products.linear_backend(onednn):
        chunked = chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
    scored = int((labels != -100).sum())  # only labelled positions are scored
    assert len(calls) == (2 * -(-scored // chunk) if onednn else 0)  # the logits and the hidden states' gradient
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5), (7, 1000), (3, 32128)])
def test_softmax_in_place_equals_torch_softmax_bit_for_bit(shape):
    # the chunked loss overwrites each chunk's logits with their softmax: that relies on the kernel finishing a
    # row's reads before its writes; a kernel that did not would give other numbers here
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 30
    logits[0, 0] = 1e4  # one dominant entry: the others underflow to 0
    expected = torch.softmax(logits, dim=-1)
    out = softmax_(logits)
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out, expected)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients():
    # a trainable head still gets a gradient (zeros), as it would from the plain loss times zero
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.full((2, 5), -100), chunk=4)
    loss.backward()
    assert loss.item() == 0
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_trainable_head_gradient_under_bf16_autocast_stays_float32_and_close():
    # autocast runs the products in bf16; the head's gradient accumulates over chunks in the weight's dtype
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (40,), generator=generator)
    reference = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels), weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk=8)
    (ours,) = torch.autograd.grad(loss, weight)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=2e-2)


def test_head_gradient_under_bf16_autocast_does_not_depend_on_the_chunking():
    # every chunk's product for the head's gradient runs in the weight's dtype, the first one too: one chunk
    # and five agree to float32 summation order (a bf16 product in any chunk would be ~1e-2 off)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (40,), generator=generator)
    grads = []
    for chunk in (40, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
        grads.append(torch.autograd.grad(loss, weight)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_loss_is_exact_where_the_target_probability_underflows():
    """Logits far apart (untrained T5 starts near a loss of 94: p_target ~ e^-94, below float32's range): the
    loss taken from the softmax must still match float64 log-softmax, not read log(0)."""
    generator = torch.Generator().manual_seed(2)
    hidden = (torch.randn(12, 8, generator=generator) * 40).requires_grad_()
    weight = torch.randn(30, 8, generator=generator)
    labels = torch.randint(0, 30, (12,), generator=generator)
    reference = F.cross_entropy((hidden @ weight.T).double(), labels)
    assert reference > 100  # the regime in question: most target probabilities underflow in float32
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, chunk=5).double(), reference,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_chunked_gradient_scales_with_the_upstream_gradient(weight_trainable):
    """The gradient is computed in forward: backward must still apply the incoming gradient (here 2.5 x)."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=generator, requires_grad=True)
    weight = torch.randn(20, 8, generator=generator, requires_grad=weight_trainable)
    labels = torch.randint(0, 20, (9,), generator=generator)
    inputs = (hidden, weight) if weight_trainable else (hidden,)
    plain = torch.autograd.grad(2.5 * F.cross_entropy(hidden @ weight.T, labels), inputs)
    chunked = torch.autograd.grad(2.5 * chunked_cross_entropy(hidden, weight, labels, chunk=4), inputs)
    for ours, reference in zip(chunked, plain, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels), F.cross_entropy(hidden @ weight.T,
                                                                                                labels))


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("full", [False, True])
def test_lm_loss_equals_the_models_own_loss_and_gradients(preset, full):
    base, tokenizer = fresh_base(preset)
    model = base if full else peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(r=4, targets="all-linear"))
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    assert supports_chunked_loss(model)
    batch = example_batch(model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch).loss
    reference_grads = torch.autograd.grad(reference, params, allow_unused=True)
    ours = lm_loss(model, batch)
    our_grads = torch.autograd.grad(ours, params, allow_unused=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, reference_grads, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert isinstance(model.lm_head, torch.nn.Linear)  # restored


def test_bart_is_not_claimed():  # BART adds final_logits_bias after lm_head
    model, _ = fresh_base("bart-tiny")
    assert not supports_chunked_loss(model)


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny"])
def test_scoring_with_the_chunked_loss_equals_the_models_loss(preset):
    from peftlab.eval.scoring import score

    model, tokenizer = fresh_base(preset)
    batch = example_batch(model, tokenizer)
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert score(model, [batch], torch.device("cpu"))["eval_loss"] == pytest.approx(expected, rel=1e-5)


class VocabularySizedBuffers(TorchDispatchMode):
    """Follows every tensor made inside it with a dimension of the vocabulary's size (logits chunks, the head's
    gradient): how many distinct buffers of them were alive at once at most, and how many were made."""

    def __init__(self, vocabulary: int):
        super().__init__()
        self.vocabulary, self.alive, self.most_alive, self.made = vocabulary, [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = (*args, *(kwargs or {}).values())
        inputs = {a.untyped_storage().data_ptr() for a in given if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and self.vocabulary in out.shape and (
                out.untyped_storage().data_ptr() not in inputs):  # not a view, not written in place
            self.made += 1
            self.alive.append(weakref.ref(out))
        storages = {ref().untyped_storage().data_ptr() for ref in self.alive if ref() is not None}
        self.most_alive = max(self.most_alive, len(storages))
        return out


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_the_loss_holds_one_chunk_of_logits_at_a_time_and_scales_its_gradients_in_place(weight_trainable):
    """Forward: one chunk's vocabulary-sized buffer at a time (plus the head's gradient when it trains);
    backward makes none (a scaled copy of the head's gradient would double it at the step's peak)."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(24, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=weight_trainable)
    labels = torch.randint(0, 300, (24,), generator=generator)
    with VocabularySizedBuffers(300) as forward:
        loss = chunked_cross_entropy(hidden, weight, labels, chunk=8)  # three chunks
    with VocabularySizedBuffers(300) as backward:
        grads = torch.autograd.grad(loss, (hidden, weight) if weight_trainable else (hidden,))
    assert forward.made >= 3  # the probe sees each chunk's logits
    assert forward.most_alive == (2 if weight_trainable else 1)
    assert backward.made == 0
    plain = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels),
                                (hidden, weight) if weight_trainable else (hidden,))
    for ours, reference in zip(grads, plain, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_a_second_backward_through_the_chunked_loss_is_refused_in_words():
    hidden, weight, labels = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4), torch.randint(0, 10, (6,))
    loss = chunked_cross_entropy(hidden, weight, labels)
    first = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    with pytest.raises(RuntimeError, match="one backward per forward"):
        torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(first, torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels), hidden)[0])


def subnormal_entries(tensor: torch.Tensor) -> int:
    return int(((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).sum())


class SubnormalOperands(TorchDispatchMode):
    """Counts the subnormal entries in the two factors of every matrix product run inside it."""

    FACTORS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.mm.out: (0, 1),
               torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.addmm_.default: (1, 2)}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in self.FACTORS.get(func, ()):
            self.count += subnormal_entries(args[i])
        return func(*args, **(kwargs or {}))


def spread_logits_case():
    # logits spread over hundreds (a random-init model's loss is ~94): many softmax entries are subnormal
    generator = torch.Generator().manual_seed(5)
    hidden = (torch.randn(24, 16, generator=generator) * 10).requires_grad_()
    weight = (torch.randn(300, 16, generator=generator) * 3).requires_grad_()
    labels = torch.randint(0, 300, (24,), generator=generator)
    return hidden, weight, labels


def chunked_loss_grads(hidden, weight, labels):
    return torch.autograd.grad(chunked_cross_entropy(hidden, weight, labels, chunk=8), (hidden, weight))


def test_the_loss_products_get_no_subnormal_probabilities(monkeypatch):
    # Intel CPUs multiply subnormals ~100x slower; the loss flushes them before its products (the products see
    # the flushed chunk: with the flush taken out, the same run hands them hundreds)
    hidden, weight, labels = spread_logits_case()
    with SubnormalOperands() as flushed:
        chunked_loss_grads(hidden, weight, labels)
    monkeypatch.setattr(loss_module, "flushed_softmax_", lambda logits, top: softmax_(logits))
    with SubnormalOperands() as kept:
        chunked_loss_grads(hidden, weight, labels)
    assert flushed.count == 0
    assert kept.count > 100


@pytest.mark.parametrize("scale", [1, 30, 300])
def test_flushed_softmax_equals_the_softmax_flushed_bit_for_bit(scale):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 3000, generator=generator) * scale
    logits[1, :5] = -torch.inf  # masked entries: zero either way
    logits[2, :] = -1e4  # a row whose entries are all equal and far from zero
    logits[3, 0] = torch.nan  # a NaN row stays NaN
    expected = flush_subnormal_(torch.softmax(logits, dim=-1))
    out = flushed_softmax_(logits, logits.amax(-1, keepdim=True))
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    assert out[3].isnan().all() and not out[4:].isnan().any()


def test_flushed_softmax_leaves_exp_almost_no_subnormal_result(monkeypatch):
    # Intel CPUs compute an exp whose result is subnormal ~10x slower: the logits that would give one are set to
    # -inf first (only a probability made subnormal by the division by the row's sum is still computed)
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(3)) * 30  # ~14% subnormal after exp
    handed = []
    monkeypatch.setattr(loss_module, "flush_subnormal_", lambda probs: handed.append(subnormal_entries(probs)) or probs)
    loss_module.flushed_softmax_(logits.clone(), logits.amax(-1, keepdim=True))
    plain = subnormal_entries(torch.softmax(logits, dim=-1))
    assert plain > 100
    assert handed[0] < plain / 10


def test_flushing_subnormal_probabilities_changes_no_gradient_by_more_than_a_subnormal(monkeypatch):
    # the hidden states' gradient is the same bit for bit (each row's sum is dominated by p_y - 1); the head's
    # gradient differs only in entries that are themselves ~1e-38 (unlikely tokens: sums of flushed terms)
    hidden, weight, labels = spread_logits_case()
    flushed = chunked_loss_grads(hidden, weight, labels)
    monkeypatch.setattr(loss_module, "flush_subnormal_", lambda probs: probs)
    kept = chunked_loss_grads(hidden, weight, labels)
    assert torch.equal(flushed[0], kept[0])
    torch.testing.assert_close(flushed[1], kept[1], rtol=0, atol=1e-35)
    reference = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels), (hidden, weight))
    for ours, plain in zip(flushed, reference, strict=True):
        torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-5)


def test_flush_subnormal_zeroes_exactly_the_entries_at_or_below_the_smallest_normal():
    tiny = torch.finfo(torch.float32).tiny
    probs = torch.tensor([0.0, tiny / 4, tiny, tiny * 2, 0.5])
    assert subnormal_entries(probs) == 1
    assert torch.equal(flush_subnormal_(probs), torch.tensor([0.0, 0.0, 0.0, tiny * 2, 0.5]))
