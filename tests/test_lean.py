"""The lean kernels (peftlab/accel/lean.py) compute what the modules they replace compute: same outputs, same
gradients (with the same dropout mask), the same dropout rate; a lean model's state dict is unchanged."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from transformers.activations import NewGELUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

import peftlab.accel.lean as lean_module
from peftlab import apply, load_model
from peftlab.accel import recompute
from peftlab.accel.lean import (
    BiasedAttention,
    GatedGELU,
    LeanTanhGELU,
    clipped_step,
    dropout,
    gradient_norms,
    keep_from_8_bits,
    keep_mask,
    make_lean,
    masked_scale,
    rms_norm,
    seeded_keep_mask,
    sparse_embedding_gradients,
)
from peftlab.accel.loss import lm_loss
from peftlab.accel.recompute import is_recomputable, recomputing
from peftlab.methods import build_config


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(999, 1001), (99, 101)])  # numpy's generator; torch's (below NUMPY_MASK_MIN)
def test_keep_mask_has_the_dropout_rate(p, shape):
    torch.manual_seed(0)
    keep = keep_mask(shape, p, "cpu")  # an odd count: part of the last 64-bit draw is unused
    n = keep.numel()
    assert keep.dtype == torch.bool and keep.shape == shape
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbours come from lanes of one 64-bit draw (two 32-bit or eight 8-bit): they must not be correlated
    pairs = keep.view(-1)[: n - 1].view(-1, 2).float()
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 5 / (n / 2) ** 0.5


class ScriptedBits:
    """A bit generator whose first draw is every 8-bit value once, then the given 64-bit numbers."""

    def __init__(self, then: list[int]):
        self.draws = [np.arange(2**8, dtype=np.uint8).view(np.uint64), np.array(then, dtype=np.uint64)]

    def random_raw(self, size: int) -> np.ndarray:
        draw = self.draws.pop(0)
        assert draw.size == size
        return draw


@pytest.mark.parametrize("p", [0.1, 0.3, 2**-17])
def test_8_bit_keep_mask_settles_the_straddling_value_with_64_bits(p):
    """Over each 8-bit value once, exactly floor(p * 2^8) values drop, plus the straddling one exactly when
    its 64-bit draw falls below the remainder: so the drop rate is p, not p rounded to 2^-8."""
    edge = math.floor(p * 2**8)
    cut = int((p * 2**8 - edge) * 2**64)
    for draw, drops in ((cut - 1, True), (cut, False)):
        keep = keep_from_8_bits(ScriptedBits([draw]), p, np.empty(2**8, dtype=bool))
        assert (~keep).sum() == edge + drops
        assert keep[edge] == (not drops) and not keep[:edge].any() and keep[edge + 1:].all()


@pytest.mark.parametrize("shape", [(512, 512), (16, 16)])
def test_keep_mask_follows_torch_seed(shape):
    torch.manual_seed(5)
    first, second = keep_mask(shape, 0.5, "cpu"), keep_mask(shape, 0.5, "cpu")
    torch.manual_seed(5)
    assert torch.equal(keep_mask(shape, 0.5, "cpu"), first)
    assert not torch.equal(first, second)


def test_seeded_masks_depend_on_their_seed_only_and_seeds_draw_independent_masks():
    """The generator is restarted for each mask: a seed gives its mask whatever was drawn before, in this thread
    or another; neighbouring seeds give uncorrelated masks (the 12 discarded outputs mix a = b = c = seed)."""
    first = seeded_keep_mask(2**40 + 1, (512, 512), 0.5)
    later = [seeded_keep_mask(seed, (512, 512), 0.5) for seed in (2**40 + 2, 2**40 + 3)]
    assert torch.equal(seeded_keep_mask(2**40 + 1, (512, 512), 0.5), first)
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(seeded_keep_mask(2**40 + 1, (512, 512), 0.5)))
    thread.start()
    thread.join()
    assert torch.equal(in_thread[0], first)
    n = first.numel()
    for other in later:
        assert abs(torch.corrcoef(torch.stack([first.view(-1), other.view(-1)]).float())[0, 1].item()) < 5 / n**0.5

def test_backward_keeps_a_numpy_mask_as_packed_bits_or_only_its_seed_and_reads_the_same_mask():
    """A mask drawn by numpy is kept for backward as its bits, eight to a byte; with `redraw_masks` as nothing
    but its seed. Either way backward reads the very mask the forward pass drew. A small mask (torch's
    generator) is not marked, and the seed really is the one numpy drew from."""
    x, grad = torch.randn(512, 512, requires_grad=True), torch.randn(512, 512)
    torch.manual_seed(11)
    drawn = keep_mask(x.shape, 0.3, "cpu")
    expected_grad = masked_scale(grad, drawn, 1 / 0.7)
    for redraw, kept_bytes in ((False, x.numel() // 8), (True, 0)):
        kept: dict[int, int] = {}

        def count(t, kept=kept):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        torch.manual_seed(11)
        with recompute.observing_kept(count), recomputing(redraw_masks=redraw):
            y = dropout(x, 0.3)  # saves the mask only
            small = keep_mask((16, 16), 0.3, "cpu")
        assert sum(kept.values()) == kept_bytes, redraw
        assert torch.equal(y, masked_scale(x.detach(), drawn, 1 / 0.7)) and not is_recomputable(small)
        x.grad = None
        y.backward(grad)
        assert torch.equal(x.grad, expected_grad), redraw
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    assert torch.equal(seeded_keep_mask(seed, (512, 512), 0.3), drawn)


def test_dropout_zeroes_or_scales_and_its_gradient_uses_the_same_mask():
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.25)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, 0.25, "cpu")
    torch.testing.assert_close(y, x * keep / 0.75)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, upstream * keep / 0.75)
    assert dropout(x, 0.25, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_lean_gelu_equals_gelu_new():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    ours, theirs = LeanTanhGELU()(x), NewGELUActivation()(x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0])


def test_gated_gelu_gradients():
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.testing.assert_close(GatedGELU.apply(gate, up), NewGELUActivation()(gate) * up)
    assert torch.autograd.gradcheck(GatedGELU.apply, (gate, up))


def test_rms_norm_gradcheck():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6, torch.float64), (x, weight))


@pytest.mark.parametrize("stock", [T5LayerNorm, LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_lean_rms_norm_equals_the_stock_norm(stock, dtype, weight_dtype):
    """Same output dtype and values, same gradients for x and the weight (T5 casts to a half weight's dtype,
    Llama, Mistral and Qwen2 back to the input's: each family declares its norm in peftlab/archs)."""
    reference = stock(16, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        reference.weight.normal_(generator=torch.Generator().manual_seed(1))
    lean = copy.deepcopy(reference)
    make_lean(lean)
    assert type(lean) is not stock
    x = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)) * 3).to(dtype).requires_grad_()
    upstream = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    outputs, grads = [], []
    for module in (reference, lean):
        out = module(x)
        outputs.append(out)
        grads.append(torch.autograd.grad(out, (x, module.weight), upstream.to(out.dtype)))
    assert outputs[1].dtype == outputs[0].dtype
    tolerance = {} if dtype == weight_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **({"atol": 1e-5, "rtol": 1e-5} | tolerance))


