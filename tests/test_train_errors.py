"""Bad input to `peftlab train`: one-line errors that name the problem and the fix; earlier runs intact."""

import pytest
from test_train import TASKS, run, seq_rows

import peftlab
import peftlab.train.loop
from peftlab.cli import main
from peftlab.data.synth import write_jsonl
from peftlab.train.config import load_config

T5 = {"model.name": "random:t5-tiny", "run.max_steps": 2, **TASKS["t5-tiny"]}


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_column_lists_existing_columns(tmp_path):
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "cols", {**T5, "data.target_column": "summmary"})
    assert "lacks column(s) ['summmary']" in one_line(err) and "'dialogue', 'summary'" in str(err.value)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    config = load_config(None, {**T5, "data.train": str(tmp_path / "empty.jsonl"), "run.output": str(tmp_path / "o")})
    with pytest.raises(peftlab.PeftlabError, match="empty.jsonl is empty: it needs at least one example"):
        peftlab.train.loop.train(config)


@pytest.mark.parametrize("template, message", [
    ("sum: {dialogue", "is not a format string (expected '}' before end of string)"),
    ("sum: {}", "has positional field(s) ['{}']"), ("sum: {0}", "has positional field(s) ['{0}']"),
    ("sum: {{dialogue}}", "names no column, so every example would get the same input")])
def test_malformed_template(tmp_path, template, message):
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "tpl", {**T5, "data.template": template})
    assert message in one_line(err) and "write a literal brace as {{ or }}" in str(err.value)
    assert not (tmp_path / "tpl").exists()


def test_validation_label_outside_training_labels(tmp_path):
    train = write_jsonl([{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(8)], tmp_path / "t.jsonl")
    val = write_jsonl([{"text": "x", "label": "neutral"}], tmp_path / "v.jsonl")
    config = load_config(None, {"model.name": "random:bert-tiny", "data.train": str(train),
                                "data.validation": str(val), "run.output": str(tmp_path / "o"), "run.max_steps": 1})
    with pytest.raises(peftlab.PeftlabError) as err:
        peftlab.train.loop.train(config)
    assert "label 'neutral' is not in the known set ['neg', 'pos']" in one_line(err)


def test_truncation_is_warned_with_counts(tmp_path, capsys):
    run(tmp_path, "trunc", {**T5, "data.max_source_length": 8})
    assert "warning: 43 texts (sources or targets) of 43 training examples were cut to max_source_length=8" \
        in capsys.readouterr().out


@pytest.mark.parametrize("key, value, message", [
    ("run.batch_size", 0, "run.batch_size must be > 0"), ("run.epochs", 0, "run.epochs must be > 0"),
    ("run.save_steps", 0, "run.save_steps must be > 0"), ("run.eval_steps", 0, "run.eval_steps must be > 0"),
    ("run.save_total_limit", -1, "run.save_total_limit must be >= 0"),
    ("data.max_target_length", 0, "data.max_source_length and data.max_target_length must be > 0"),
    ("optim.warmup_steps", -2, "optim.warmup_steps must be >= 0"),
    ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0"),
    ("optim.max_grad_norm", -1.0, "a negative norm would flip the gradients"),
    ("optim.betas", [0.9, 1.0], "optim.betas must be two numbers in [0, 1)"),
    ("optim.eps", 0.0, "optim.eps must be > 0")])
def test_out_of_range_settings_are_refused_before_anything_runs(tmp_path, key, value, message):
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "o", {**T5, key: value})
    assert message in one_line(err)
    assert not (tmp_path / "o").exists()


def test_misspelt_key_suggests_the_closest(tmp_path):
    with pytest.raises(peftlab.PeftlabError, match="unknown config key 'optim.learning_rat'; did you mean"):
        load_config(None, {"optim.learning_rat": 1})
    (tmp_path / "c.yaml").write_text("run:\n  batchsize: 4\n")
    with pytest.raises(peftlab.PeftlabError, match="did you mean 'run.batch_size'"):
        load_config(tmp_path / "c.yaml")


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path, monkeypatch):
    real_load = peftlab.train.loop.load_model
    calls = {"n": 0}

    def diverging_load(*args, **kwargs):  # the model's output turns NaN on its 5th training forward
        model, tokenizer = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] >= 5:
                    return output * float("nan")
            return output

        model.decoder.final_layer_norm.register_forward_hook(hook)  # used with and without the chunked loss
        return model, tokenizer

    monkeypatch.setattr(peftlab.train.loop, "load_model", diverging_load)
    settings = {**T5, "run.max_steps": 12, "run.save_steps": 1, "run.save_total_limit": 50}
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "nan", settings)
    assert "loss became nan at step 5: lower --lr or check the data" in one_line(err)
    assert "checkpoint-4 is untouched (resume from it with --resume latest)" in one_line(err)
    calls["n"] = 0
    with pytest.raises(peftlab.PeftlabError) as err:  # without --save-steps nothing was saved: it says so
        run(tmp_path, "nan-unsaved", {**T5, "run.max_steps": 12})
    assert "no checkpoint was saved (train with --save-steps N to keep some)" in one_line(err)
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "nan").glob("checkpoint-*"))
    assert kept == [1, 2, 3, 4]  # every good step's checkpoint is there
    assert not list((tmp_path / "nan").glob(".checkpoint-*"))
    peftlab.methods.checkpoint.read_adapter_weights(tmp_path / "nan" / "checkpoint-4")  # and readable


