"""Adapters on disk: peftlab -> peft and peft -> peftlab give the same outputs; bad files fail cleanly."""

import copy
import json
import pickle

import peft
import pytest
import torch
from conftest import example_batch, fresh_base, randomize_lora_B
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.methods.checkpoint import CONFIG_NAME, WEIGHTS_NAME

ROUND_TRIPS = [
    ("t5-tiny", {"r": 4, "alpha": 8, "targets": ["q", "v"]}),
    ("gpt2-tiny", {"r": 4, "alpha": 16, "targets": ["c_attn"], "use_rslora": True, "bias": "all"}),
    ("bert-tiny", {"r": 4, "alpha": 8, "targets": ["query", "value"], "modules_to_save": ["classifier"],
                   "bias": "lora_only", "rank_pattern": {"layer.1.attention.self.value": 6}}),
    ("llama-tiny", {"r": 2, "alpha": 4, "targets": "all-linear", "alpha_pattern": {"o_proj": 9}}),
]


def trained_adapter(preset, config):
    base, tokenizer = fresh_base(preset)
    model = peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(**config)).eval()
    randomize_lora_B(model)
    with torch.no_grad():  # make biases and saved modules differ from the base too
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.05)
    return base, model, tokenizer


@pytest.mark.parametrize("preset,config", ROUND_TRIPS, ids=[p for p, _ in ROUND_TRIPS])
def test_peftlab_save_loads_in_peft(tmp_path, preset, config):
    base, model, tokenizer = trained_adapter(preset, config)
    batch = example_batch(model, tokenizer)
    peftlab.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
    # and the file holds exactly what peft itself would write
    peft_dir = tmp_path / "by_peft"
    theirs.save_pretrained(peft_dir)
    ours_tensors, peft_tensors = load_file(tmp_path / WEIGHTS_NAME), load_file(peft_dir / WEIGHTS_NAME)
    assert set(ours_tensors) == set(peft_tensors)
    for key in ours_tensors:
        assert torch.equal(ours_tensors[key], peft_tensors[key]), key
    ours_config = json.loads((tmp_path / CONFIG_NAME).read_text())
    peft_config = json.loads((peft_dir / CONFIG_NAME).read_text())
    # peft re-adds its default SEQ_CLS heads ("classifier", "score") to modules_to_save when it loads
    assert set(ours_config["modules_to_save"] or []) <= set(peft_config["modules_to_save"] or [])
    for key in ("r", "lora_alpha", "bias", "use_rslora", "rank_pattern", "alpha_pattern",
                "task_type", "peft_type", "base_model_name_or_path"):
        assert ours_config[key] == peft_config[key], key
    assert set(ours_config) <= set(peft_config) | {"peft_version"}


@pytest.mark.parametrize("preset,config", ROUND_TRIPS, ids=[p for p, _ in ROUND_TRIPS])
def test_peft_save_loads_in_peftlab(tmp_path, preset, config):
    base, model, tokenizer = trained_adapter(preset, config)
    batch = example_batch(model, tokenizer)
    kwargs = {"r": config["r"], "lora_alpha": config["alpha"], "target_modules": config["targets"],
              **{k: v for k, v in config.items() if k not in ("r", "alpha", "targets")}}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.base_model.model.load_state_dict(model.state_dict())  # same trained values
    theirs.save_pretrained(tmp_path)
    loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, theirs.eval()(**batch).logits, atol=1e-6, rtol=0)
    assert peftlab.count_parameters(loaded) == theirs.get_nb_trainable_parameters()


def test_peftlab_round_trip_and_pickle_bin(tmp_path):
    base, model, tokenizer = trained_adapter("t5-tiny", {"r": 4, "alpha": 8, "targets": ["q", "v"]})
    batch = example_batch(model, tokenizer)
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, atol=0, rtol=0)
    # an old-style .bin adapter is read with weights_only=True
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / CONFIG_NAME).write_text((tmp_path / CONFIG_NAME).read_text())
    torch.save(load_file(tmp_path / WEIGHTS_NAME), bin_dir / "adapter_model.bin")
    loaded_bin = peftlab.load_adapter(copy.deepcopy(base), bin_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_bin(**batch).logits, expected, atol=0, rtol=0)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_with_code_is_refused(tmp_path, tiny_t5, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, _ = tiny_t5
    model = peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(r=4, alpha=8, targets=["q"]))
    peftlab.save_adapter(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(peftlab.PeftlabError, match="corrupt or not a plain tensor file"):
        peftlab.load_adapter(base, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_bad_adapters_give_one_line_errors_and_leave_the_model_alone(tmp_path, tiny_t5):
    base, tokenizer = tiny_t5
    state_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    peftlab.save_adapter(model, tmp_path / "good")

    with pytest.raises(peftlab.PeftlabError, match="no adapter_config.json"):
        peftlab.load_adapter(base, tmp_path / "missing")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CONFIG_NAME).write_text((tmp_path / "good" / CONFIG_NAME).read_text())
    (corrupt / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(peftlab.PeftlabError, match="corrupt"):
        peftlab.load_adapter(base, corrupt)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / CONFIG_NAME).write_text((tmp_path / "good" / CONFIG_NAME).read_text())
    with pytest.raises(peftlab.PeftlabError, match="weights are missing"):
        peftlab.load_adapter(base, no_weights)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / CONFIG_NAME).write_text("{not json")
    with pytest.raises(peftlab.PeftlabError, match="not valid JSON"):
        peftlab.load_adapter(base, bad_json)

    # shapes that do not fit: the same adapter saved from a model with wider q
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / CONFIG_NAME).write_text((tmp_path / "good" / CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / "good" / WEIGHTS_NAME)
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(tensors[first].shape[0] + 1, tensors[first].shape[1])
    save_file(tensors, wrong / WEIGHTS_NAME)
    with pytest.raises(peftlab.PeftlabError) as err:
        peftlab.load_adapter(base, wrong)
    module = first.removeprefix("base_model.model.")
    assert module in str(err.value) and "\n" not in str(err.value)
    assert str(tuple(tensors[first].shape)) in str(err.value)

    # after every failure the base is exactly as before: no adapter layers, same weights
    assert not hasattr(base, "peftlab_adapters")
    assert not any(isinstance(m, peftlab.methods.LoraLayer) for m in base.modules())
    assert all(torch.equal(v, state_before[k]) for k, v in base.state_dict().items())


def test_save_is_atomic_and_does_not_touch_existing_files_on_error(tmp_path, tiny_t5, monkeypatch):
    base, _ = tiny_t5
    model = peftlab.apply(copy.deepcopy(base), peftlab.LoraConfig(r=4, alpha=8, targets=["q"]))
    peftlab.save_adapter(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    randomize_lora_B(model, seed=3)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peftlab.methods.checkpoint.save_file", failing_save)
    with pytest.raises(OSError):
        peftlab.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
