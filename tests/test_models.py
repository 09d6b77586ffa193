"""load_model: seeded random presets with offline tokenizers, local directories, the packaged MiniLM."""

import pytest
import torch
from conftest import fresh_base

import peftlab
from peftlab.archs import presets

TINY = [p for p in presets() if p != "flan-t5-small"]


@pytest.mark.parametrize("preset", TINY)
def test_random_presets_are_deterministic(preset):
    a, _ = peftlab.load_model(f"random:{preset}")
    b, _ = peftlab.load_model(f"random:{preset}")
    c, _ = peftlab.load_model(f"random:{preset}", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    assert a.config.name_or_path == f"random:{preset}"


@pytest.mark.parametrize("preset", TINY)
def test_tokenizer_fits_vocab_and_special_tokens_match_config(preset):
    model, tokenizer = fresh_base(preset)
    ids = tokenizer(["Hello, wörld! 123", "ünïcode ☃"], padding=True)["input_ids"]
    assert max(max(row) for row in ids) < model.config.vocab_size
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "Hello, wörld! 123"
    for role in ("pad", "eos", "bos"):
        config_id = getattr(model.config, f"{role}_token_id", None)
        if config_id is not None and getattr(tokenizer, f"{role}_token", None) is not None:
            assert getattr(tokenizer, f"{role}_token_id") == config_id, role


def test_flan_t5_small_has_the_checkpoints_architecture():
    model, tokenizer = peftlab.load_model("random:flan-t5-small")
    assert peftlab.count_parameters(model)[1] == 76_961_152
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # untied, as in the checkpoint
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert (model.config.d_model, model.config.num_layers, model.config.num_heads) == (512, 8, 6)
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0
    assert tokenizer.eos_token_id == model.config.eos_token_id == 1


def test_local_directory_loads_like_the_original(tmp_path):
    model, tokenizer = fresh_base("bert-tiny")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = peftlab.load_model(str(tmp_path))
    assert type(loaded) is type(model)
    batch = tokenizer(["some text"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits)
    assert loaded_tokenizer("some text")["input_ids"] == batch["input_ids"][0].tolist()


def test_packaged_minilm_is_real_pretrained_bert():
    model, tokenizer = peftlab.load_model("minilm")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert 22_000_000 < peftlab.count_parameters(model)[1] < 23_000_000
    assert tokenizer.tokenize("hello world") == ["hello", "world"]  # a real WordPiece vocabulary
    again, _ = peftlab.load_model("minilm")
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # seeded head


def test_unknown_preset_lists_presets():
    with pytest.raises(peftlab.PeftlabError, match="random:bert-tiny.*random:flan-t5-small.*random:qwen2-tiny"):
        peftlab.load_model("random:gpt5")


def test_missing_directory_or_offline_hub_id_is_one_line_error(tmp_path):
    with pytest.raises(peftlab.PeftlabError) as err:
        peftlab.load_model(str(tmp_path))  # exists, but holds no config
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "runs/no/such"])
def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(name):
    with pytest.raises(peftlab.PeftlabError, match=f"model directory '{name}' not found: check the path"):
        peftlab.load_model(name)


def test_an_adapter_directory_given_as_the_base_says_where_it_goes(tmp_path):
    model, _ = fresh_base("t5-tiny")
    peftlab.apply(model, peftlab.LoraConfig(targets=["q", "v"]))
    peftlab.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(peftlab.PeftlabError, match="holds an adapter, not a base model: pass it as -p to eval"):
        peftlab.load_model(str(tmp_path / "adapter"))
