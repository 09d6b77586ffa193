"""run.report_to: every tracker holds what metrics.jsonl holds, read back with the tracker's own reader."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.train.tracking import TRACKERS, grouped_grad_norms, scalars_of

ROWS = [{"dialogue": f"w{i % 5} a b c", "summary": f"w{i % 5}"} for i in range(24)]


def train(tmp_path: Path, output: str, *extra: str) -> int:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return main(["train", "--model", "random:t5-tiny", "--data", str(data), "--input-column", "dialogue",
                 "--target-column", "summary", "--output", str(tmp_path / output), "--batch-size", "4",
                 "--logging-steps", "1", "--eval-steps", "2", "--max-target-length", "4", *extra])


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value}, grouped as the trackers take it."""
    found: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in scalars_of(record).items():
            found.setdefault(key, {})[record["step"]] = value
    return found


def test_grad_norms_are_grouped_by_kind_and_layer():
    norms = {"encoder.block.3.layer.0.SelfAttention.q.lora_A": 3.0,
             "encoder.block.3.layer.0.SelfAttention.v.lora_A": 4.0,
             "decoder.block.3.layer.0.SelfAttention.q.lora_B": 1.0, "lm_head.weight": 2.0}
    assert grouped_grad_norms(norms) == {"grad_norm/lora_A/encoder.3": 5.0, "grad_norm/lora_B/decoder.3": 1.0,
                                         "grad_norm/other/rest": 2.0}


def test_tensorboard_event_files_hold_every_scalar_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tmp_path, "run", "--max-steps", "4", "--report-to", "tensorboard") == 0
    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    wanted = expected(tmp_path / "run")
    assert {"loss", "grad_norm", "learning_rate", "eval_loss", "eval_rougeL",
            "grad_norm/lora_A/encoder.0"} <= set(wanted)
    for tag, by_step in wanted.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(by_step, rel=1e-6), tag
    assert events.Scalars("trainable_params")[0].value > 0


def mlflow_store(tmp_path: Path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns: here, not in the checkout
    return uri


def check_mlflow_run(uri: str, run: Path, experiment: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(found) == 1
    run_id = found[0].info.run_id
    assert found[0].data.params["method.name"] == "lora" and found[0].data.params["optim.lr"] == "0.0003"
    for tag in ("loss", "grad_norm", "eval_loss", "grad_norm/lora_A/encoder.0"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert len(history) == len(client.get_metric_history(run_id, tag))  # no step twice
        assert history == pytest.approx(expected(run)[tag], rel=1e-6), tag
    assert "adapter/adapter_model.safetensors" in [a.path for a in client.list_artifacts(run_id, "adapter")]


def test_mlflow_local_store_holds_params_metrics_and_the_adapter(tmp_path, monkeypatch):
    uri = mlflow_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rank-study")
    assert train(tmp_path, "run", "--max-steps", "4", "--report-to", "mlflow") == 0
    check_mlflow_run(uri, tmp_path / "run", "rank-study")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_tracking_server(tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.skip("mlflow server did not start within 90 s here")
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert train(tmp_path, "run", "--max-steps", "2", "--report-to", "mlflow") == 0
        check_mlflow_run(uri, tmp_path / "run", "run")
    finally:
        server.terminate()
        server.wait(timeout=30)


def wandb_history(run: Path) -> list[dict]:
    """Every history row of the run's offline W&B files, parsed with wandb's own protobuf records (its files are
    LevelDB-style logs: 32 KiB blocks of records with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, offset, pending = path.read_bytes(), 7, b""
        while offset + 7 <= len(data):
            left = 32768 - offset % 32768
            if left < 7:
                offset += left
                continue
            length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
            pending += data[offset + 7:offset + 7 + length]
            offset += 7 + length
            if kind in (1, 4):  # FULL or LAST
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item})
            elif kind == 0:
                break
    return rows


def test_wandb_offline_run_holds_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train(tmp_path, "run", "--max-steps", "4", "--report-to", "wandb") == 0
    rows = wandb_history(tmp_path / "run")
    wanted = expected(tmp_path / "run")
    for tag in ("loss", "grad_norm", "eval_loss", "grad_norm/lora_A/encoder.0"):
        logged = {r["_step"]: r[tag] for r in rows if tag in r}
        assert logged == pytest.approx(wanted[tag], rel=1e-6), tag


def test_a_resumed_run_logs_no_step_twice_in_any_tracker(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = mlflow_store(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = ["--report-to", "tensorboard,mlflow,wandb", "--save-steps", "2"]
    assert train(tmp_path, "run", "--max-steps", "3", *trackers) == 0  # as a run stopped after step 3
    assert train(tmp_path, "run", "--max-steps", "4", *trackers, "--resume", "latest") == 0  # from checkpoint-2
    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])  # one run, continued
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "loss")) == [1, 2, 3, 4]
    steps = [r["_step"] for r in wandb_history(tmp_path / "run") if "loss" in r]
    assert sorted(steps) == [1, 2, 3, 4]
    ids = {re.match(r"offline-run-\d+_\d+-([a-z0-9]+)", p.name).group(1)
           for p in (tmp_path / "run").glob("wandb/offline-run-*")}  # a second dir in the same second gets "-1"
    assert len(ids) == 1  # one run, continued


def test_a_sweeps_points_share_one_experiment(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = mlflow_store(tmp_path, monkeypatch)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["sweep", "--grid", "r=2,4", "--output", str(tmp_path / "ranks"), "model.name=random:t5-tiny",
                 f"data.train={data}", "data.input_column=dialogue", "data.target_column=summary",
                 "run.max_steps=2", "run.report_to=[mlflow]", "data.max_target_length=4"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r=2", "r=4"]


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TRACKERS["wandb"], "package", "wandb_is_not_installed_here")
    assert train(tmp_path, "run", "--max-steps", "2", "--report-to", "wandb") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'peftlab[wandb]'" in err
    assert not (tmp_path / "run").exists()
    assert train(tmp_path, "run", "--max-steps", "2", "--report-to", "neptune") == 2
    assert "unknown tracker 'neptune'" in capsys.readouterr().err


def test_an_unreachable_mlflow_server_warns_once_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert train(tmp_path, "run", "--max-steps", "2", "--report-to", "mlflow") == 0
    assert (tmp_path / "run/adapter_model.safetensors").is_file()
    err = capsys.readouterr().err
    assert err.count("mlflow tracking stopped") == 1


def test_trackio_local_project_holds_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio", reason="trackio is not in the dev extras (it pulls in gradio): "
                                          "pip install 'peftlab[trackio]' to check it")
    from trackio.sqlite_storage import SQLiteStorage

    output = f"run-{os.getpid()}-{time.time_ns()}"  # a unique project, should trackio's directory be the user's
    assert train(tmp_path, output, "--max-steps", "2", "--report-to", "trackio") == 0
    logs = SQLiteStorage.get_logs(output, output)
    wanted = expected(tmp_path / output)
    assert {r["step"]: r["loss"] for r in logs if "loss" in r} == pytest.approx(wanted["loss"], rel=1e-6)
