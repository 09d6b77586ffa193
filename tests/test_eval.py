"""`peftlab eval -p`, generation, merge, and several adapters on one base."""

import copy
import json
import subprocess
import sys

import peft
import pytest
import torch
from conftest import fresh_base, randomize_lora_B
from rouge_score import rouge_scorer
from test_train import TASKS, WORDS, run, seq_rows
from transformers import AutoModelForSeq2SeqLM

import peftlab
from peftlab.cli import main
from peftlab.data.synth import generate as synth
from peftlab.eval.generation import generate
from peftlab.eval.metrics import exact_match, label_metrics, macro_f1, rouge
from peftlab.methods.inject import BASE_NAME, per_example_adapters


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5run")
    return run(tmp, "r", {"model.name": "random:t5-tiny", "run.max_steps": 40, "method.targets": "all-linear",
                          **TASKS["t5-tiny"]}).output


def test_rouge_equals_rouge_score_on_fixed_strings():
    predictions = ["the cat sat on the mat", "hello there general", "completely different"]
    references = ["the cat is on the mat", "hello there", "nothing alike here\nsecond line"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {k: 100 * sum(scorer.score(r, p)[k].fmeasure for p, r in zip(predictions, references, strict=True)) / 3
                for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    assert rouge(predictions, references) == pytest.approx(expected)
    assert exact_match(["a ", "b"], ["a", "c"]) == 50.0


def test_label_metrics_by_hand():
    # labels a: tp 1 fp 1 fn 1 -> F1 0.5; b: tp 1 fp 1 fn 1 -> 0.5; c: tp 1 -> 1.0
    assert macro_f1(["a", "b", "b", "c", "a"], ["a", "a", "b", "c", "b"]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert label_metrics([1, 0], [1, 1])["accuracy"] == 0.5


def test_eval_writes_predictions_whose_metrics_recompute(t5_run, capsys):
    assert main(["eval", "-p", str(t5_run), "--max-new-tokens", "8", "--compare-base"]) == 0
    out = t5_run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["examples"] == len(records) == 5  # the run's held-out 10% of 48 rows
    recomputed = rouge([r["prediction"] for r in records], [r["reference"] for r in records])
    for key, value in recomputed.items():
        assert metrics["adapter"][key] == pytest.approx(value)
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]  # trained beats its base, side by side
    assert (out / "predictions_base.jsonl").is_file()
    assert "rougeL" in capsys.readouterr().out


def test_eval_py_and_peftlab_eval_agree(t5_run, tmp_path):
    assert main(["eval", "-p", str(t5_run), "--max-new-tokens", "8", "--output", str(tmp_path / "a")]) == 0
    subprocess.run([sys.executable, "eval.py", "-p", str(t5_run), "--max-new-tokens", "8", "--output",
                    str(tmp_path / "b")], check=True, capture_output=True)
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["adapter"] == b["adapter"]


def test_classification_eval(tmp_path):
    result = run(tmp_path, "cls", {"model.name": "random:bert-tiny", "run.max_steps": 10},
                 rows=synth("sentiment", 60, seed=0))
    assert main(["eval", "-p", str(result.output)]) == 0
    metrics = json.loads((result.output / "eval" / "metrics.json").read_text())["adapter"]
    records = [json.loads(line) for line in (result.output / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["accuracy"] == pytest.approx(sum(r["prediction"] == r["reference"] for r in records) / 6)
    assert metrics["accuracy"] == pytest.approx(result.eval_after["eval_accuracy"])


@pytest.mark.parametrize("preset", ["t5-tiny", "llama-tiny"])
def test_eval_rebuilds_the_base_a_run_with_any_seed_trained_on(tmp_path, preset):
    # eval, generate and merge rebuild a random preset from the adapter's base name alone
    result = run(tmp_path, "s7", {"model.name": f"random:{preset}", "run.max_steps": 5, "run.seed": 7,
                                  **TASKS[preset]})
    assert main(["eval", "-p", str(result.output), "--max-new-tokens", "2"]) == 0
    metrics = json.loads((result.output / "eval" / "metrics.json").read_text())["adapter"]
    assert metrics["loss"] == pytest.approx(result.eval_after["eval_loss"], rel=1e-6)


def test_eval_finds_a_runs_model_and_data_given_relative_from_any_directory(tmp_path, monkeypatch, capsys):
    from peftlab.data.synth import write_jsonl
    from peftlab.train import loop
    from peftlab.train.config import load_config

    (tmp_path / "there").mkdir()
    monkeypatch.chdir(tmp_path / "there")
    write_jsonl(seq_rows(), "d.jsonl")
    for part in fresh_base("t5-tiny"):
        part.save_pretrained("base")
    result = loop.train(load_config(None, {"model.name": "base", "data.train": "d.jsonl", "run.seed": 0,
                                           "run.output": str(tmp_path / "r"), "run.max_steps": 3, **TASKS["t5-tiny"]}))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "-p", str(result.output), "--max-new-tokens", "2"]) == 0
    metrics = json.loads((result.output / "eval" / "metrics.json").read_text())["adapter"]
    assert metrics["loss"] == pytest.approx(result.eval_after["eval_loss"], rel=1e-6)  # the same held-out rows
    config = result.output / "config.yaml"  # as runs before absolute paths wrote it
    config.write_text(config.read_text().replace(str(tmp_path / "there" / "d.jsonl"), "d.jsonl"))
    assert main(["eval", "-p", str(result.output)]) == 2
    assert "the run's data d.jsonl is not found from" in capsys.readouterr().err
    adapter_config = result.output / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text().replace(str(tmp_path / "there" / "base"), "./base"))
    assert main(["eval", "-p", str(result.output)]) == 2
    assert "or pass --model with the base this was trained on (the run names './base')" in capsys.readouterr().err


def test_generation_equals_peft_wrapped_generation(t5_run):
    loaded = peftlab.eval.runs.load_run(t5_run)
    base, tokenizer = fresh_base("t5-tiny")
    theirs = peft.PeftModel.from_pretrained(base, t5_run).eval()
    texts = [r["dialogue"] for r in seq_rows(6)]
    ours = generate(loaded.model, loaded.tokenizer, texts, "seq2seq", batch_size=4, max_new_tokens=6)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    reference = tokenizer.batch_decode(theirs.generate(**batch, max_new_tokens=6, do_sample=False),
                                       skip_special_tokens=True)
    assert ours == [r.strip() for r in reference]


def test_merged_directory_loads_in_transformers_with_equal_outputs(t5_run, tmp_path):
    loaded = peftlab.eval.runs.load_run(t5_run)
    batch = loaded.tokenizer(["alpha bravo", "golf hotel echo"], padding=True, return_tensors="pt")
    batch["decoder_input_ids"] = torch.zeros((2, 3), dtype=torch.long)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    assert main(["merge", "-p", str(t5_run), "-o", str(tmp_path / "merged")]) == 0
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        # float32's defaults: W + BA rounds differently from W x + B A x (logits ~20 differ by ~1e-5)
        torch.testing.assert_close(plain(**batch).logits, expected)
    assert main(["merge", "-p", str(t5_run), "-o", str(tmp_path / "merged")]) == 2  # not empty: refused


def test_mixed_batch_equals_each_adapter_alone(tmp_path):
    base, tokenizer = fresh_base("bert-tiny")
    model = copy.deepcopy(base)
    for i, name in enumerate(["a", "b"]):
        peftlab.apply(model, peftlab.LoraConfig(r=4, alpha=8, targets=["query", "value"],
                                                modules_to_save=["classifier"]), adapter=name)
        randomize_lora_B(model, seed=i)
    model.eval()
    batch = tokenizer(["one", "two words", "three small words", "four"], padding=True, return_tensors="pt")
    names = ["a", "b", BASE_NAME, "b"]
    with torch.no_grad(), per_example_adapters(model, names):
        mixed = model(**batch).logits
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            peftlab.set_active(model, name)
            alone[name] = model(**batch).logits
        alone[BASE_NAME] = base(**batch).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=0)
    assert not torch.allclose(alone["a"], alone["b"])
    # adapters come and go without reloading the base
    peftlab.remove_adapter(model, "a")
    with pytest.raises(peftlab.PeftlabError, match="unknown adapter"):
        with per_example_adapters(model, ["a"]):
            pass
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, alone["b"], atol=1e-6, rtol=0)


