"""NF4 storage against bitsandbytes (the reference implementation, on CPU) and QLoRA against LoRA on the
dequantized base."""

import copy

import peft
import pytest
import torch
from conftest import example_batch, fresh_base, randomize_lora_B
from torch import nn

import peftlab
from peftlab.errors import PeftlabError
from peftlab.methods import LoraConfig, QLoraConfig
from peftlab.methods.qlora import quantized_layers
from peftlab.quant.nf4 import NF4_CODE, NF4Linear, block_absmax, dequantize, quantize

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def test_code_book_and_single_level_quantization_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu").float())
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    ours = quantize(weight, block_size=64, double_quant=False)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.scales, state.absmax)
    assert torch.equal(dequantize(ours), bnb_functional.dequantize_4bit(packed, state))


def test_double_quantization_error_and_size():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    single, double = quantize(weight, double_quant=False), quantize(weight, double_quant=True)
    # each absmax is off by at most half an int8 step of its block of 256 scales
    step = double.scale_scales.repeat_interleave(256)[: single.scales.numel()] / 127
    assert ((block_absmax(double) - single.scales).abs() <= step / 2 + 1e-9).all()
    # a value's error: at most half the widest gap between NF4 levels, times its block's absmax
    restored = dequantize(double).reshape(-1, 64)
    bound = (NF4_CODE.diff().max() / 2) * block_absmax(double)[:, None] + step[:, None]
    assert ((restored - weight.reshape(-1, 64)).abs() <= bound + 1e-7).all()
    assert double.nbytes() / weight.numel() < 0.52 < single.nbytes() / weight.numel()
    relative = (dequantize(double) - weight).norm() / weight.norm()
    assert 0.05 < relative < 0.12  # NF4 on Gaussian weights: about 9%


def test_nf4_linear_equals_a_linear_on_the_dequantized_weight_and_saves_no_weight():
    linear = nn.Linear(128, 64)
    layer = NF4Linear(copy.deepcopy(linear))
    reference = nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight())
        reference.bias.copy_(linear.bias)
    reference.requires_grad_(False)
    x = torch.randn(4, 7, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    torch.testing.assert_close(out, reference(x_ref), atol=0, rtol=0)
    assert not saved  # nothing kept for backward: the weight is dequantized again there
    out.sum().backward()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)


def dequantized_copy(model):
    """The base with every quantized layer replaced by a plain linear holding its dequantized weight."""
    plain = copy.deepcopy(model)
    for name, layer in quantized_layers(plain).items():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.to_linear())
    return plain


@pytest.mark.parametrize("preset,targets", [("t5-tiny", ["q", "v"]), ("llama-tiny", ["q_proj", "v_proj"]),
                                            ("gpt2-tiny", ["c_attn"])])
def test_qlora_equals_lora_on_the_dequantized_base_and_loads_in_peft(tmp_path, preset, targets):
    base, tokenizer = fresh_base(preset)
    qlora = peftlab.apply(copy.deepcopy(base), QLoraConfig(r=4, alpha=8, targets=targets))
    assert len(quantized_layers(qlora)) == len([n for n in peftlab.methods.inject.linear_module_names(base)])
    randomize_lora_B(qlora)
    lora_base = dequantized_copy(peftlab.apply(copy.deepcopy(base), QLoraConfig(r=4, alpha=8, targets=targets)))
    peftlab.methods.inject.remove_adapter(lora_base, "default")
    lora = peftlab.apply(lora_base, LoraConfig(r=4, alpha=8, targets=targets))
    lora.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)
    batch = example_batch(qlora, tokenizer)
    with torch.no_grad():
        expected = lora.eval()(**batch).logits
        torch.testing.assert_close(qlora.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        # the saved adapter is a plain LoRA adapter: peft loads it on the dequantized base
        peftlab.save_adapter(qlora, tmp_path)
        plain_base = copy.deepcopy(lora_base)
        peftlab.methods.inject.remove_adapter(plain_base, "default")
        in_peft = peft.PeftModel.from_pretrained(plain_base, tmp_path).eval()
        torch.testing.assert_close(in_peft(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        # merging yields an ordinary full-precision model with the same outputs
        merged = peftlab.merge_and_unload(qlora)
        assert not quantized_layers(merged) and type(merged) is type(base)
        assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in base.named_modules()}
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_qlora_trains_only_the_adapters_and_gets_gradients():
    base, tokenizer = fresh_base("gpt2-tiny")  # Conv1D layers are quantized too
    model = peftlab.apply(copy.deepcopy(base), QLoraConfig(r=4, alpha=8, targets=["c_attn"]))
    assert quantized_layers(model)
    model.train()(**example_batch(model, tokenizer)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.grad is not None for n, p in trainable.items())
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # B = 0 at init: A gets 0


@pytest.mark.parametrize("block_size,targets,message", [(48, ["q"], "does not divide"),
                                                        (0, ["q"], "positive even integer"),
                                                        (-64, ["q"], "positive even integer"),
                                                        (64, ["qq"], "match no module")])
def test_bad_input_is_one_line_and_leaves_the_model_alone(block_size, targets, message):
    base, _ = fresh_base("t5-tiny")
    model = copy.deepcopy(base)
    with pytest.raises(PeftlabError, match=message) as info:
        peftlab.apply(model, QLoraConfig(r=4, targets=targets, block_size=block_size))
    assert "\n" not in str(info.value)
    assert not quantized_layers(model)


def test_inspect_reports_nf4_memory_and_error():
    from peftlab.measure.inspect import inspect_model

    report = inspect_model("random:t5-tiny", "qlora", fields={"targets": ["q", "v"]})
    line = next(x for x in report.splitlines() if x.startswith("NF4:"))
    base, _ = fresh_base("t5-tiny")
    layers = peftlab.methods.inject.linear_module_names(base)
    weights = sum(base.get_submodule(n).weight.numel() for n in layers)
    assert f"NF4: {len(layers)} linear layers, {weights:,d} weights" in line
    per_weight = float(line.split(" bytes per weight")[0].split("(")[-1])
    assert 0.5 < per_weight < 0.52
    error = float(line.split("relative error ")[1].rstrip("%")) / 100
    assert 0.05 < error < 0.12


def test_bitsandbytes_kernel_path_equals_ours():
    """The path CUDA takes when bitsandbytes is installed, forced here on CPU: bitsandbytes' layout rebuilt
    from ours is lossless, and its 4-bit matmul gives our outputs and input gradients."""
    layer = NF4Linear(nn.Linear(128, 64))
    x = torch.randn(2, 5, 128, requires_grad=True)
    ours = layer(x)
    layer.use_bitsandbytes = True
    x_bnb = x.detach().clone().requires_grad_(True)
    theirs = layer(x_bnb)
    packed, state = layer._bitsandbytes_state(x.device)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), layer.dequantized_weight())
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(x_bnb.grad, x.grad, atol=1e-6, rtol=1e-6)
