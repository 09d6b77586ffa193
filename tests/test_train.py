"""`peftlab train`: the loop learns, logs what HF Trainer would, checkpoints and resumes exactly."""

import contextlib
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import peftlab
import peftlab.eval.runs
from peftlab.accel import boundary, lean, products
from peftlab.data.synth import generate, write_jsonl
from peftlab.train import loop
from peftlab.train.config import load_config
from peftlab.train.schedule import lr_multiplier
from peftlab.train.state import interrupted_hint

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def seq_rows(n=48):
    """A learnable mapping: the target is the first word of the source."""
    rows = []
    for i in range(n):
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(4)]
        rows.append({"dialogue": " ".join(words), "summary": words[0]})
    return rows


def run(tmp_path, name, overrides, rows=None, progress=False):
    data = write_jsonl(rows if rows is not None else seq_rows(), tmp_path / f"{name}.jsonl")
    config = load_config(None, {"data.train": str(data), "run.output": str(tmp_path / name),
                                "run.logging_steps": 5, "run.batch_size": 8, "optim.lr": 1e-2, "run.seed": 0,
                                **overrides})
    return loop.train(config, progress=progress)


TASKS = {
    "t5-tiny": {"data.input_column": "dialogue", "data.target_column": "summary"},
    "bart-tiny": {"data.template": "sum: {dialogue}", "data.target_column": "summary"},
    "gpt2-tiny": {"data.template": "Q: {dialogue} A:", "data.target_column": "summary"},
    "llama-tiny": {"data.template": "Q: {dialogue} A:", "data.target_column": "summary"},
}


def test_run_seed_seeds_the_adapter_not_a_random_presets_weights(tmp_path):
    def lora_A(seed, name):  # after one step at a negligible rate: the adapter's init
        output = run(tmp_path, name, {"model.name": "random:t5-tiny", "run.max_steps": 1, "optim.lr": 1e-12,
                                      "run.seed": seed, **TASKS["t5-tiny"]}).output
        return {k: v for k, v in load_file(output / "adapter_model.safetensors").items() if "lora_A" in k}

    first, again, other = lora_A(3, "a"), lora_A(3, "b"), lora_A(4, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.allclose(first[k], other[k], atol=1e-6) for k in first)


@pytest.mark.parametrize("preset", list(TASKS))
def test_loss_falls_and_base_is_untouched(tmp_path, preset):
    result = run(tmp_path, preset, {"model.name": f"random:{preset}", "run.max_steps": 40,
                                    "method.targets": "all-linear", **TASKS[preset]})
    first, last = result.logs[0]["loss"], result.logs[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    # the base weights in the trained model are bit-identical to a fresh copy of the base
    base, _ = peftlab.load_model(f"random:{preset}", seed=0)
    trained = peftlab.load_adapter(base, result.output)
    fresh, _ = peftlab.load_model(f"random:{preset}", seed=0)
    fresh_state = fresh.state_dict()
    for name, tensor in trained.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, fresh_state[name.replace(".base_layer.", ".")]), name