def test_eval_bad_input(t5_run, tmp_path, capsys):
    assert main(["eval", "-p", str(tmp_path)]) == 2
    assert "no adapter in" in capsys.readouterr().err
    for command in ("eval", "generate"):
        for flag in ("--max-new-tokens", "--batch-size", "--num-beams", *(["--limit"] if command == "eval" else [])):
            with pytest.raises(SystemExit) as exit_:  # refused by argparse, before any model loads
                main([command, "-p", str(t5_run), flag, "0", *(["text"] if command == "generate" else [])])
            assert exit_.value.code == 2
            assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(peftlab.PeftlabError, match="--max-new-tokens must be positive"):  # the Python API
        generate(None, None, ["x"], "seq2seq", max_new_tokens=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    assert main(["eval", "-p", str(t5_run), "--data", str(bad)]) == 2
    assert "lacks column(s)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["generate", "-p", str(t5_run), "--file", str(empty)]) == 2
    assert "peftlab: error:" in capsys.readouterr().err
    assert main(["eval", "-p", str(t5_run), "--model", "random:bart-tiny"]) == 2  # adapter for another base
    err = capsys.readouterr().err
    assert "the adapter was trained on random:t5-tiny, this base is random:bart-tiny: " in err
    assert "match no module" in err
    assert main(["eval", "-p", str(t5_run), "--model", "random:flan-t5-small"]) == 2  # same names, other shapes
    err = capsys.readouterr().err
    assert "the adapter was trained on random:t5-tiny, this base is random:flan-t5-small: " in err
    assert "does not fit the base" in err


def test_causal_generation_left_pads_and_equals_peft(tmp_path):
    result = run(tmp_path, "gpt", {"model.name": "random:gpt2-tiny", "run.max_steps": 30, **TASKS["gpt2-tiny"]})
    loaded = peftlab.eval.runs.load_run(result.output)
    assert loaded.task == "causal"
    prompts = ["Q: alpha bravo charlie A:", "Q: golf A:"]  # different lengths: padding must go on the left
    ours = generate(loaded.model, loaded.tokenizer, prompts, "causal", batch_size=2, max_new_tokens=5)
    base, tokenizer = fresh_base("gpt2-tiny")
    theirs = peft.PeftModel.from_pretrained(base, result.output).eval()
    one_by_one = []
    for prompt in prompts:  # unpadded, one at a time: the reference
        batch = tokenizer([prompt], return_tensors="pt")
        out = theirs.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        one_by_one.append(tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert ours == one_by_one


def test_cli_generate_with_named_adapters_and_mixed_file(t5_run, tmp_path, capsys):
    other = run(tmp_path, "other", {"model.name": "random:t5-tiny", "run.max_steps": 5, "run.seed": 3,
                                    **TASKS["t5-tiny"]}).output
    texts = ["alpha bravo charlie", "golf hotel"]
    outputs = {}
    for use in ("default", "other", BASE_NAME):
        assert main(["generate", "-p", str(t5_run), "--adapter", f"other={other}", "--use", use,
                     "--max-new-tokens", "4", *texts]) == 0
        outputs[use] = capsys.readouterr().out.splitlines()[-2:]
    assert outputs["default"] != outputs[BASE_NAME]  # the adapters really change what is generated
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"input": t, "adapter": a}) + "\n"
                             for t, a in zip(texts * 3, ["default"] * 2 + ["other"] * 2 + [BASE_NAME] * 2,
                                             strict=True)))
    assert main(["generate", "-p", str(t5_run), "--adapter", f"other={other}", "--file", str(mixed),
                 "--max-new-tokens", "4", "--batch-size", "6"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["output"] for r in rows] == outputs["default"] + outputs["other"] + outputs[BASE_NAME]


def test_causal_generation_cuts_a_long_prompt_from_the_left():
    model, tokenizer = peftlab.load_model("random:llama-tiny")
    prompt = "a prompt far longer than the source limit. Answer:"  # byte tokens: one per character
    cut = generate(model, tokenizer, [prompt], "causal", max_new_tokens=4, max_source_length=9)
    assert cut == generate(model, tokenizer, [prompt[-8:]], "causal", max_new_tokens=4)  # BOS + the last 8
    assert cut != generate(model, tokenizer, [prompt[:8]], "causal", max_new_tokens=4)
    assert tokenizer.truncation_side == "right"


def pair_rows(n=40):
    """Does the hypothesis name the premise's first word? A text-pair task (as RTE's sentence1, sentence2)."""
    rows = []
    for i in range(n):
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(4)]
        named = words[0] if i % 2 else WORDS[(i * 3 + 5) % len(WORDS)]
        rows.append({"premise": " ".join(words), "hypothesis": named, "label": "yes" if i % 2 else "no"})
    return rows


