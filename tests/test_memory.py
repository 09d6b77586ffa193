"""Memory: measured parts sum to the total; the prediction's parts are the model's own sizes; saved
activations are counted as autograd keeps them."""

import json

import pytest
import torch
from conftest import example_batch
from safetensors.torch import save_model
from test_train import run
from torch import nn

import peftlab
from peftlab.accel.lean import make_lean
from peftlab.accel.loss import lm_loss, training_loss
from peftlab.cli import main
from peftlab.measure import estimate
from peftlab.measure.estimate import saved_for_backward, saved_step_bytes, trainable_bytes, weight_bytes
from peftlab.measure.inspect import checkpoint_bytes, estimate_memory
from peftlab.methods import LoraConfig


def test_saved_activations_counted_once_and_without_weights():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    saved, largest = saved_for_backward(model, {"x": x}, lambda m, b: m(b["x"]).sum())
    # first Linear keeps x (3x4 fp32); ReLU keeps its output, which the second Linear keeps too (3x8)
    assert (saved, largest) == (3 * 4 * 4 + 3 * 8 * 4, 3 * 8 * 4)


def test_measured_parts_sum_to_total_and_match_the_tensors(tmp_path):
    result = run(tmp_path, "mem", {"model.name": "random:t5-tiny", "data.input_column": "dialogue",
                                   "data.target_column": "summary", "run.max_steps": 3})
    memory = json.loads((result.output / "results.json").read_text())["memory_mb"]
    parts = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"]
    assert parts == pytest.approx(memory["total"], abs=0.21)  # each part rounded to 0.1 MB
    model = peftlab.load_adapter(peftlab.load_model("random:t5-tiny", seed=0)[0], result.output)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    assert memory["gradients"] == round(lora / 2**20, 1)
    assert memory["optimizer"] == round(2 * lora / 2**20, 1)  # AdamW: two fp32 moments per trainable value
    assert memory["weights"] == round(weight_bytes(model) / 2**20, 1)


def test_estimate_parts_and_scaling():
    config = LoraConfig(r=8, alpha=16, targets=["q", "v"])
    _, parts = estimate_memory("random:t5-tiny", config, batch_size=8, source_len=32, target_len=16)
    model = peftlab.apply(peftlab.load_model("random:t5-tiny")[0], config)
    assert parts.weights == weight_bytes(model)
    assert parts.gradients == trainable_bytes(model) and parts.optimizer == 2 * parts.gradients
    assert parts.activations > 0
    _, full = estimate_memory("random:t5-tiny", None, batch_size=8, source_len=32, target_len=16)
    base = peftlab.load_model("random:t5-tiny")[0].requires_grad_(True)
    assert full.gradients == trainable_bytes(base) and full.optimizer == 2 * full.gradients
    # the fallback's saved-activation part is linear in the batch
    example = {k: v[:1] for k, v in example_batch(model, peftlab.load_model("random:t5-tiny")[1]).items()}
    model.train()
    small, large = (saved_step_bytes(model, example, b, lm_loss, None) - parts.gradients for b in (4, 8))
    assert large == 2 * small


def test_inspect_estimate_and_checkpoint_size(tmp_path, capsys, monkeypatch):
    assert main(["inspect", "--model", "random:t5-tiny", "--estimate-memory", "--batch-size", "4",
                 "--method", "lora", "--targets", "q,v"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    values = [float(part.split()[-2].replace(",", "")) for part in line.split("|")]
    assert values[-1] == pytest.approx(sum(values[:-1]), abs=0.3)
    # what backward keeps, counted (a measured RSS probe moves by more than a tiny model's q, k, v)
    monkeypatch.setattr(estimate, "CLEAR_REFS", str(tmp_path / "no-proc"))
    lines = []
    for flags in ([], ["--recompute-linear"]):
        assert main(["inspect", "--model", "random:t5-tiny", "--estimate-memory", "--batch-size", "4",
                     "--method", "lora", "--targets", "q,v", *flags]) == 0
        lines.append(capsys.readouterr().out.splitlines()[1])
    activations = [float(text.split("|")[3].split()[-2].replace(",", "")) for text in lines]
    assert 0 < activations[1] < activations[0]  # q, k, v, gate and up not kept
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--model", "random:t5-tiny", "--estimate-memory", "--batch-size", "0"])
    assert exit_.value.code == 2 and "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["inspect", "--model", "random:no-such", "--estimate-memory"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    model, _ = peftlab.load_model("random:t5-tiny")
    save_model(model, str(tmp_path / "model.safetensors"))
    assert checkpoint_bytes(str(tmp_path), model) == (tmp_path / "model.safetensors").stat().st_size
    assert checkpoint_bytes("random:t5-tiny", model) == (tmp_path / "model.safetensors").stat().st_size


def test_saved_activations_leave_out_what_backward_recomputes():
    model = peftlab.load_model("random:t5-tiny")[0].requires_grad_(True).train()
    make_lean(model)
    batch = {"input_ids": torch.randint(2, 500, (3, 12)), "labels": torch.randint(2, 500, (3, 6))}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    plain = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            plain[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        lm_loss(model, batch)
    saved, _ = saved_for_backward(model, batch, training_loss(model))
    assert saved == saved_for_backward(model, batch, lm_loss)[0]  # counted under recomputing() either way
    d, d_ff, source, target = model.config.d_model, model.config.d_ff, 3 * 12, 3 * 6
    # per layer the normalised x of each norm and `wo`'s input; the encoder's output, which cross-attention reads
    recomputed = 2 * (2 * source * d + source * d_ff) + 2 * (3 * target * d + target * d_ff) + source * d
    assert sum(plain.values()) - saved == 4 * recomputed
