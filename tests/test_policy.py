"""The device policy: CPU-measured switches stay off on CUDA and MPS, and the training loop reads the table."""

from __future__ import annotations

import pytest
import torch

from peftlab.accel import policy
from peftlab.train.config import RunSection
from peftlab.train.trainer import Trainer

ROWS = [{"dialogue": f"w{i % 5} a b c", "summary": f"w{i % 5}"} for i in range(24)]


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_on_gpus_the_model_runs_as_transformers_ships_it(device):
    on = policy.switches(RunSection(linear_backend="onednn"), torch.device(device))
    assert on == policy.Switches(False, False, False, False, False)
    assert on.off_here(RunSection()) == ["lean_kernels", "chunked_loss"]


def test_on_cpu_the_switches_follow_the_run_settings():
    on = policy.switches(RunSection(), torch.device("cpu"))
    assert on.lean_kernels and on.chunked_loss and on.recompute and on.sparse_embeddings
    off = policy.switches(RunSection(lean_kernels=False, chunked_loss=False), torch.device("cpu"))
    assert not (off.lean_kernels or off.chunked_loss or off.sparse_embeddings or off.onednn)
    assert not policy.switches(RunSection(), torch.device("cpu"), distributed=True).sparse_embeddings
    assert not policy.switches(RunSection(), torch.device("cpu"), fsdp=True).chunked_loss


def run(tmp_path, name, **settings):
    config = {"model": {"name": "random:t5-tiny", "overrides": {"dropout_rate": 0.0}}, "method": {"dropout": 0.0},
              "data": {"input_column": "dialogue", "target_column": "summary"},
              "run": {"max_steps": 3, "logging_steps": 1, "eval_metrics": False, "output": str(tmp_path / name),
                      **settings}}
    return Trainer(train_data=ROWS, config=config).train()


def test_the_loop_reads_the_table(tmp_path, monkeypatch, capsys):
    from peftlab.accel import lean

    monkeypatch.setattr(policy, "MEASURED", {})  # as on a device nothing was measured on
    result = run(tmp_path, "unmeasured")
    assert "Off on cpu (measured on CPU only, peftlab/accel/policy.py): lean_kernels, chunked_loss" in \
        capsys.readouterr().out
    lean_classes = {obj for obj in vars(lean).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
                    and obj.__module__ == lean.__name__}
    assert lean_classes  # the check can see a lean module
    assert not any(type(m) in lean_classes for m in result.model.modules())  # the stock modules
    monkeypatch.undo()
    measured = run(tmp_path, "measured")  # on CPU, as measured: the lean modules are swapped in
    assert any(type(m) in lean_classes for m in measured.model.modules())
    plain = run(tmp_path, "plain", lean_kernels=False, chunked_loss=False)
    assert [r["loss"] for r in result.logs] == pytest.approx([r["loss"] for r in plain.logs], rel=1e-6)