def test_text_pair_classification_trains_evaluates_and_loads_in_peft_on_the_tokenizers_pairs(tmp_path):
    result = run(tmp_path, "pair", {"model.name": "random:bert-tiny", "run.max_steps": 10,
                                    "data.input_column": "premise", "data.pair_column": "hypothesis"},
                 rows=pair_rows())
    assert main(["eval", "-p", str(result.output)]) == 0
    metrics = json.loads((result.output / "eval" / "metrics.json").read_text())["adapter"]
    assert metrics["loss"] == pytest.approx(result.eval_after["eval_loss"], rel=1e-6)
    records = [json.loads(line) for line in (result.output / "eval" / "predictions.jsonl").read_text().splitlines()]
    base, tokenizer = fresh_base("bert-tiny")
    theirs = peft.PeftModel.from_pretrained(base, result.output).eval()
    batch = tokenizer([r["input"] for r in records], [r["input_pair"] for r in records], padding=True,
                      return_tensors="pt")
    assert batch["token_type_ids"].any()  # the second texts are segment 1, as BERT was trained on pairs
    labels = torch.tensor([["no", "yes"].index(r["reference"]) for r in records])
    with torch.no_grad():
        logits = theirs(**batch).logits
    assert len(records) <= 8  # one eval batch: its loss is the mean over these examples
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert [["no", "yes"][i] for i in logits.argmax(-1).tolist()] == [r["prediction"] for r in records]


