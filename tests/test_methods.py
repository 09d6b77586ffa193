"""DoRA, IA3, LN tuning (against peft, the oracle), BitFit and Houlsby adapters (against their definitions):
counts, outputs, gradients, merging, save/load both ways, and training through the unchanged loop."""

import copy
import json

import peft
import pytest
import torch
from conftest import example_batch, fresh_base
from safetensors.torch import load_file
from test_train import TASKS, run

import peftlab
from peftlab.errors import PeftlabError
from peftlab.eval.runs import load_run
from peftlab.methods import BitFitConfig, DoraConfig, HoulsbyConfig, IA3Config, LNTuningConfig, build_config
from peftlab.methods.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftlab.methods.inject import adapter_state_dict
from peftlab.methods.qlora import quantized_layers

# (preset, peftlab config, the same config in peft)
PEFT_CASES = {
    "dora-t5": ("t5-tiny", lambda: DoraConfig(r=4, alpha=8, targets=["q", "v"]),
                lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True)),
    "dora-gpt2": ("gpt2-tiny", lambda: DoraConfig(r=4, alpha=8, targets=["c_attn"], bias="all"),
                  lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True,
                                          fan_in_fan_out=True, bias="all")),
    "dora-bert": ("bert-tiny", lambda: DoraConfig(r=2, alpha=4, targets=["query", "value"],
                                                  modules_to_save=["classifier"]),
                  lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True,
                                          modules_to_save=["classifier"])),
    "ia3-t5": ("t5-tiny", lambda: IA3Config(targets=["k", "v", "wo"], feedforward=["wo"]),
               lambda: peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])),
    "ia3-gpt2": ("gpt2-tiny", lambda: IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
                 lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                        fan_in_fan_out=True)),
    "ia3-llama": ("llama-tiny", lambda: IA3Config(targets=["k_proj", "v_proj", "down_proj"],
                                                  feedforward=["down_proj"]),
                  lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
    "ln-t5": ("t5-tiny", lambda: LNTuningConfig(targets=["layer_norm", "final_layer_norm"]),
              lambda: peft.LNTuningConfig(target_modules=["layer_norm", "final_layer_norm"])),
    "ln-bart": ("bart-tiny", lambda: LNTuningConfig(targets=["self_attn_layer_norm", "final_layer_norm"]),
                lambda: peft.LNTuningConfig(target_modules=["self_attn_layer_norm", "final_layer_norm"])),
    # no targets given: each side's defaults for the family (peftlab/archs against peft's own mappings)
    **{f"{method}-{family}-defaults": (f"{family}-tiny", lambda m=method, f=family: build_config(m, f),
                                       lambda c=peft_config: c())
       for family in ("qwen2", "mistral")
       for method, peft_config in (("lora", peft.LoraConfig), ("ia3", peft.IA3Config),
                                   ("ln_tuning", peft.LNTuningConfig))},
}


