"""The mask-saving LoRA dropout path equals plain autograd with the same mask, and drops at rate p."""

import copy

import pytest
import torch

import peftlab.accel.lora as lean_lora
import peftlab.methods.lora as lora
from peftlab.accel.lean import keep_mask, make_lean


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropped_low_rank_equals_reference(p):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=generator, requires_grad=True)
    A = torch.randn(4, 16, generator=generator, requires_grad=True)
    B = torch.randn(8, 4, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 5, 8, generator=generator)

    torch.manual_seed(7)
    keep = keep_mask(x.shape, p, x.device)
    reference = ((x * keep / (1 - p)) @ A.T @ B.T) * 2.5
    reference_grads = torch.autograd.grad(reference, (x, A, B), upstream)

    torch.manual_seed(7)
    ours = lean_lora.DroppedLowRank.apply(x, keep_mask(x.shape, p, x.device), A, B, p, 2.5)
    our_grads = torch.autograd.grad(ours, (x, A, B), upstream)
    torch.testing.assert_close(ours, reference)
    for a, b in zip(our_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_lean_layer_takes_the_mask_saving_path_only_when_training_and_the_plain_layer_never():
    plain = lora.LoraLayer(torch.nn.Linear(16, 8))
    plain.add_adapter("default", 4, 8, 0.3, False, "kaiming")
    torch.nn.init.normal_(plain.lora_B["default"].weight)
    inputs = torch.randn(2, 16, requires_grad=True)
    plain.train()
    assert "DroppedLowRank" not in str(plain(inputs).grad_fn.next_functions)  # the plain layer: peft's math
    layer = copy.deepcopy(plain)
    assert make_lean(layer) == ["LoRA x1", "dropout x1"] and isinstance(layer, lean_lora.LeanLoraLayer)
    out = layer(inputs)
    assert out.grad_fn is not None and "DroppedLowRank" in str(out.grad_fn.next_functions)
    layer.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), layer.base_layer(inputs) + layer.lora_delta(inputs, "default"))
        torch.testing.assert_close(layer(inputs), plain(inputs))