def test_output_holding_a_run_is_refused_unless_overwrite(tmp_path):
    first = run(tmp_path, "out", T5)
    adapter = (first.output / "adapter_model.safetensors").read_bytes()
    with pytest.raises(peftlab.PeftlabError, match="already holds a run: pass --overwrite"):
        run(tmp_path, "out", T5)
    assert (first.output / "adapter_model.safetensors").read_bytes() == adapter
    with pytest.raises(peftlab.PeftlabError, match="lacks column"):  # a replacement that cannot start
        run(tmp_path, "out", {**T5, "run.overwrite": True, "data.target_column": "typo"})
    assert (first.output / "adapter_model.safetensors").read_bytes() == adapter  # leaves the old run whole
    assert (first.output / "results.json").is_file()
    run(tmp_path, "out", {**T5, "run.overwrite": True, "run.seed": 5})
    assert (first.output / "adapter_model.safetensors").read_bytes() != adapter


def test_cli_train_flags_yaml_and_key_value(tmp_path, capsys):
    data = write_jsonl(seq_rows(), tmp_path / "d.jsonl")
    (tmp_path / "c.yaml").write_text("method:\n  r: 2\n  alpha: 4\nrun:\n  batch_size: 4\n")
    code = main(["train", "--config", str(tmp_path / "c.yaml"), "--model", "random:t5-tiny", "--data", str(data),
                 "--input-column", "dialogue", "--target-column", "summary", "--r", "4", "--max-steps", "3",
                 "--logging-steps", "1", "--output", str(tmp_path / "cli"), "optim.weight_decay=0.01"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Using LORA: LoraConfig(r=4, alpha=4, " in out and "targets=['q', 'v']" in out  # flag > YAML > default
    assert out.count("{'loss': ") == 3 and "'grad_norm': " in out and "'epoch': " in out
    saved = load_config(tmp_path / "cli" / "config.yaml")
    assert (saved.method.r, saved.run.batch_size, saved.optim.weight_decay) == (4, 4, 0.01)
    assert main(["train", "--model", "random:t5-tiny", "--data", str(data), "nonsense"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_seed_config_runs_offline_with_local_substitutes(tmp_path):
    data = write_jsonl(seq_rows(12), tmp_path / "samsum.jsonl")
    config = load_config("configs/flan-t5-small-samsum-lora.yaml", {
        "model.name": "random:flan-t5-small", "data.train": str(data), "data.validation": "",
        "run.output": str(tmp_path / "seed"), "run.max_steps": 1, "run.batch_size": 2, "run.eval_before": False})
    assert (config.method.r, config.method.alpha, config.method.targets) == (8, 16, ["q", "v"])
    assert config.data.template == "summarize: {dialogue}"
    result = peftlab.train.loop.train(config, progress=False)
    assert peftlab.methods.checkpoint.read_adapter_config(result.output).r == 8


def test_recompute_linear_needs_lean_kernels_and_no_fsdp(tmp_path, monkeypatch):
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "plain", {**T5, "run.recompute_linear": True, "run.lean_kernels": False})
    assert "set run.lean_kernels=true or turn it off" in one_line(err)
    # FSDP frees each layer's weights after its forward: refused before any process group starts
    monkeypatch.setattr(peftlab.train.loop.distributed, "world_from_env",
                        lambda strategy: peftlab.train.loop.distributed.World(0, 2, 0, strategy))
    monkeypatch.setattr(peftlab.train.loop.distributed, "start", lambda *a: pytest.fail("started"))
    with pytest.raises(peftlab.PeftlabError) as err:
        run(tmp_path, "fsdp", {**T5, "run.recompute_linear": True, "run.distributed": "fsdp"})
    assert "does not work with FSDP" in one_line(err) and "--distributed ddp" in str(err.value)
    assert not (tmp_path / "plain").exists() and not (tmp_path / "fsdp").exists()