def test_pair_column_is_refused_outside_classification_and_named_when_missing(tmp_path):
    with pytest.raises(peftlab.PeftlabError, match="data.pair_column is for classification of text pairs, this "
                                                   "task is seq2seq: name both columns in --template instead"):
        run(tmp_path, "s", {"model.name": "random:t5-tiny", "data.pair_column": "summary", "run.max_steps": 1,
                            **TASKS["t5-tiny"]})
    with pytest.raises(peftlab.PeftlabError, match=r"lacks column\(s\) \['hypothesis'\]"):
        run(tmp_path, "c", {"model.name": "random:bert-tiny", "data.pair_column": "hypothesis", "run.max_steps": 1},
            rows=synth("sentiment", 20, seed=0))


def test_generate_file_rows_are_filled_into_the_runs_template(tmp_path, capsys):
    output = run(tmp_path, "gpt", {"model.name": "random:gpt2-tiny", "run.max_steps": 5, **TASKS["gpt2-tiny"]}).output
    capsys.readouterr()  # the training log
    rows = tmp_path / "rows.jsonl"  # Alpaca-like: the row has an "input" column that the template does not use
    rows.write_text("".join(json.dumps({"dialogue": d, "input": "unused"}) + "\n" for d in ("alpha bravo", "golf")))
    assert main(["generate", "-p", str(output), "--file", str(rows), "--max-new-tokens", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["input"] for r in records] == ["Q: alpha bravo A:", "Q: golf A:"]
    assert main(["generate", "-p", str(output), "--max-new-tokens", "3", "Q: alpha bravo A:", "Q: golf A:"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [r["output"] for r in records]  # command-line texts as given
    rows.write_text(json.dumps({"other": "x"}) + "\n")
    assert main(["generate", "-p", str(output), "--file", str(rows)]) == 2
    assert "needs the run's template fields ['dialogue'] or an 'input' or 'text' field; it has ['other']" \
        in capsys.readouterr().err


def test_a_causal_lm_trained_on_text_alone_is_scored_by_loss(tmp_path, capsys):
    from peftlab.data.synth import write_jsonl
    data = write_jsonl([{"text": " ".join(r.values())} for r in seq_rows()], tmp_path / "text.jsonl")
    output = tmp_path / "lm"
    assert main(["train", "--model", "random:gpt2-tiny", "--data", str(data), "--target-column", "",
                 "--max-steps", "4", "--output", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert main(["eval", "-p", str(output), "--compare-base"]) == 0
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert set(metrics["adapter"]) == {"loss", "perplexity"}
    assert metrics["adapter"]["loss"] == pytest.approx(results["eval_after"]["eval_loss"], rel=1e-6)
    assert metrics["base"]["loss"] == pytest.approx(results["eval_before"]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "t5-tiny"])
def test_eval_loss_is_the_mean_over_all_labelled_tokens_however_batched(preset):
    from peftlab.data.batching import collate
    from peftlab.data.tasks import Formatter
    from peftlab.eval.scoring import score
    model, tokenizer = fresh_base(preset)
    task = "causal" if preset == "gpt2-tiny" else "seq2seq"
    formatter = Formatter(task, tokenizer, "dialogue", "summary")
    examples = [formatter({"dialogue": r["dialogue"][: 3 + 4 * i], "summary": r["summary"] * (1 + i % 3)})
                for i, r in enumerate(seq_rows(7))]  # lengths differ, so batch means differ
    by = {size: score(model, [collate(examples[s:s + size], tokenizer.pad_token_id)
                              for s in range(0, len(examples), size)], torch.device("cpu"))["eval_loss"]
          for size in (1, 3, 7)}
    token_losses = []
    with torch.no_grad():
        for e in examples:
            batch = collate([e], tokenizer.pad_token_id)
            logits, labels = model(**batch).logits, batch["labels"]
            if task == "causal":
                logits, labels = logits[:, :-1], labels[:, 1:]
            token_losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                                  reduction="none")[labels.flatten() != -100])
    expected = torch.cat(token_losses).mean().item()
    assert by[1] == pytest.approx(expected, rel=1e-5)
    assert by[3] == pytest.approx(expected, rel=1e-5) and by[7] == pytest.approx(expected, rel=1e-5)


def test_cli_generate_cuts_prompts_where_the_run_was_trained_to(tmp_path, capsys):
    output = run(tmp_path, "short", {"model.name": "random:llama-tiny", "run.max_steps": 2,
                                     "data.max_source_length": 12, **TASKS["llama-tiny"]}).output
    prompt = "Q: a prompt longer than twelve byte tokens A:"

    def generated(*args):
        capsys.readouterr()
        assert main(["generate", "-p", str(output), "--max-new-tokens", "4", *args]) == 0
        return capsys.readouterr().out.splitlines()[-1]
    assert generated(prompt) == generated(prompt[-11:])  # BOS and the last 11 characters
    assert generated(prompt, "--max-source-length", "64") != generated(prompt[-11:])
