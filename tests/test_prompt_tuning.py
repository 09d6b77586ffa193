"""Prompt tuning against peft: counts, outputs, gradients, files both ways, generation."""

import copy

import peft
import pytest
import torch
from conftest import example_batch, fresh_base
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.errors import PeftlabError
from peftlab.methods import PromptTuningConfig
from peftlab.methods.checkpoint import WEIGHTS_NAME
from peftlab.methods.inject import adapters_disabled, remove_adapter

N = 5
CASES = {"t5-tiny": "SEQ_2_SEQ_LM", "bart-tiny": "SEQ_2_SEQ_LM", "gpt2-tiny": "CAUSAL_LM",
         "llama-tiny": "CAUSAL_LM", "bert-tiny": "SEQ_CLS"}


def both(preset):
    base, tokenizer = fresh_base(preset)
    heads = ["classifier"] if CASES[preset] == "SEQ_CLS" else None  # peft adds the head for SEQ_CLS
    ours = peftlab.apply(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=N, modules_to_save=heads))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=CASES[preset],
                                                                              num_virtual_tokens=N))
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.copy_(ours.peftlab_prompt.prompts["default"])
        if heads:
            theirs.base_model.classifier.modules_to_save.default.load_state_dict(
                ours.classifier.modules_to_save.default.state_dict())
    return base, ours.eval(), theirs.eval(), tokenizer


def batch_for(model, tokenizer):
    batch = example_batch(model, tokenizer)
    if CASES_BY_MODEL.get(type(model).__name__) == "CAUSAL_LM":
        batch["labels"][:, 0] = -100  # peft also scores the first token from the prompt; see prompt_tuning.py
    return batch


CASES_BY_MODEL = {"GPT2LMHeadModel": "CAUSAL_LM", "LlamaForCausalLM": "CAUSAL_LM"}


def their_logits(theirs, preset, batch):
    logits = theirs(**batch).logits
    return logits[:, N:] if CASES[preset] == "CAUSAL_LM" else logits  # peft keeps the virtual positions


@pytest.mark.parametrize("preset", list(CASES))
def test_counts_outputs_loss_and_gradients_equal_peft(preset):
    _, ours, theirs, tokenizer = both(preset)
    assert peftlab.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    batch = batch_for(ours, tokenizer)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, their_logits(theirs, preset, batch), atol=1e-6, rtol=0)
    # a mean of ~7.7: float32 ulps are 5e-7 there, and the two means differ by up to 3 of them depending on
    # what ran before in the process (equal when run alone; 1.4e-6 apart after test_eval and test_train)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    torch.testing.assert_close(ours.peftlab_prompt.prompts["default"].grad,
                               theirs.prompt_encoder.default.embedding.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny"])
def test_files_load_both_ways(tmp_path, preset):
    base, ours, theirs, tokenizer = both(preset)
    batch = batch_for(ours, tokenizer)
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("ours", "theirs"))
    assert set(ours_file) == set(theirs_file) == {"prompt_embeddings"}
    assert torch.equal(ours_file["prompt_embeddings"], theirs_file["prompt_embeddings"])
    with torch.no_grad():
        expected = ours(**batch).logits
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(their_logits(in_peft, preset, batch), expected, atol=1e-6, rtol=0)
        in_ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
        torch.testing.assert_close(in_ours(**batch).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["t5-tiny", "bart-tiny"])
def test_seq2seq_generation_equals_peft(preset):
    _, ours, theirs, tokenizer = both(preset)
    tokenizer.padding_side = "right"
    batch = tokenizer(["the movie was not good at all", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(ours.generate(**batch, **kwargs), theirs.generate(**batch, **kwargs))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_causal_generation_with_cache_equals_the_forward_pass(preset):
    """Cached decoding (the prompt lives in the cache after step one) scores each step exactly as a full
    forward pass over prompt + text, left padding included."""
    _, ours, _, tokenizer = both(preset)
    tokenizer.padding_side = "left"
    batch = tokenizer(["the movie was not good at all", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ours.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            output_scores=True, return_dict_in_generate=True)
        for step, scores in enumerate(out.scores):
            ids = out.sequences[:, : batch["input_ids"].shape[1] + step]
            mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
            full = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
            torch.testing.assert_close(scores, full, atol=1e-5, rtol=1e-5)


def test_disable_and_remove_restore_the_base():
    base, ours, _, tokenizer = both("gpt2-tiny")
    batch = batch_for(ours, tokenizer)
    with torch.no_grad():
        plain = base(**batch).logits
        assert not torch.allclose(ours(**batch).logits, plain)
        with adapters_disabled(ours):
            torch.testing.assert_close(ours(**batch).logits, plain, atol=0, rtol=0)
        remove_adapter(ours, "default")
        torch.testing.assert_close(ours(**batch).logits, plain, atol=0, rtol=0)


class NoEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = fresh_base("t5-tiny")[0].config
        self.linear = nn.Linear(4, 4)


@pytest.mark.parametrize("make,message", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens > 0"),
    (lambda: PromptTuningConfig(init="text"), "init must be one of"),
    (lambda: peftlab.apply(NoEmbeddings(), PromptTuningConfig()), "input embedding layer"),
    (lambda: peftlab.merge(both("t5-tiny")[1]), "cannot be merged"),
])
def test_bad_prompt_options_give_one_line_errors(make, message):
    with pytest.raises(PeftlabError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_a_deep_copy_keeps_working_on_its_own_prompt():
    _, ours, _, tokenizer = both("gpt2-tiny")
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.peftlab_prompt.prompts["default"].add_(1.0)
        batch = tokenizer(["hello there"], return_tensors="pt")
        args = (batch["input_ids"],)  # positional input_ids go through the same hooks
        assert not torch.allclose(twin(*args).logits, ours(*args).logits)
        torch.testing.assert_close(ours(*args).logits, ours(**batch).logits)