def attention_inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    b, h, s, k, d = 2, 3, 5, 6, 4
    q, key, v = (torch.randn(b, h, n, d, dtype=dtype, generator=generator, requires_grad=True) for n in (s, k, k))
    bias = torch.randn(1, h, s, k, dtype=dtype, generator=generator, requires_grad=True)  # shared over the batch
    mask = torch.zeros(b, 1, 1, k, dtype=dtype)
    mask[1, :, :, 4:] = torch.finfo(dtype).min  # the second row's last two keys are padding
    return q, key, v, bias, mask


def test_biased_attention_gradcheck_without_dropout():
    q, k, v, bias, mask = attention_inputs()
    assert torch.autograd.gradcheck(lambda *t: BiasedAttention.apply(*t, mask, 0.0, 0.5), (q, k, v, bias))


def test_biased_attention_with_dropout_equals_autograd_with_the_same_mask():
    q, k, v, bias, mask = attention_inputs(torch.float32)
    torch.manual_seed(7)
    ours = BiasedAttention.apply(q, k, v, bias, mask, 0.3, 1.0)
    torch.manual_seed(7)
    probs = torch.softmax(q @ k.transpose(-1, -2) + bias + mask, dim=-1)
    reference = (probs * keep_mask(probs.shape, 0.3, "cpu") / 0.7) @ v
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(ours)
    inputs = (q, k, v, bias)
    for a, b in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(reference, inputs, upstream),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_biased_attention_under_bf16_autocast_stays_close_and_keeps_dtypes():
    q, k, v, bias, mask = attention_inputs(torch.float32)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]  # what autocast's linears hand over
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = BiasedAttention.apply(*low, bias, mask, 0.0, 1.0)
    reference = torch.softmax(q @ k.transpose(-1, -2) + bias + mask, dim=-1) @ v
    torch.testing.assert_close(ours.float(), reference, atol=5e-2, rtol=5e-2)
    grads = torch.autograd.grad(ours.float().sum(), [*low, bias])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
    reference_grads = torch.autograd.grad(reference.sum(), (q, k, v, bias))
    for ours_grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(ours_grad.float(), expected, atol=1e-1, rtol=5e-2)