def perturb_trainable(model, seed=0, scale=0.1):
    """Move every trainable tensor off its init so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def both(case):
    preset, ours_config, theirs_config = PEFT_CASES[case]
    base, tokenizer = fresh_base(preset)
    ours = peftlab.apply(copy.deepcopy(base), ours_config())
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config())
    perturb_trainable(ours)
    theirs.base_model.model.load_state_dict(ours.state_dict(), strict=True)  # identical module trees
    return base, ours.eval(), theirs.eval(), tokenizer


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_counts_outputs_and_gradients_equal_peft(case):
    _, ours, theirs, tokenizer = both(case)
    assert peftlab.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()
                              if p.requires_grad}
    batch = example_batch(ours, tokenizer)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_merge_equals_unmerged_and_unmerge_restores(case):
    base, ours, _, tokenizer = both(case)
    batch = example_batch(ours, tokenizer)
    with torch.no_grad():
        unmerged = ours(**batch).logits
        peftlab.merge(ours)
        torch.testing.assert_close(ours(**batch).logits, unmerged, atol=1e-4, rtol=1e-4)
        peftlab.unmerge(ours)
        torch.testing.assert_close(ours(**batch).logits, unmerged, atol=1e-4, rtol=1e-4)
        plain = peftlab.merge_and_unload(copy.deepcopy(ours))
        assert type(plain) is type(base)
        torch.testing.assert_close(plain(**batch).logits, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_save_load_both_ways_with_peft(tmp_path, case):
    base, ours, theirs, tokenizer = both(case)
    batch = example_batch(ours, tokenizer)
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("ours", "theirs"))
    assert set(ours_file) == set(theirs_file)
    assert all(torch.equal(ours_file[k], theirs_file[k]) for k in ours_file)
    ours_json, theirs_json = (json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("ours", "theirs"))
    assert ours_json["peft_type"] == theirs_json["peft_type"]
    assert set(ours_json) <= set(theirs_json) | {"peft_version"}
    with torch.no_grad():
        expected = ours(**batch).logits
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(in_peft(**batch).logits, expected, atol=1e-6, rtol=0)
        in_ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
        torch.testing.assert_close(in_ours(**batch).logits, expected, atol=1e-6, rtol=0)
    assert type(in_ours.peftlab_adapters["default"]) is type(ours.peftlab_adapters["default"])


def test_dora_magnitude_starts_at_the_weight_norms_and_output_at_the_base():
    base, tokenizer = fresh_base("t5-tiny")
    model = peftlab.apply(copy.deepcopy(base), DoraConfig(r=4, alpha=8, targets=["q"]))
    layer = model.encoder.block[0].layer[0].SelfAttention.q
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight,
                               torch.linalg.norm(layer.base_layer.weight, dim=1))
    batch = example_batch(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, base(**batch).logits, atol=1e-6, rtol=0)


def houlsby_model(preset="bert-tiny", **config):
    base, tokenizer = fresh_base(preset)
    return base, peftlab.apply(copy.deepcopy(base), HoulsbyConfig(**config)), tokenizer


def test_houlsby_is_the_identity_at_init_and_counts_match_the_formula():
    base, model, tokenizer = houlsby_model(bottleneck=8, targets=["output.dense"], modules_to_save=["classifier"])
    batch = example_batch(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, base(**batch).logits, atol=0, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, peftlab.methods.houlsby.HoulsbyLayer)]
    # two per transformer layer: after attention (attention.output.dense) and after the feed-forward block
    assert len(layers) == 2 * model.config.num_hidden_layers
    d, m = model.config.hidden_size, 8
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n)
    assert adapter == len(layers) * (2 * m * d + d + m)
    norms = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert peftlab.count_parameters(model)[0] == adapter + norms + head
    assert all(p.requires_grad for n, p in model.named_parameters() if "LayerNorm" in n)


def test_houlsby_places_adapters_after_self_and_cross_attention_and_ff_in_t5():
    _, model, _ = houlsby_model("t5-tiny", bottleneck=4, targets=["o", "wo"])
    names = [n for n, m in model.named_modules() if isinstance(m, peftlab.methods.houlsby.HoulsbyLayer)]
    layers = model.config.num_layers + model.config.num_decoder_layers
    assert len(names) == 2 * model.config.num_layers + 3 * model.config.num_decoder_layers
    assert sum("EncDecAttention.o" in n for n in names) == model.config.num_decoder_layers
    _, no_cross, _ = houlsby_model("t5-tiny", bottleneck=4, targets=["o", "wo"], exclude=["EncDecAttention.o"])
    assert sum(isinstance(m, peftlab.methods.houlsby.HoulsbyLayer) for m in no_cross.modules()) == 2 * layers


def test_houlsby_and_bitfit_save_and_load_in_peftlab(tmp_path):
    for config in (HoulsbyConfig(bottleneck=4, targets=["output.dense"]), BitFitConfig()):
        base, tokenizer = fresh_base("bert-tiny")
        model = peftlab.apply(copy.deepcopy(base), config)
        perturb_trainable(model)
        batch = example_batch(model, tokenizer)
        out = tmp_path / config.method
        peftlab.save_adapter(model, out)
        loaded = peftlab.load_adapter(copy.deepcopy(base), out).eval()
        with torch.no_grad():
            expected = model.eval()(**batch).logits
            assert not torch.allclose(expected, base(**batch).logits)
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
        saved = load_file(out / WEIGHTS_NAME)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(saved) == len(trainable)
        assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trainable)


def test_bitfit_trains_exactly_the_biases():
    base, _ = fresh_base("bert-tiny")
    model = peftlab.apply(copy.deepcopy(base), BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    assert trainable


@pytest.mark.parametrize("make,message", [
    (lambda: peftlab.apply(fresh_base("t5-tiny")[0], BitFitConfig()), "no bias terms"),
    (lambda: HoulsbyConfig(bottleneck=0, targets=["o"]), "bottleneck size m must be a positive integer"),
    (lambda: HoulsbyConfig(bottleneck=-3, targets=["o"]), "bottleneck size m must be a positive integer"),
    (lambda: peftlab.apply(fresh_base("t5-tiny")[0], HoulsbyConfig(targets=["layer_norm"])), "linear output"),
    (lambda: peftlab.apply(fresh_base("t5-tiny")[0], LNTuningConfig(targets=["q"])), "norm layers"),
    (lambda: IA3Config(targets=["k", "v"], feedforward=["wo"]), "not among the targets"),
    (lambda: peftlab.merge(houlsby_model(targets=["output.dense"])[1]), "cannot be merged"),
    (lambda: build_config("ia3", "t5-xxl-unknown"), "no default ia3 targets"),
    (lambda: build_config("prefix"), "unknown method"),
])
def test_bad_method_options_give_one_line_errors(make, message):
    with pytest.raises(PeftlabError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method,preset", [("dora", "t5-tiny"), ("ia3", "gpt2-tiny"), ("ln_tuning", "bart-tiny"),
                                           ("houlsby", "t5-tiny"), ("bitfit", "gpt2-tiny"), ("qlora", "llama-tiny"),
                                           ("prompt_tuning", "t5-tiny"), ("prompt_tuning", "gpt2-tiny"),
                                           ("said", "t5-tiny"), ("did", "gpt2-tiny")])
def test_training_with_each_method_lowers_the_loss(tmp_path, method, preset):
    own = {"method.bottleneck": 16} if method == "houlsby" else {}  # another method's field would be refused
    result = run(tmp_path, method, {"model.name": f"random:{preset}", "method.name": method, "run.max_steps": 30,
                                    **own, **TASKS[preset]})
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    assert result.logs[-1]["loss"] < result.logs[0]["loss"]
    opened = load_run(result.output)  # as `peftlab eval -p` opens it: the method's own layers, trained values
    assert opened.model.peftlab_adapters["default"].method == method
    assert bool(quantized_layers(opened.model)) == (method == "qlora")
    trained = load_file(result.output / WEIGHTS_NAME)
    state = adapter_state_dict(opened.model)
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in trained)
