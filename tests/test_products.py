"""oneDNN linear products (peftlab/accel/products.py): the outputs and gradients of F.linear and of peft's
LoRA (the chunked loss's: test_loss.py); the backend chosen by CPU vendor; autocast, other dtypes and empty
inputs left to torch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import example_batch
from test_lora_parity import both

from peftlab.accel import products
from peftlab.accel.lean import LeanLinear, make_lean
from peftlab.errors import PeftlabError

needs_onednn = pytest.mark.skipif(not products.onednn_available(), reason="needs an x86 CPU and torch with oneDNN")


def backward_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


@needs_onednn
@pytest.mark.parametrize("shape,bias,weight_grad,input_grad,transposed", [
    ((3, 5, 16), True, True, True, False),     # a training layer
    ((7, 16), False, False, True, False),      # a frozen one (LoRA's base): only the input's gradient
    ((2, 4, 16), True, False, False, False),   # BitFit: only the bias trains
    ((4, 6, 16), False, True, True, True),     # a transposed view as input (attention heads)
])
def test_onednn_linear_equals_f_linear(shape, bias, weight_grad, input_grad, transposed):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape[:-2] + (shape[-1], shape[-2]) if transposed else shape, generator=generator)
    x = (x.transpose(-1, -2) if transposed else x).requires_grad_(input_grad)
    weight = torch.randn(12, 16, generator=generator).requires_grad_(weight_grad)
    b = torch.randn(12, generator=generator).requires_grad_(True) if bias else None
    wanted = [t for t in (x, weight, b) if t is not None and t.requires_grad]
    reference = F.linear(x, weight, b)
    with products.linear_backend(True):
        out = products.linear(x, weight, b)
    assert backward_name(out) == "OneDNNLinearBackward"
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(out.shape, generator=generator)
    for ours, theirs in zip(torch.autograd.grad(out, wanted, upstream),
                            torch.autograd.grad(reference, wanted, upstream), strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_torch_keeps_what_onednn_does_not_take():
    weight = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8)
    assert backward_name(products.linear(x, weight)) != "OneDNNLinearBackward"  # outside linear_backend(True)
    with products.linear_backend(True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = products.linear(x, weight)
        assert under_autocast.dtype == torch.bfloat16  # autocast's cast, as F.linear does it
        half = products.linear(x.bfloat16(), weight.detach().bfloat16().requires_grad_())
        assert backward_name(half) != "OneDNNLinearBackward"
        assert products.linear(torch.randn(0, 8), weight).shape == (0, 4)
        assert backward_name(products.linear(x, weight)) == "OneDNNLinearBackward"
    assert not products._onednn  # restored


@pytest.mark.parametrize("vendor,available,backend,expected", [
    ("AuthenticAMD", True, "auto", True), ("GenuineIntel", True, "auto", False), ("", True, "auto", False),
    ("AuthenticAMD", False, "auto", False), ("AuthenticAMD", True, "torch", False),
    ("GenuineIntel", True, "onednn", True)])
def test_auto_takes_onednn_on_x86_cpus_not_made_by_intel(monkeypatch, vendor, available, backend, expected):
    monkeypatch.setattr(products, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(products, "onednn_available", lambda: available)
    assert products.wants_onednn(backend) is expected


def test_onednn_where_it_is_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(products, "onednn_available", lambda: False)
    with pytest.raises(PeftlabError, match="linear_backend=onednn needs an x86 CPU.*use auto or torch"):
        products.wants_onednn("onednn")


@needs_onednn
@pytest.mark.parametrize("preset,config", [
    ("t5-tiny", {"r": 4, "alpha": 8, "targets": ["q", "v"]}),
    ("llama-tiny", {"r": 2, "alpha": 7, "targets": "all-linear"}),
    ("bert-tiny", {"r": 4, "alpha": 8, "targets": ["query", "value"], "modules_to_save": ["classifier"],
                   "bias": "all"}),
])
def test_lora_through_onednn_equals_peft(preset, config):
    """peft's LoRA on the stock model is the oracle: outputs and every trainable gradient."""
    torch.manual_seed(0)  # the adapter's draws: the same whichever tests ran before (sums in another order than
    # MKL's differ by ~1e-5 on some draws of these logits)
    ours, theirs, tokenizer = both(preset, **config)
    assert "linear (oneDNN products)" in " ".join(make_lean(ours, onednn=True))
    batch = example_batch(ours, tokenizer)
    with products.linear_backend(True):
        out_ours = ours(**batch)
        out_ours.loss.backward()
    out_theirs = theirs(**batch)
    out_theirs.loss.backward()
    assert sum(isinstance(m, LeanLinear) for m in ours.modules()) > 0
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-5)
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)
