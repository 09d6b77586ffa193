"""peftlab.Trainer: the library's training entry writes what `peftlab train` writes, from objects."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main

ROWS = [{"dialogue": f"w{i % 7} a{i % 3} b c", "summary": f"w{i % 7}"} for i in range(32)]
VALIDATION = ROWS[:6]
SETTINGS = {"model": {"name": "random:t5-tiny", "overrides": {"dropout_rate": 0.0}},
            "data": {"input_column": "dialogue", "target_column": "summary", "max_target_length": 8},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "optim": {"lr": 0.01},
            "run": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_steps": 2, "save_steps": 2,
                    "seed": 3}}
CLI_FLAGS = ["--model", "random:t5-tiny", "--input-column", "dialogue", "--target-column", "summary",
             "--max-target-length", "8", "--method", "lora", "--r", "4", "--alpha", "8", "--dropout", "0", "--lr",
             "0.01", "--max-steps", "4", "--batch-size", "8", "--logging-steps", "1", "--eval-steps", "2",
             "--save-steps", "2", "--seed", "3", "model.overrides={dropout_rate: 0.0}"]


def settings(output: Path) -> dict:
    return {**SETTINGS, "run": {**SETTINGS["run"], "output": str(output)}}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    for name, rows in (("train.jsonl", ROWS), ("validation.jsonl", VALIDATION)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--data", str(root / "train.jsonl"), "--validation-data", str(root / "validation.jsonl"),
                 "--output", str(root / "run"), *CLI_FLAGS]) == 0
    return root / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    """The same files, losses, evaluations and adapter tensors."""
    def names(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "eval" not in p.parts}

    assert names(run) == names(reference)
    logs, expected = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (run, reference))
    assert logs["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, reference)]
    for mine, theirs in zip(*records, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "eval_rougeL"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    mine, theirs = (load_file(d / "adapter_model.safetensors") for d in (run, reference))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-7)


def test_trainer_on_a_list_of_dicts_writes_what_the_cli_writes(cli_run, tmp_path):
    result = peftlab.Trainer(train_data=ROWS, eval_data=VALIDATION, config=settings(tmp_path / "run")).train()
    assert_same_run(tmp_path / "run", cli_run)
    assert result.eval_after["eval_loss"] == pytest.approx(json.loads((cli_run / "results.json").read_text())
                                                           ["eval_after"]["eval_loss"], rel=1e-5)


def test_trainer_on_a_dataset_dict_writes_what_the_cli_writes(cli_run, tmp_path):
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "validation": datasets.Dataset.from_list(VALIDATION)})
    peftlab.Trainer(train_data=data, config=settings(tmp_path / "run")).train()
    assert_same_run(tmp_path / "run", cli_run)


def test_trainer_on_a_model_the_user_built_and_modified(cli_run, tmp_path):
    model, tokenizer = peftlab.load_model("random:t5-tiny", overrides={"dropout_rate": 0.0})
    torch.manual_seed(3)  # the run's seed, as `peftlab train` seeds the adapter's init
    model = peftlab.apply(model, peftlab.LoraConfig(r=4, alpha=8, targets=["q", "v"], dropout=0.0))
    config = {**settings(tmp_path / "run"), "method": {"name": "lora"}}  # what the model carries wins
    trainer = peftlab.Trainer(model, tokenizer, datasets.Dataset.from_list(ROWS), VALIDATION, config=config)
    result = trainer.train()
    assert_same_run(tmp_path / "run", cli_run)
    assert result.model is model  # trained in place: the notebook's object holds the trained adapter
    saved = peftlab.load_adapter(peftlab.load_model("random:t5-tiny")[0], tmp_path / "run")
    assert saved.peftlab_adapters["default"].r == 4


def test_a_callback_sees_every_hook_in_order_and_compute_metrics_lands_in_metrics_jsonl(tmp_path):
    class Recorder(peftlab.Callback):
        def __init__(self):
            self.events = []

        def on_train_begin(self, run):
            self.events.append(("begin", run.total_steps))

        def on_step_end(self, step):
            self.events.append(("step", step))

        def on_log(self, record):
            self.events.append(("log", record["step"]))

        def on_evaluate(self, metrics):
            self.events.append(("evaluate", metrics.get("step"), "eval_words" in metrics))

        def on_save(self, checkpoint):
            self.events.append(("save", Path(checkpoint).name))

        def on_train_end(self, results):
            self.events.append(("end", results["steps"]))

    def words(predictions, references):
        return {"words": sum(len(p.split()) for p in predictions) / len(predictions)}

    recorder = Recorder()
    config = {**settings(tmp_path / "run"), "run": {**settings(tmp_path / "run")["run"], "logging_steps": 2}}
    trainer = peftlab.Trainer(train_data=ROWS, eval_data=VALIDATION, config=config, compute_metrics=words,
                              callbacks=[recorder])
    trainer.train()
    assert recorder.events == [
        ("begin", 4), ("evaluate", None, True),
        ("step", 1), ("step", 2), ("log", 2), ("evaluate", 2, True), ("save", "checkpoint-2"),
        ("step", 3), ("step", 4), ("log", 4), ("save", "checkpoint-4"), ("evaluate", 4, True), ("end", 4)]
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    assert all(isinstance(r["eval_words"], float) and "eval_rougeL" in r for r in evaluations)
    assert trainer.evaluate()["rougeL"] >= 0  # eval -p on the run it wrote


def test_classification_validation_logs_accuracy_and_macro_f1(tmp_path):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} movie {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(24)]
    result = peftlab.Trainer(train_data=rows, config={"model.name": "random:bert-tiny", "run.max_steps": 2,
                                                      "run.output": str(tmp_path / "run")}).train()
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(result.eval_after)


def test_bad_trainer_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(peftlab.PeftlabError, match="needs its tokenizer"):
        peftlab.Trainer(peftlab.load_model("random:t5-tiny")[0])
    with pytest.raises(peftlab.PeftlabError, match="must be a datasets.Dataset"):
        peftlab.Trainer(train_data=42, config={"run.output": str(tmp_path / "x")}).train()
    with pytest.raises(peftlab.PeftlabError, match="config must be"):
        peftlab.Trainer(config=3)
