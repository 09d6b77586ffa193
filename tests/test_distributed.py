"""Two processes on gloo (CPU) train exactly what one process trains with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.train import distributed, loop
from peftlab.train.config import load_config

# 45 training rows at batch 8: the last micro-batch of the epoch has 5 rows, split 3 + 2
SETTINGS = {"model.name": "random:t5-tiny", "model.overrides": {"dropout_rate": 0.0}, "method.dropout": 0.0,
            "data.input_column": "dialogue", "data.target_column": "summary", "run.batch_size": 8,
            "run.grad_accum": 2, "run.max_steps": 6, "run.logging_steps": 1, "run.eval_before": False,
            "optim.lr": 1e-2, "optim.scheduler": "constant", "run.seed": 0}


def config_yaml(tmp_path, data, name="config", **extra) -> str:
    path = tmp_path / f"{name}.yaml"
    sections: dict = {}
    for key, value in {**SETTINGS, "data.train": str(data), **extra}.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = value
    path.write_text(json.dumps(sections))  # JSON is YAML
    return str(path)


def torchrun(config: str, output, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "peftlab", "train", "--config", config, "--output", str(output),
               "--nproc", "2", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def single(tmp_path, data, name, **extra):
    config = load_config(config_yaml(tmp_path, data, **extra), {"run.output": str(tmp_path / name)})
    return loop.train(config, progress=False)


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_run(a, b) -> None:
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seq_data):
    tmp = tmp_path_factory.mktemp("single")
    return single(tmp, seq_data, "single").output


def test_ddp_equals_single_process(tmp_path, seq_data, reference):
    done = torchrun(config_yaml(tmp_path, seq_data, **{"run.save_steps": 3}), tmp_path / "ddp")
    assert_same_run(tmp_path / "ddp", reference)
    # one writer: one record per step, one "saved to" line, no stray temporary directories
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]
    assert done.stdout.count("saved to") == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith((".", "checkpoint"))) == \
        ["checkpoint-3", "checkpoint-6"]
    # a checkpoint saved under DDP loads in a single process and in peft, with the same outputs
    peft = pytest.importorskip("peft")
    checkpoint = tmp_path / "ddp" / "checkpoint-3"
    ours = peftlab.load_adapter(peftlab.load_model("random:t5-tiny", seed=0)[0], checkpoint).eval()
    theirs = peft.PeftModel.from_pretrained(peftlab.load_model("random:t5-tiny", seed=0)[0], str(checkpoint)).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 8, 9]])}
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
    # ... and resuming it at another world size is refused in one line
    with pytest.raises(PeftlabError, match="saved by 2 process.*--nproc 2"):
        single(tmp_path, seq_data, "ddp", **{"run.resume": "latest"})


def test_ddp_resume_equals_uninterrupted(tmp_path, seq_data, reference):
    config = config_yaml(tmp_path, seq_data, **{"run.save_steps": 3})
    torchrun(config_yaml(tmp_path, seq_data, "first", **{"run.save_steps": 3, "run.max_steps": 3}), tmp_path / "run")
    torchrun(config, tmp_path / "run", "--resume", "latest")
    assert_same_run(tmp_path / "run", reference)


def test_fsdp_equals_single_process_and_resumes(tmp_path, seq_data, reference):
    fsdp = {"run.distributed": "fsdp", "run.save_steps": 3}
    torchrun(config_yaml(tmp_path, seq_data, "first", **fsdp, **{"run.max_steps": 3}), tmp_path / "fsdp")
    torchrun(config_yaml(tmp_path, seq_data, **fsdp), tmp_path / "fsdp", "--resume", "latest")
    assert_same_run(tmp_path / "fsdp", reference)


def test_bad_launches_get_one_line_errors(tmp_path, seq_data, monkeypatch, capsys):
    config = config_yaml(tmp_path, seq_data, **{"run.batch_size": 2})
    assert main(["train", "--config", config, "--output", str(tmp_path / "x"), "--nproc", "3"]) == 2
    assert "3 processes but batch_size 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(PeftlabError, match="MASTER_ADDR.*torchrun"):
        distributed.world_from_env()
    assert main(["train", "--config", config, "--output", str(tmp_path / "x"), "--nproc", "2"]) == 2
    assert "inside a torchrun launch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shards_cover_each_micro_batch_once():
    worlds = [distributed.World(rank, 3) for rank in range(3)]
    for indices in ([0, 1, 2, 3, 4, 5, 6], [7, 8]):
        parts = [distributed.shard(indices, w) for w in worlds]
        assert sorted(i for part, real in parts if real for i in part) == indices
        assert [real for _, real in parts] == [True, True, len(indices) > 2]


def test_leaving_waits_for_the_others_only_after_a_finished_run(monkeypatch):
    # a finished run collects its garbage (FSDP's cycles hold gloo work that aborts the process if freed at
    # exit) and meets the others before tearing down; a failed one leaves at once (the others may be stuck)
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    world = distributed.World(rank=1, size=2, strategy="fsdp")
    distributed.stop(world)
    assert calls == ["collect", "barrier", "destroy"]
    calls.clear()
    distributed.stop(world, finished=False)
    assert calls == ["destroy"]
    calls.clear()
    distributed.stop(distributed.SINGLE)
    assert calls == []


def test_every_peftlab_flag_passes_through_nproc_untouched(tmp_path, seq_data):
    import yaml

    # --r alone is an ambiguous abbreviation of torchrun's own options: it must never reach torchrun's parser
    torchrun(config_yaml(tmp_path, seq_data, **{"run.max_steps": 2}), tmp_path / "flags", "--r", "4", "--alpha", "8",
             "--lr", "0.02")
    saved = yaml.safe_load((tmp_path / "flags" / "config.yaml").read_text())
    assert (saved["method"]["r"], saved["method"]["alpha"], saved["optim"]["lr"]) == (4, 8, 0.02)
