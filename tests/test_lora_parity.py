"""peftlab's LoRA against Hugging Face peft, the oracle: counts, outputs, gradients, merging."""

import copy

import peft
import pytest
import torch
from conftest import ATTENTION_TARGETS, example_batch, fresh_base, randomize_lora_B

import peftlab

PEFT_NAMES = {"alpha": "lora_alpha", "targets": "target_modules", "dropout": "lora_dropout",
              "exclude": "exclude_modules"}


def peft_config(**ours) -> peft.LoraConfig:
    kwargs = {PEFT_NAMES.get(k, k): v for k, v in ours.items()}
    if kwargs.pop("init", "kaiming") == "gaussian":
        kwargs["init_lora_weights"] = "gaussian"
    return peft.LoraConfig(**kwargs)


def both(preset: str, **config):
    """The same base with peftlab's adapter and with peft's adapter, holding identical weights."""
    base, tokenizer = fresh_base(preset)
    ours = peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**config))
    randomize_lora_B(ours)
    # identical module trees: peft's inner model takes peftlab's state dict key for key
    theirs.base_model.model.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval(), tokenizer


CASES = [
    *[(preset, {"r": 4, "alpha": 8, "targets": t}) for preset, t in ATTENTION_TARGETS.items()],
    ("t5-tiny", {"r": 8, "alpha": 16, "targets": "all-linear"}),
    ("gpt2-tiny", {"r": 4, "alpha": 4, "targets": ["c_attn", "c_fc", "c_proj"], "bias": "all"}),
    ("llama-tiny", {"r": 2, "alpha": 7, "targets": "all-linear", "use_rslora": True, "exclude": ["down_proj"]}),
    ("bart-tiny", {"r": 4, "alpha": 8, "targets": r".*encoder.*\.(q_proj|k_proj)", "bias": "lora_only"}),
    ("bert-tiny", {"r": 4, "alpha": 8, "targets": ["query", "value", "dense"], "modules_to_save": ["classifier"],
                   "rank_pattern": {"layer.0.attention.self.query": 2}, "alpha_pattern": {"value": 3}}),
    ("t5-tiny", {"r": 4, "alpha": 8, "targets": ["q", "v"], "layers_to_transform": [1], "init": "gaussian"}),
]
IDS = [f"{p}-{i}" for i, (p, _) in enumerate(CASES)]


@pytest.mark.parametrize("preset,config", CASES, ids=IDS)
def test_counts_equal_peft(preset, config):
    ours, theirs, _ = both(preset, **config)
    assert peftlab.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable


@pytest.mark.parametrize("preset,config", CASES, ids=IDS)
def test_forward_and_gradients_equal_peft(preset, config):
    ours, theirs, tokenizer = both(preset, **config)
    batch = example_batch(ours, tokenizer)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_grads[name], atol=1e-6, rtol=1e-5, msg=name)


MERGE_CASES = [0, 2, 6, 9]


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Merged weights (W + BA) x round differently from W x + B A x: up to ~4e-6 of the largest logit over
    seeds here (t5-tiny's reach ~31). A wrong merge is off by the adapter's delta: 0.3-0.9 of it here."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("preset,config", [CASES[i] for i in MERGE_CASES], ids=[IDS[i] for i in MERGE_CASES])
def test_merge_equals_unmerged_and_peft(preset, config):
    ours, theirs, tokenizer = both(preset, **config)
    batch = example_batch(ours, tokenizer)
    with torch.no_grad():
        unmerged = ours(**batch).logits
        peftlab.merge(ours)
        assert_close_to_rounding(ours(**batch).logits, unmerged)
        peftlab.unmerge(ours)
        assert_close_to_rounding(ours(**batch).logits, unmerged)
        plain_ours = peftlab.merge_and_unload(ours)
        plain_theirs = theirs.merge_and_unload()
        assert not any(isinstance(m, peftlab.methods.LoraLayer) for m in plain_ours.modules())
        assert set(plain_ours.state_dict()) == set(plain_theirs.state_dict())
        torch.testing.assert_close(plain_ours(**batch).logits, plain_theirs(**batch).logits, atol=1e-6, rtol=0)
        assert_close_to_rounding(plain_ours(**batch).logits, unmerged)


def test_seed_trainable_lines_exact():
    """The four lines of the seed study (flan-t5-small, q and v, alpha = 2r), printed by peft itself there."""
    seed_lines = {
        4: "trainable params: 172,032 || all params: 77,133,184 || trainable%: 0.2230",
        8: "trainable params: 344,064 || all params: 77,305,216 || trainable%: 0.4451",
        16: "trainable params: 688,128 || all params: 77,649,280 || trainable%: 0.8862",
        32: "trainable params: 1,376,256 || all params: 78,337,408 || trainable%: 1.7568",
    }
    base, _ = peftlab.load_model("random:flan-t5-small")
    assert peftlab.count_parameters(base)[1] == 76_961_152
    for r, line in seed_lines.items():
        model = copy.deepcopy(base)
        peftlab.apply(model, peftlab.LoraConfig(r=r, alpha=2 * r, targets=["q", "v"]))
        assert peftlab.trainable_line(model) == line
        if r == 4:  # peft agrees on the same architecture
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                target_modules=["q", "v"]))
            assert peftlab.count_parameters(model) == theirs.get_nb_trainable_parameters()


def test_init_output_equals_base_and_training_touches_only_adapters(tiny_t5):
    base, tokenizer = tiny_t5
    batch = example_batch(base, tokenizer)
    with torch.no_grad():
        base_logits = base(**batch).logits
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peftlab.apply(base, peftlab.LoraConfig(r=4, alpha=8, targets=["q", "v"], dropout=0.1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, atol=0, rtol=0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        original = name.replace(".base_layer.", ".")
        if p.requires_grad:
            assert "lora_" in name
            if "lora_B" in name:
                assert p.abs().sum() > 0, f"{name} never trained"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p, before[original]), f"frozen {name} changed"