def lean_pair(preset: str, method: str | None = "lora"):
    torch.manual_seed(0)
    no_dropout = {"t5": {"dropout_rate": 0.0}, "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.1},
                  "bart": {"dropout": 0.0, "attention_dropout": 0.1, "activation_dropout": 0.0},
                  "llama": {"attention_dropout": 0.0}, "mistral": {"attention_dropout": 0.0},
                  "qwen2": {"attention_dropout": 0.0}}[preset.split("-")[0]]
    model, _ = load_model(f"random:{preset}", overrides=no_dropout)
    if method:
        apply(model, build_config(method, model_type=model.config.model_type))
    model.train()
    lean = copy.deepcopy(model)
    return model, lean, make_lean(lean)


@pytest.mark.parametrize("preset,method", [("t5-tiny", "lora"), ("t5-tiny", None), ("gpt2-tiny", "lora"),
                                           ("gpt2-tiny", None), ("bart-tiny", "lora"), ("llama-tiny", None),
                                           ("mistral-tiny", "ia3"), ("qwen2-tiny", "lora")])
def test_lean_model_equals_the_model_in_loss_and_gradients(preset, method):
    model, lean, switched = lean_pair(preset, method)
    family = preset.split("-")[0]
    assert {line.rsplit(" x", 1)[0] for line in switched} == {
        "t5": {"dropout", "gelu_new", "gated-GELU feed-forward", "RMSNorm", "attention"},
        "gpt2": {"dropout", "gelu_new", "attention"}, "bart": {"attention"},  # BART's layers keep their dropout
        "llama": {"RMSNorm"}, "mistral": {"RMSNorm"}, "qwen2": {"RMSNorm"},  # Llama-style: sdpa kept
    }[family] | ({"LoRA"} if method == "lora" else set())
    assert list(lean.state_dict()) == list(model.state_dict())  # names, adapters and checkpoints unchanged
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "attention_mask": mask}
    model.eval(), lean.eval()  # GPT-2, BART: attention switched only with attention dropout configured: off here
    seq2seq = family in ("t5", "bart")
    batch["labels"] = torch.randint(2, 500, (3, 6)) if seq2seq else batch["input_ids"].clone()
    loss_of = (lambda m, b: m(**b).loss) if family == "bart" else lm_loss  # BART's head adds a bias
    losses = [loss_of(m, batch) for m in (model, lean)]
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (model, lean)]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_without_dropout_keeps_sdpa():
    """BART or GPT-2 configured without attention dropout keep sdpa's fused kernel (as lean, and faster)."""
    model, _ = load_model("random:bart-tiny", overrides={"attention_dropout": 0.0})
    assert not any("attention" in line for line in make_lean(model))
    assert model.config._attn_implementation != "peftlab_lean"


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny", "bart-tiny"])
def test_lean_model_generates_what_the_model_generates(preset):
    """With the key/value cache: one query against a growing key length, padding masked."""
    model, lean, _ = lean_pair(preset)
    inputs = {"input_ids": torch.randint(2, 500, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    if preset.startswith("gpt2"):  # a decoder-only model continues from the right: pad on the left
        inputs["attention_mask"][0, :3] = 0
    else:
        inputs["attention_mask"][0, 6:] = 0
    model.eval(), lean.eval()
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(lean.generate(**inputs, max_new_tokens=8, do_sample=False), expected)


def test_lean_dropout_trains_with_the_models_dropout_rate():
    torch.manual_seed(0)
    model, _ = load_model("random:t5-tiny")  # dropout 0.1 on
    make_lean(model)
    model.train()
    x = torch.ones(200, 400)
    dropped = model.encoder.dropout(x)
    assert abs((dropped == 0).float().mean().item() - model.config.dropout_rate) < 0.005
    assert torch.allclose(dropped[dropped != 0], torch.tensor(1 / (1 - model.config.dropout_rate)))
    model.eval()
    assert torch.equal(model.encoder.dropout(x), x)


@pytest.mark.parametrize("preset,switched", [
    ("t5-tiny", {"shared", "encoder.embed_tokens", "decoder.embed_tokens"}),  # one table; T5's 32 buckets: too few
    ("gpt2-tiny", {"transformer.wpe"}),  # wte is tied to lm_head, whose gradient is dense anyway
    ("bert-tiny", {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"})])
def test_sparse_embedding_gradients_are_the_rows_used_and_equal_the_dense_ones(monkeypatch, preset, switched):
    monkeypatch.setattr(lean_module, "SPARSE_GRADIENT_MIN_ROWS", 64)  # the tiny presets' 512-row tables
    model, _ = load_model(f"random:{preset}")
    model.requires_grad_(True).eval()
    reference = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(0, 2, (3,))}
    if model.config.is_encoder_decoder or preset.startswith("gpt2"):
        batch["labels"] = torch.randint(2, 500, (3, 6)) if model.config.is_encoder_decoder else batch["input_ids"]
    reference(**batch).loss.backward()
    with sparse_embedding_gradients(model) as tables:
        assert {n for n, m in model.named_modules() if m in tables} == switched
        model(**batch).loss.backward()
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))  # restored
    sparse = {id(m.weight) for m in tables}
    for p in model.parameters():
        if id(p) in sparse:
            used_rows = p.grad.coalesce().indices().shape[1]  # at most one per token fed in, of 512
            assert p.grad.is_sparse and 0 < used_rows <= batch["input_ids"].numel() + batch["labels"].numel()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad.to_dense(), theirs.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fused,norms_given", [(True, False), (False, False), (True, True)])  # the clip inside
# the fused kernel (grad_scale), and a pass; the per-tensor norms taken by the caller (as the loop logs them)
@pytest.mark.parametrize("max_norm", [1e-3, math.inf])  # clipping every gradient, and none
def test_clipped_step_with_sparse_gradients_equals_clip_grad_norm_and_one_adamw_step(monkeypatch, max_norm, fused,
                                                                                     norms_given):
    """Same norm, weights and AdamW state as torch's clip_grad_norm_ + step on dense gradients, and the sparse
    gradient is made dense only after the other gradients are freed; each tensor's norm (`gradient_norms`) is
    its dense gradient's, the sparse one's rows used twice counted once."""
    monkeypatch.setattr(lean_module, "SPARSE_GRADIENT_MIN_ROWS", 64)
    model, _ = load_model("random:t5-tiny")
    model.requires_grad_(True).eval()
    reference = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    batch["input_ids"][:, 0] = 7  # a row every sequence uses: uncoalesced, the sparse gradient holds it thrice
    ours, theirs = (torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused) for m in (model, reference))
    step_calls = []
    original_step = ours.step

    def recording_step(*args, **kwargs):
        step_calls.append({name for name, p in model.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    monkeypatch.setattr(ours, "step", recording_step)
    for _ in range(2):  # the second step reads the state the first left
        reference(**batch).loss.backward()
        dense_norms = [torch.linalg.vector_norm(q.grad) for q in reference.parameters()]  # before the clip
        expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm)
        theirs.step()
        theirs.zero_grad(set_to_none=True)
        with sparse_embedding_gradients(model):
            model(**batch).loss.backward()
        norms = gradient_norms(list(model.parameters())) if norms_given else None
        if norms_given:
            assert model.shared.weight.grad.is_sparse and len(norms) == len(dense_norms)
            torch.testing.assert_close(torch.stack([norms[p] for p in model.parameters()]),
                                       torch.stack(dense_norms), rtol=1e-6, atol=0)
        norm = clipped_step(ours, list(model.parameters()), max_norm, norms)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert step_calls[1] == {"shared.weight"}  # alone: every other gradient was already freed
    assert "shared.weight" not in step_calls[0] and len(step_calls[0]) == len(list(model.parameters())) - 1
    assert all(p.grad is None for p in model.parameters()) and not hasattr(ours, "grad_scale")
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
        for key, value in theirs.state[q].items():
            torch.testing.assert_close(ours.state[p][key], value, atol=1e-6, rtol=1e-5, msg=f"{name} {key}")


def test_frozen_or_disabled_embedding_tables_keep_dense_gradients(monkeypatch):
    monkeypatch.setattr(lean_module, "SPARSE_GRADIENT_MIN_ROWS", 64)
    model, _ = load_model("random:t5-tiny")
    apply(model, build_config("lora", model_type="t5"))  # embeddings frozen
    with sparse_embedding_gradients(model) as tables:
        assert tables == []
    model.requires_grad_(True)
    with sparse_embedding_gradients(model, enabled=False) as tables:
        assert tables == []
    monkeypatch.setattr(lean_module, "SPARSE_GRADIENT_MIN_ROWS", 4096)  # 512 rows: too few to gain
    with sparse_embedding_gradients(model) as tables:
        assert tables == []


def test_a_numpy_mask_is_named_in_a_profile():
    # numpy's draw is no torch operator: without the name a profile would show its time under nothing
    with torch.profiler.profile() as prof:
        keep_mask((512, 512), 0.1, "cpu")
    assert "peftlab::keep_mask" in {event.key for event in prof.key_averages()}