def test_classification_loss_falls_with_trained_head(tmp_path):
    rows = generate("sentiment", 96, seed=0)
    result = run(tmp_path, "cls", {"model.name": "random:bert-tiny", "run.max_steps": 30}, rows=rows)
    assert result.logs[-1]["loss"] < result.logs[0]["loss"]
    saved = load_file(result.output / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved  # the head is trained and saved, as peft's SEQ_CLS


def test_only_trainable_parameters_reach_the_optimizer():
    model, _ = peftlab.load_model("random:t5-tiny")
    peftlab.apply(model, peftlab.LoraConfig(r=2, targets=["q"]))
    config = load_config(None, {"data.train": "x.jsonl"})
    trainable, optimizer, _ = loop._optimizer(config, model, 10)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    assert len(in_optimizer) == 6 * 2  # q of 2 encoder, 2 decoder self- and 2 cross-attentions; A and B
    assert all(p.requires_grad for p in trainable)


def test_fused_adamw_takes_the_step_the_plain_loop_takes():
    model, _ = peftlab.load_model("random:t5-tiny")
    config = load_config(None, {"data.train": "x.jsonl", "optim.weight_decay": 0.01})
    reference = copy.deepcopy(model)
    trainable, optimizer, _ = loop._optimizer(config, model, 10)
    plain = torch.optim.AdamW(reference.parameters(), lr=config.optim.lr, weight_decay=0.01, foreach=False)
    assert optimizer.defaults["fused"] and not loop._optimizer(config, model, 10, sharded=True)[1].defaults["fused"]
    for step in range(3):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.full_like(p, 0.1 * (step + 1)) + torch.sin(torch.arange(p.numel()).view_as(p) * 1.0)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_logged_grad_norm_is_the_clipping_norm_and_lr_follows_schedule(tmp_path, monkeypatch):
    returned = []

    def recording(optimizer, parameters, max_norm, norms=None, scaler=None):
        expected = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        value = lean.clipped_step(optimizer, parameters, max_norm, norms, scaler)
        assert float(value) == pytest.approx(float(expected), rel=1e-6)  # what clip_grad_norm_ clips with
        returned.append(float(value))
        return value

    monkeypatch.setattr(boundary, "clipped_step", recording)
    result = run(tmp_path, "gn", {"model.name": "random:t5-tiny", "run.max_steps": 12, "run.logging_steps": 3,
                                  "optim.warmup_steps": 4, "optim.lr": 1e-3, **TASKS["t5-tiny"]})
    assert len(returned) == 12
    for record in result.logs:
        assert record["grad_norm"] == returned[record["step"] - 1]
        # the rate used by the step just taken, as in the seed's log
        assert record["learning_rate"] == pytest.approx(1e-3 * lr_multiplier(record["step"] - 1, 4, 12, "linear"))
    lines = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "grad_norm" in r]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["step_time_s"] > 0 for r in logged)
    norms = logged[0]["grad_norms"]
    assert any(k.endswith(".q.lora_A") for k in norms) and any(k.endswith(".q.lora_B") for k in norms)
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(logged[0]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("kind,reference", [("linear", get_linear_schedule_with_warmup),
                                            ("cosine", get_cosine_schedule_with_warmup)])
def test_schedule_equals_transformers(kind, reference):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = reference(optimizer, num_warmup_steps=5, num_training_steps=40)
    for step in range(40):
        assert lr_multiplier(step, 5, 40, kind) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_seed_alpha_law_on_flan_t5_small(tmp_path):
    """The seed saw first-logged grad_norm 0.61, 1.39, 2.77, 5.78 for alpha 4, 8, 16, 32 at r=8."""
    rows = [{"dialogue": f"{r['dialogue']} and so on", "summary": r["summary"]} for r in seq_rows(8)]
    first = []
    for alpha in (4, 8, 16, 32):
        result = run(tmp_path, f"a{alpha}", {"model.name": "random:flan-t5-small", "method.r": 8,
                                             "method.alpha": alpha, "method.targets": ["q", "v"],
                                             "run.max_steps": 2, "run.logging_steps": 2, "run.batch_size": 4,
                                             "run.eval_before": False, "optim.lr": 1e-4, **TASKS["t5-tiny"]},
                     rows=rows)
        first.append(result.logs[0]["grad_norm"])
    ratios = [b / a for a, b in zip(first, first[1:], strict=False)]
    assert all(1.6 <= r <= 2.4 for r in ratios), (first, ratios)


def test_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    settings = {"model.name": "random:t5-tiny", "run.max_steps": 8, "run.save_steps": 3, "method.dropout": 0.1,
                "optim.warmup_steps": 2, **TASKS["t5-tiny"]}
    straight = run(tmp_path, "straight", settings)

    real_save = loop.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", settings)
    assert f"interrupted after step 3; {tmp_path / 'resumed' / 'checkpoint-3'} is saved: run the same command " \
        "with --resume latest" in capsys.readouterr().err
    assert "no checkpoint was saved (train with --save-steps N" in interrupted_hint(tmp_path / "none", 8)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = run(tmp_path, "resumed", {**settings, "run.resume": "latest"})
    a = load_file(straight.output / "adapter_model.safetensors")
    b = load_file(resumed.output / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in resumed.logs] == [5, 8]
    assert resumed.logs[-1]["loss"] == straight.logs[-1]["loss"]
    assert sorted(p.name for p in resumed.output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    def logged(output):  # metrics.jsonl without the timings
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss"))
                for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]

    config = (resumed.output / "config.yaml").read_bytes()
    with pytest.raises(peftlab.PeftlabError, match=r"--resume: method.r 8 -> 4"):
        run(tmp_path, "resumed", {**settings, "method.r": 4, "run.resume": "latest"})
    assert (resumed.output / "config.yaml").read_bytes() == config  # the refused resume wrote nothing
    # resumed again from step 3 of a finished run: steps 4..8 are logged once, as the straight run logged them
    run(tmp_path, "resumed", {**settings, "run.resume": str(resumed.output / "checkpoint-3")})
    assert logged(resumed.output) == logged(straight.output)


def test_minilm_accuracy_clearly_above_untrained_head(tmp_path):
    train_file = write_jsonl(generate("sentiment", 800, seed=0), tmp_path / "train.jsonl")
    val_file = write_jsonl(generate("sentiment", 200, seed=1), tmp_path / "val.jsonl")
    config = load_config(None, {"model.name": "minilm", "data.train": str(train_file),
                                "data.validation": str(val_file), "method.targets": ["query", "value"],
                                "optim.lr": 2e-3, "optim.warmup_steps": 5, "run.batch_size": 32,
                                "run.max_steps": 60, "run.logging_steps": 20, "run.output": str(tmp_path / "m"),
                                "run.seed": 0})
    result = loop.train(config, progress=False)
    assert result.eval_after["eval_accuracy"] > result.eval_before["eval_accuracy"] + 0.25
    assert result.eval_after["eval_accuracy"] > 0.85


def test_full_fine_tuning_trains_every_weight_and_evaluates(tmp_path):
    result = run(tmp_path, "full", {"model.name": "random:t5-tiny", "method.name": "full", "run.max_steps": 20,
                                    "optim.lr": 1e-3, **TASKS["t5-tiny"]})
    assert result.logs[-1]["loss"] < result.logs[0]["loss"]
    assert (result.output / "model.safetensors").is_file() and not (result.output / "adapter_config.json").exists()
    loaded = peftlab.eval.runs.load_run(result.output)
    fresh, _ = peftlab.load_model("random:t5-tiny")
    changed = [n for n, p in loaded.model.named_parameters() if not torch.equal(p, fresh.get_parameter(n))]
    assert len(changed) > 0.9 * len(list(fresh.parameters()))


def test_grad_accum_equals_a_bigger_batch(tmp_path):
    rows = generate("sentiment", 64, seed=0)
    common = {"model.name": "random:bert-tiny", "run.max_steps": 4, "method.dropout": 0.0,
              "model.overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "data.group_by_length": False, "optim.lr": 1e-3, "run.logging_steps": 1}
    big = run(tmp_path, "big", {**common, "run.batch_size": 8}, rows=rows)
    small = run(tmp_path, "small", {**common, "run.batch_size": 4, "run.grad_accum": 2}, rows=rows)
    for a, b in zip(big.logs, small.logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_redraw_masks_trains_bit_for_bit_as_without(tmp_path, monkeypatch):
    """`run.redraw_masks` reaches the loss: with rows long enough for numpy-drawn masks (T5's and LoRA's
    dropout on), backward draws masks again, and the logged losses, gradient norms and the adapter are the
    same bit for bit."""
    rows = [{"dialogue": " ".join(WORDS[(i + k) % 8] for k in range(24)), "summary": WORDS[i % 8] * 20}
            for i in range(24)]
    common = {"model.name": "random:t5-tiny", "run.max_steps": 3, "method.dropout": 0.1, "run.logging_steps": 1,
              "data.max_source_length": 160, **TASKS["t5-tiny"]}
    draws = []

    def counted(*args, draw=lean.seeded_keep_mask):
        draws.append(1)
        return draw(*args)

    monkeypatch.setattr(lean, "seeded_keep_mask", counted)
    kept = run(tmp_path, "kept", common, rows=rows)
    drawn_when_kept, draws[:] = len(draws), []
    redrawn = run(tmp_path, "redrawn", {**common, "run.redraw_masks": True}, rows=rows)
    assert drawn_when_kept > 0 and len(draws) > drawn_when_kept
    assert [(r["loss"], r["grad_norm"]) for r in redrawn.logs] == [(r["loss"], r["grad_norm"]) for r in kept.logs]
    ours, theirs = (load_file(r.output / "adapter_model.safetensors") for r in (redrawn, kept))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_recompute_linear_trains_bit_for_bit_as_without(tmp_path, capsys):
    """`run.recompute_linear` reaches the model (its linear layers switched) and the loss: LoRA with dropout
    on trains to the same logged losses, gradient norms and adapter, bit for bit."""
    common = {"model.name": "random:t5-tiny", "run.max_steps": 3, "method.dropout": 0.1, "run.logging_steps": 1,
              **TASKS["t5-tiny"]}
    kept = run(tmp_path, "kept", common)
    assert "linear (recomputed in backward)" not in capsys.readouterr().out
    recomputed = run(tmp_path, "recomputed", {**common, "run.recompute_linear": True})
    assert "linear (recomputed in backward) x" in capsys.readouterr().out
    assert [(r["loss"], r["grad_norm"]) for r in recomputed.logs] == [(r["loss"], r["grad_norm"]) for r in kept.logs]
    ours, theirs = (load_file(r.output / "adapter_model.safetensors") for r in (recomputed, kept))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.skipif(not products.onednn_available(), reason="needs an x86 CPU and torch with oneDNN")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_linear_backend_reaches_the_model_and_keeps_the_math(tmp_path, capsys, method):
    """`run.linear_backend=onednn` switches the linear layers and their products (the line says so), and trains
    to torch's logged losses and gradient norms, with the products' sums in another order."""
    common = {"model.name": "random:t5-tiny", "method.name": method, "run.max_steps": 3, "run.logging_steps": 1,
              "model.overrides": {"dropout_rate": 0.0}, "optim.lr": 1e-3, **TASKS["t5-tiny"],
              **({"method.dropout": 0.0} if method == "lora" else {})}  # full fine-tuning has no LoRA dropout
    by_torch = run(tmp_path, "torch", {**common, "run.linear_backend": "torch"})
    printed = capsys.readouterr().out
    assert "Linear products: torch (run.linear_backend=torch)" in printed and "oneDNN products" not in printed
    by_onednn = run(tmp_path, "onednn", {**common, "run.linear_backend": "onednn"})
    printed = capsys.readouterr().out
    assert "Linear products: oneDNN (run.linear_backend=onednn)" in printed and "linear (oneDNN products) x" in printed
    for ours, theirs in zip(by_onednn.logs, by_torch.logs, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_sparse_embedding_gradients_train_as_dense_ones(tmp_path, monkeypatch):
    """Full fine-tuning with sparse embedding gradients (accumulated over 2 micro-batches, made dense before
    clipping and AdamW) logs the losses and gradient norms of dense ones and ends at the same weights."""
    common = {"model.name": "random:t5-tiny", "method.name": "full", "run.max_steps": 4, "run.grad_accum": 2,
              "run.batch_size": 4, "run.logging_steps": 1, "model.overrides": {"dropout_rate": 0.0},
              "optim.lr": 1e-3, **TASKS["t5-tiny"]}
    switched, switch = [], boundary.sparse_embedding_gradients

    @contextlib.contextmanager
    def spied(model, enabled=True):
        with switch(model, enabled) as tables:
            switched.append(len(tables))
            yield tables

    monkeypatch.setattr(boundary, "sparse_embedding_gradients", spied)
    monkeypatch.setattr(lean, "SPARSE_GRADIENT_MIN_ROWS", 64)  # t5-tiny's 512-row table
    sparse = run(tmp_path, "sparse", common)
    switched_sparse, switched[:] = switched[:], []
    monkeypatch.setattr(lean, "SPARSE_GRADIENT_MIN_ROWS", 10**9)
    dense = run(tmp_path, "dense", common)
    assert switched_sparse == [3] * 4 and switched == [0] * 4  # shared, encoder's and decoder's: one table
    for a, b in zip(sparse.logs, dense.logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ours, theirs = (load_file(r.output / "model.safetensors") for r in (sparse, dense))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)


def test_switches_keep_the_math(tmp_path):
    """Gradient checkpointing and the chunked loss change nothing; bf16 autocast stays close; epochs set the
    step count."""
    rows = seq_rows()
    common = {"model.name": "random:t5-tiny", "run.max_steps": 6, "method.dropout": 0.0, "run.logging_steps": 1,
              **TASKS["t5-tiny"]}
    plain = run(tmp_path, "plain", common, rows=rows)
    checkpointed = run(tmp_path, "gc", {**common, "run.gradient_checkpointing": True}, rows=rows)
    # T5 dropout (0.1) draws the same masks (checkpointing replays the RNG state); recomputation reorders float ops
    assert [r["loss"] for r in checkpointed.logs] == pytest.approx([r["loss"] for r in plain.logs], rel=1e-3)
    unchunked = run(tmp_path, "unchunked", {**common, "run.chunked_loss": False}, rows=rows)
    assert [r["loss"] for r in unchunked.logs] == pytest.approx([r["loss"] for r in plain.logs], rel=1e-3)
    assert [r["grad_norm"] for r in unchunked.logs] == pytest.approx([r["grad_norm"] for r in plain.logs], rel=1e-3)
    bf16 = run(tmp_path, "bf16", {**common, "run.precision": "bf16"}, rows=rows)
    assert [r["loss"] for r in bf16.logs] == pytest.approx([r["loss"] for r in plain.logs], rel=0.05)
    epochs = run(tmp_path, "ep", {**common, "run.max_steps": None, "run.epochs": 2, "run.eval_steps": 5},
                 rows=rows)
    assert epochs.steps == 2 * math.ceil(43 / 8)  # 43 training rows after the 10% hold-out, batch 8
    lines = [json.loads(x) for x in (epochs.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r and not r.get("final")] == [5, 10]


def test_fp16_with_its_loss_scaler_trains_as_fp32_does(tmp_path, capsys):
    """CPU autocast runs fp16 here: the losses stay within fp16's tolerance of fp32's (a model whose gradients
    do not overflow at the scaler's first scale, so that no step is skipped)."""
    rows = seq_rows()
    common = {"model.name": "random:llama-tiny", "run.max_steps": 6, "run.logging_steps": 1, **TASKS["llama-tiny"]}
    plain = run(tmp_path, "plain", common, rows=rows)
    fp16 = run(tmp_path, "fp16", {**common, "run.precision": "fp16"}, rows=rows)
    assert "warning: fp16 on a CPU" in capsys.readouterr().out  # it runs, but says what it costs there
    assert [r["loss"] for r in fp16.logs] == pytest.approx([r["loss"] for r in plain.logs], rel=0.02)
    assert [r["grad_norm"] for r in fp16.logs] == pytest.approx([r["grad_norm"] for r in plain.logs], rel=0.05)


@pytest.mark.parametrize("fused", [True, False])
def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_the_scale_lowered(fused):
    """The loss scaler through peftlab's clip-and-step: the true (unscaled) norm is clipped and logged, a step
    with an infinite gradient changes nothing, and the next finite one steps."""
    from types import SimpleNamespace

    from peftlab import accel

    model = torch.nn.Linear(4, 3)
    run_section = SimpleNamespace(precision="fp16", lean_kernels=False, chunked_loss=False, recompute_linear=False,
                                  redraw_masks=False, linear_backend="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    params = list(model.parameters())
    with accel.prepare(model, torch.device("cpu"), run_section, "classification") as fast:
        scale = fast.scaler.get_scale()
        with fast.autocast():
            loss = model(torch.ones(2, 4)).float().mean()
        fast.backward(loss)
        assert params[1].grad.tolist() == pytest.approx([scale / 3] * 3, rel=1e-3)  # scaled (in fp16)
        params[0].grad[0, 0] = math.inf  # as backward leaves an overflow
        norms = fast.gradient_norms(optimizer, params)
        assert params[1].grad.tolist() == pytest.approx([1 / 3] * 3, rel=1e-3)  # unscaled before the norms
        before = [p.detach().clone() for p in params]
        assert fast.step(optimizer, params, 1.0, norms) == math.inf
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        assert fast.scaler.get_scale() == scale / 2
        fast.backward(model(torch.ones(2, 4)).mean())
        fast.step(optimizer, params, 1.0, fast.gradient_norms(optimizer, params))
        assert not torch.equal(params[1], before[1])


def test_long_causal_prompt_keeps_its_end_and_bos_plain_text_keeps_its_start():
    from peftlab.data.tasks import IGNORE_INDEX, Formatter
    _, tokenizer = peftlab.load_model("random:llama-tiny")
    bos, cue = tokenizer.bos_token_id, "\n### Response:"
    formatter = Formatter("causal", tokenizer, "text", "answer", "{text}" + cue, max_source_length=20,
                          max_target_length=8)
    row = {"text": "a long instruction that does not fit", "answer": "yes"}
    example = formatter(row)
    prompt = example["input_ids"][:20]  # byte tokens: BOS and the last 19 characters
    assert prompt[0] == bos and tokenizer.decode(prompt[1:]) == "t fit" + cue and formatter.truncated == 1
    assert example["labels"] == [IGNORE_INDEX] * 20 + tokenizer("yes", add_special_tokens=False)["input_ids"] \
        + [tokenizer.eos_token_id]
    plain = Formatter("causal", tokenizer, "text", None, max_source_length=8)(row)["input_ids"]
    assert plain[0] == bos and tokenizer.decode(plain[1:]) == "a long "
    assert tokenizer.truncation_side == "right"  # the shared tokenizer is left as it was


def test_a_text_past_the_models_maximum_is_counted_not_warned_by_transformers():
    import logging

    from peftlab.data.tasks import Formatter
    _, tokenizer = peftlab.load_model("random:llama-tiny")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        formatter = Formatter("causal", tokenizer, "text", None, max_source_length=16)
        ids = formatter({"text": "x" * (tokenizer.model_max_length + 10)})["input_ids"]
    finally:
        logger.removeHandler(handler)
    assert len(ids) == 16 and formatter.truncated == 1
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]


def test_text_pair_encoding_and_truncation_equal_the_tokenizers_own():
    from peftlab.data.batching import collate
    from peftlab.data.tasks import Formatter
    _, tokenizer = peftlab.load_model("minilm")  # the real BERT WordPiece tokenizer
    formatter = Formatter("classification", tokenizer, "premise", "label", labels=["no", "yes"],
                          pair_column="hypothesis", max_source_length=12)
    rows = [{"premise": "the cat sat on the mat all day long", "hypothesis": "a cat sat", "label": "yes"},
            {"premise": "short", "hypothesis": "text", "label": "no"}]
    encoded = [formatter(r) for r in rows]
    for row, example in zip(rows, encoded, strict=True):
        expected = tokenizer(row["premise"], row["hypothesis"], truncation=True, max_length=12)
        assert example["input_ids"] == expected["input_ids"]
        assert example["token_type_ids"] == expected["token_type_ids"]
    assert formatter.truncated == 1
    batch = collate(encoded, tokenizer.pad_token_id)
    expected = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True,
                         max_length=12, padding=True, return_tensors="pt")
    assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))


def test_tsv_fields_keep_their_quotes_as_glue_files_mean_them(tmp_path):
    from peftlab.data.loading import load_table
    texts = ['"Yes," she said, "it is."', 'a "quoted" word', '"', "plain"]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    table = load_table(str(tmp_path / "d.tsv"))
    assert table["sentence"] == texts and [str(x) for x in table["label"]] == ["0", "1", "0", "1"]


def test_validation_shows_its_own_bar_beside_trainings_and_removes_it(tmp_path, monkeypatch):
    from peftlab.train.monitor import ProgressReporter
    seen = []  # (description, completed, total) of every bar each time validation scores a batch
    real_score = loop.score

    def watching_score(model, batches, device, on_batch=None):
        def advance():
            on_batch()
            seen.append([(t.description, t.completed, t.total) for t in bars[-1].progress.tasks])
        return real_score(model, batches, device, on_batch=advance)

    bars: list[ProgressReporter] = []
    monkeypatch.setattr(loop, "score", watching_score)
    from peftlab.train import callbacks
    monkeypatch.setattr(callbacks, "ProgressReporter",
                        lambda *a, **k: bars.append(ProgressReporter(*a, **k)) or bars[-1])
    result = run(tmp_path, "bar", {"model.name": "random:t5-tiny", "run.max_steps": 4, "run.eval_steps": 2,
                                   **TASKS["t5-tiny"]}, progress=True)
    batches = math.ceil(5 / 8)  # 48 rows, 10% held out, batch 8
    # before training, at step 2 and after step 4: a validation bar that counts its batches
    assert [s[-1] for s in seen] == [("validation", batches, batches)] * 3
    assert [s[0][:2] for s in seen] == [("training", 0), ("training", 2), ("training", 4)]
    assert [t.description for t in bars[0].progress.tasks] == ["training"] and result.eval_after


def test_packing_joins_whole_texts_with_eos_into_full_blocks(tmp_path):
    from peftlab.data.tasks import Formatter
    from peftlab.eval.evaluate import EvalOptions, evaluate
    _, tokenizer = peftlab.load_model("random:llama-tiny")
    texts = [" ".join(r.values()) * (1 + i % 3) for i, r in enumerate(seq_rows(12))]
    formatter = Formatter("causal", tokenizer, "text", None, max_source_length=16, pack=True)
    blocks = formatter.encode_all({"text": t} for t in texts)
    stream = [i for t in texts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]]
    assert [i for b in blocks for i in b["input_ids"]] == stream  # nothing cut, nothing dropped
    assert {len(b["input_ids"]) for b in blocks[:-1]} == {16} and 0 < len(blocks[-1]["input_ids"]) <= 16
    assert all(b["labels"] == b["input_ids"] for b in blocks) and formatter.truncated == 0
    with pytest.raises(peftlab.PeftlabError, match="data.pack joins the texts of a causal LM trained on text alone"):
        Formatter("causal", tokenizer, "text", "answer", pack=True)
    result = run(tmp_path, "packed", {"model.name": "random:llama-tiny", "data.input_column": "dialogue",
                                      "data.target_column": None, "data.pack": True, "data.max_source_length": 32,
                                      "run.max_steps": 3})
    loaded = peftlab.eval.runs.load_run(result.output)
    metrics = evaluate(loaded, result.output, EvalOptions(output=str(tmp_path / "ev"), batch_size=64), show=False)
    assert metrics["adapter"]["loss"] == pytest.approx(result.eval_after["eval_loss"], rel=1e-6)


def test_column_names_name_a_headerless_tsv_and_are_refused_for_jsonl(tmp_path):
    from peftlab.data.loading import load_table
    rows = [(f"text {i}", "pos" if i % 2 else "neg") for i in range(6)]
    (tmp_path / "d.tsv").write_text("".join(f"{t}\t{label}\n" for t, label in rows))
    table = load_table(str(tmp_path / "d.tsv"), column_names=["text", "label"])
    assert list(zip(table["text"], table["label"], strict=True)) == rows  # the first row is data, not a header
    result = run(tmp_path, "cls", {"model.name": "random:bert-tiny", "run.max_steps": 1, "data.train":
                                   str(tmp_path / "d.tsv"), "data.column_names": "text,label"})
    assert load_config(result.output / "config.yaml").data.column_names == ["text", "label"]
    write_jsonl([{"text": "x", "label": "pos"}], tmp_path / "d.jsonl")
    with pytest.raises(peftlab.PeftlabError, match="d.jsonl is jsonl, whose rows name their own: drop column_names"):
        load_table(str(tmp_path / "d.jsonl"), column_names=["text", "label"])
