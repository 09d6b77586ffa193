"""Bad or unlucky input to every command: exit code 2, no traceback, one line that names the problem, and every
file that existed before is byte-identical after (docs/guarantees.md)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from peftlab.cli import main

SEQ = [{"dialogue": f"w{i} a b c", "summary": f"w{i}"} for i in range(24)]
CLS = [{"text": f"text number {i} {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
       for i in range(24)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTLAB_ALLOCATOR": "system"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(root: Path, model: str, data: str, output: str, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", str(root / data), "--output", str(root / output),
            "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "run.eval_before=false", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Data, two finished runs (T5 with checkpoints, GPT-2), a merged model and files of the user's own."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "data").mkdir()
    write_jsonl(root / "data/seq.jsonl", SEQ)
    write_jsonl(root / "data/cls.jsonl", CLS)
    write_jsonl(root / "data/mixed.jsonl", [{**r, "label": [0, 1, "negative"][i % 3]} for i, r in enumerate(CLS)])
    (root / "data/latin1.jsonl").write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    (root / "data/badline.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label"\n'
                                             '{"text": "c", "label": "y"}\n')
    (root / "data/binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "data/notes.txt").write_text("the user's own notes\n")
    (root / "config.yaml").write_text("model: {name: random:t5-tiny}\nrun: {max_steps: 2}\n")
    assert main(train_args(root, "random:t5-tiny", "data/seq.jsonl", "runs/t5", "--save-steps", "1",
                           "--input-column", "dialogue", "--target-column", "summary")) == 0
    assert main(train_args(root, "random:gpt2-tiny", "data/seq.jsonl", "runs/gpt2", "--input-column", "dialogue",
                           "--target-column", "summary", "--max-source-length", "16")) == 0
    (root / "runs/t5/my-notes.txt").write_text("kept by the user inside the run\n")
    assert main(["merge", "-p", str(root / "runs/t5"), "-o", str(root / "merged")]) == 0
    (root / "userdir").mkdir()
    (root / "userdir/thesis.tex").write_text("\\section{mine}\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {root} for the fixture's directory, what the one line must say)
CASES = [
    # training: every check runs before the old run is touched (--overwrite included)
    ("bert-positions", "train --model random:bert-tiny --data {root}/data/cls.jsonl --output {root}/runs/t5 "
     "--overwrite --max-source-length 4000", "512 positions"),
    ("gpt2-positions", "train --model random:gpt2-tiny --data {root}/data/seq.jsonl --input-column dialogue "
     "--target-column summary --output {root}/runs/t5 --overwrite --max-source-length 500", "512 positions"),
    ("alpha-nan", "train --config {root}/config.yaml --data {root}/data/seq.jsonl --output {root}/runs/t5 "
     "--overwrite --alpha nan", "method.alpha must be a finite number"),
    ("lr-inf", "train --data {root}/data/seq.jsonl --output {root}/runs/t5 --overwrite --lr inf",
     "optim.lr must be a finite number"),
    ("seed-negative", "train --data {root}/data/seq.jsonl --output {root}/runs/new --seed -1", "run.seed must be in"),
    ("seed-huge", "train --data {root}/data/seq.jsonl --output {root}/runs/new --seed 99999999999999999999",
     "run.seed must be in"),
    ("targets-regex", "train --data {root}/data/seq.jsonl --output {root}/runs/new --targets (",
     "not a valid regular expression"),
    ("bert-seq2seq", "train --model random:bert-tiny --task seq2seq --data {root}/data/cls.jsonl "
     "--output {root}/runs/new", "has no seq2seq head"),
    ("device-tpu", "train --data {root}/data/seq.jsonl --output {root}/runs/new --device tpu9", "run.device must be"),
    ("override-type", "train --data {root}/data/seq.jsonl --input-column dialogue --target-column summary "
     "--output {root}/runs/new 'model.overrides={{num_layers: many}}'", "has the wrong type"),
    ("override-negative", "train --data {root}/data/seq.jsonl --input-column dialogue --target-column summary "
     "--output {root}/runs/new 'model.overrides={{num_layers: -1}}'", "num_layers=-1 must be at least 1"),
    ("override-alias-bomb", "train --data {root}/data/seq.jsonl --output {root}/runs/new "
     "'model.overrides={{a: &a [x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
     "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
     "f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]}}'",
     "YAML aliases"),
    ("mixed-labels", "train --model random:bert-tiny --data {root}/data/mixed.jsonl --output {root}/runs/new",
     "mixes numbers"),
    ("latin1-data", "train --model random:bert-tiny --data {root}/data/latin1.jsonl --output {root}/runs/new",
     "line 2 is not UTF-8"),
    ("bad-jsonl-line", "train --model random:bert-tiny --data {root}/data/badline.jsonl --output {root}/runs/new",
     "line 2 is not valid JSON"),
    ("binary-data", "train --model random:bert-tiny --data {root}/data/binary.jsonl --output {root}/runs/new",
     "binary.jsonl line"),
    ("output-is-file", "train --data {root}/data/seq.jsonl --output {root}/data/notes.txt", "is a file"),
    ("output-under-file", "train --data {root}/data/seq.jsonl --output {root}/data/notes.txt/run",
     "notes.txt is a file, not a directory"),
    ("output-holds-run", "train --data {root}/data/seq.jsonl --output {root}/runs/t5", "already holds a run"),
    ("resume-nothing", "train --data {root}/data/cls.jsonl --output {root}/runs/gpt2 --resume latest",
     "has no checkpoint"),
    ("resume-missing", "train --data {root}/data/cls.jsonl --output {root}/runs/t5 --resume {root}/nowhere",
     "no trainer_state.pt there"),
    ("unknown-key", "train --data {root}/data/seq.jsonl run.batchsize=4", "did you mean 'run.batch_size'"),
    ("config-missing", "train --config {root}/nope.yaml", "not found"),
    ("config-not-mapping", "train --config {root}/data/notes.txt", "must hold a mapping"),
    ("config-not-utf8", "train --config {root}/data/latin1.jsonl", "is not UTF-8 text"),
    ("batch-zero", "train --data {root}/data/seq.jsonl --batch-size 0", "run.batch_size must be > 0"),
    ("rank-zero", "train --data {root}/data/seq.jsonl --r 0", "method.r (the rank) must be at least 1"),
    ("dropout-above-one", "train --data {root}/data/seq.jsonl --dropout 1.5", "method.dropout must be in"),
    ("epochs-negative", "train --data {root}/data/seq.jsonl --epochs -1", "run.epochs must be > 0"),
    ("data-missing", "train --data {root}/data/none.jsonl --output {root}/runs/new", "not found"),
    ("data-extension", "train --data {root}/data/notes.txt --output {root}/runs/new", "use a .jsonl"),
    ("data-column", "train --data {root}/data/seq.jsonl --output {root}/runs/new", "lacks column"),
    ("no-data", "train --output {root}/runs/new", "no training data"),
    ("nproc-flag", "train --data {root}/data/seq.jsonl --nproc zero", "invalid int value"),
    # merge: never over a run, its checkpoint, or files merge did not write
    ("merge-onto-run", "merge -p {root}/runs/t5 -o {root}/runs/t5 --overwrite", "checkpoint this command reads"),
    ("merge-checkpoint-onto-run", "merge -p {root}/runs/t5/checkpoint-2 -o {root}/runs/t5 --overwrite",
     "holds {root}/runs/t5/checkpoint-2"),
    ("merge-onto-other-run", "merge -p {root}/runs/t5 -o {root}/runs/gpt2 --overwrite", "is a training run"),
    ("merge-inside-run", "merge -p {root}/runs/gpt2 -o {root}/runs/t5/merged", "lies inside the training run"),
    ("merge-foreign-files", "merge -p {root}/runs/t5 -o {root}/userdir --overwrite", "merge does not write"),
    ("merge-not-empty", "merge -p {root}/runs/t5 -o {root}/merged", "not empty"),
    ("merge-onto-file", "merge -p {root}/runs/t5 -o {root}/data/notes.txt --overwrite", "is a file"),
    ("merge-no-checkpoint", "merge -p {root}/nowhere -o {root}/m2", "does not exist"),
    ("merge-data-dir", "merge -p {root}/data -o {root}/m2", "no adapter in"),
    # eval
    ("eval-onto-run", "eval -p {root}/runs/t5 --output {root}/runs/gpt2", "is a training run"),
    ("eval-onto-checkpoint", "eval -p {root}/runs/t5 --output {root}/runs/t5/checkpoint-2", "is a training run"),
    ("eval-wrong-columns", "eval -p {root}/runs/t5 --data {root}/data/cls.jsonl --output {root}/ev",
     "pass --data with the columns"),
    ("eval-missing", "eval -p {root}/nowhere", "does not exist"),
    ("eval-batch-zero", "eval -p {root}/runs/t5 --batch-size 0", "must be at least 1"),
    # generate
    ("generate-positions", "generate -p {root}/runs/gpt2 hello --max-new-tokens 1000", "512 positions"),
    ("generate-nothing", "generate -p {root}/runs/t5", "nothing to generate from"),
    ("generate-adapter-spec", "generate -p {root}/runs/t5 hi --adapter nameless", "--adapter wants name=path"),
    ("generate-file-missing", "generate -p {root}/runs/t5 --file {root}/data/none.jsonl", "not found"),
    ("generate-unknown-adapter", "generate -p {root}/runs/t5 --file {root}/data/adapters.jsonl", "unknown adapter"),
    ("generate-adapter-type", "generate -p {root}/runs/t5 --file {root}/data/adapter-number.jsonl",
     "must be an adapter's name"),
    # report, sweep, intrinsic-dim, demo, data synth, inspect, study
    ("report-onto-run", "report {root}/runs/t5 -o {root}/runs/gpt2", "is a training run"),
    ("report-inside-run", "report {root}/runs/t5 -o {root}/runs/t5/report", "lies inside the training run"),
    ("report-not-dir", "report {root}/data/notes.txt", "not a directory"),
    ("report-no-runs", "report {root}/data", "no finished runs"),
    ("sweep-circular", "sweep --grid alpha=2r --grid r=2alpha --output {root}/sw data.train={root}/data/seq.jsonl",
     "derived itself"),
    ("sweep-twice", "sweep --grid r=4 --grid r=8 --output {root}/sw data.train={root}/data/seq.jsonl", "twice"),
    ("sweep-onto-run", "sweep --grid r=4,8 --output {root}/runs/t5 data.train={root}/data/seq.jsonl",
     "is a training run"),
    ("sweep-holds-other-runs", "sweep --grid r=4,8 --output {root}/runs data.train={root}/data/seq.jsonl",
     "not a point of a study"),
    ("sweep-key", "sweep --grid rnk=4,8 --output {root}/sw", "unknown config key"),
    ("intrinsic-onto-run", "intrinsic-dim --output {root}/runs/t5 --full-metric 0.9", "is a training run"),
    ("demo-user-dir", "demo --output {root}/userdir", "which the demo did not write"),
    ("synth-exists", "data synth -o {root}/data/seq.jsonl", "already exists"),
    ("synth-into-run", "data synth -o {root}/runs/t5/more.jsonl --overwrite", "lies inside the training run"),
    ("synth-dir", "data synth -o {root}/data", "is a directory"),
    ("synth-huge", "data synth -n 100000000000 -o {root}/x.jsonl", "must be at most"),
    ("inspect-regex", "inspect --model random:t5-tiny --method lora --targets (", "not a valid regular expression"),
    ("inspect-estimate-long", "inspect --model random:t5-tiny --estimate-memory --source-len 100000000",
     "tokens the estimate's probe steps"),
    ("inspect-estimate-positions", "inspect --model random:bert-tiny --estimate-memory --source-len 100000",
     "512 positions"),
    ("inspect-preset", "inspect --model random:nope", "unknown preset"),
    ("study-parts", "study seed --parts xyz --output {root}/study", "--parts takes letters"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(root, argv, expected, capsys):
    (root / "data/adapters.jsonl").write_text('{"input": "hi", "adapter": "ghost"}\n')
    (root / "data/adapter-number.jsonl").write_text('{"input": "hi"}\n{"input": "yo", "adapter": 7}\n')
    before = snapshot(root)
    capsys.readouterr()
    try:
        code = main(shlex.split(argv.format(root=root)))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("peftlab"), err
    assert expected.format(root=root) in lines[0], lines[0]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(Path(k).name.endswith(".lock") for k in set(after) - set(before)), set(after) - set(before)


def test_the_table_is_wide(root):
    commands = {c[1].split()[0] for c in CASES}
    assert len(CASES) >= 60
    assert commands >= {"train", "merge", "eval", "generate", "report", "sweep", "intrinsic-dim", "demo", "data",
                        "inspect", "study"}


def test_files_get_the_umasks_mode(root, tmp_path):
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "results.json", "metrics.jsonl"):
        assert (root / "runs/t5" / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name
    assert (root / "merged/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    from peftlab.io import write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o640


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- locks ---------------------------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from peftlab.io import output_lock
    with output_lock(sys.argv[1], "train"):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(output: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_with_the_holders_pid(root, tmp_path, capsys):
    output = tmp_path / "run"
    holder = _holder(output)
    try:
        code = main(train_args(root, "random:t5-tiny", "data/seq.jsonl", str(output), "--input-column", "dialogue",
                               "--target-column", "summary"))
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2
    assert f"pid {holder.pid}" in err and "being written by another peftlab command" in err
    assert not output.exists()


def test_a_killed_holders_lock_does_not_block(root, tmp_path):
    output = tmp_path / "run"
    holder = _holder(output)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    from peftlab.io import lock_path

    assert lock_path(output).exists()  # the stale file is there; the kernel's lock went with the process
    assert main(train_args(root, "random:t5-tiny", "data/seq.jsonl", str(output), "--input-column", "dialogue",
                           "--target-column", "summary")) == 0
    assert (output / "adapter_model.safetensors").is_file()


def test_two_concurrent_overwrites_one_wins_the_other_is_refused(root, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "peftlab", *train_args(root, "random:t5-tiny", "data/seq.jsonl", str(output),
                                                             "--input-column", "dialogue", "--target-column", "summary",
                                                             "--save-steps", "3", "--overwrite")]
    # the first runs long enough (300 steps) for the second to start while it holds the output
    first = subprocess.Popen([*command, "--max-steps", "300"], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    from peftlab.io import lock_path

    while not lock_path(output).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    first_err = first.communicate(timeout=120)[1]
    assert first.returncode == 0, first_err
    if second.returncode == 0:  # the first had finished before the second started: both ran, one after the other
        pytest.skip("the first run finished before the second started")
    assert second.returncode == 2 and "being written by another peftlab command" in second.stderr
    assert "Traceback" not in second.stderr
    assert (output / "results.json").is_file() and (output / "checkpoint-300").is_dir()


# ---- full disk and read-only directories ---------------------------------------------------------------------------

def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_is_one_line_leaves_no_temp_file_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "train.jsonl"
    target.write_text("the old data\n")
    result = subprocess.run([sys.executable, "-m", "peftlab", "data", "synth", "-n", "20000", "-o", str(target),
                             "--overwrite"], env=ENV, capture_output=True, text=True, preexec_fn=_limited(100_000))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "file too large" in result.stderr
    assert target.read_text() == "the old data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_a_full_disk_during_a_checkpoint_leaves_no_half_checkpoint(root, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "peftlab", *train_args(root, "random:t5-tiny", "data/seq.jsonl", str(output),
                                                             "--input-column", "dialogue", "--target-column", "summary",
                                                             "--save-steps", "1")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, preexec_fn=_limited(30_000))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "file too large" in result.stderr
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given options at a fresh directory (root only; skipped where mounting is refused)."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:80]}): needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_read_only_file_system_is_one_line(root, small_disk, capsys):
    disk = small_disk("ro,size=1m")
    for argv in (train_args(root, "random:t5-tiny", "data/seq.jsonl", str(disk / "run"), "--input-column", "dialogue",
                            "--target-column", "summary"),
                 ["data", "synth", "-o", str(disk / "x.jsonl")],
                 ["merge", "-p", str(root / "runs/t5"), "-o", str(disk / "merged")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "read-only file system" in err, err


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(root, small_disk, capsys):
    disk = small_disk("size=64k")
    assert main(train_args(root, "random:t5-tiny", "data/seq.jsonl", str(disk / "run"), "--input-column", "dialogue",
                           "--target-column", "summary", "--save-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and len(err.strip().splitlines()) == 1, err
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
    assert main(["merge", "-p", str(root / "runs/t5"), "-o", str(disk / "merged")]) == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert not [p for p in disk.iterdir() if "merged" in p.name and not p.name.endswith(".lock")]


# ---- what survives a failed --overwrite, a cut log line, and what is only warned about -------------------------------

def test_a_failed_overwrite_puts_the_old_run_back(root, tmp_path, monkeypatch, capsys):
    import shutil

    from peftlab.train import loop

    output = tmp_path / "run"
    shutil.copytree(root / "runs/gpt2", output)
    before = snapshot(output)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loop, "_fit", broken)
    with pytest.raises(RuntimeError):
        main(train_args(root, "random:t5-tiny", "data/seq.jsonl", str(output), "--input-column", "dialogue",
                        "--target-column", "summary", "--overwrite"))
    assert snapshot(output) == before
    assert "is back in" in capsys.readouterr().err


def test_an_overwrite_replaces_the_run_and_keeps_the_users_files(root, tmp_path):
    import shutil

    output = tmp_path / "run"
    shutil.copytree(root / "runs/t5", output)
    assert main(train_args(root, "random:gpt2-tiny", "data/seq.jsonl", str(output), "--input-column", "dialogue",
                           "--target-column", "summary", "--overwrite")) == 0
    assert (output / "my-notes.txt").read_text() == "kept by the user inside the run\n"
    assert not (output / "checkpoint-1").exists() and not (output / ".replaced-run").exists()
    assert "gpt2" in (output / "config.yaml").read_text()


def test_merge_overwrite_replaces_an_earlier_merged_model(root, tmp_path):
    import shutil

    merged = tmp_path / "merged"
    shutil.copytree(root / "merged", merged)
    assert main(["merge", "-p", str(root / "runs/gpt2"), "-o", str(merged), "--overwrite"]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == "gpt2"
    assert [p.name for p in tmp_path.glob(".merged*")] == [".merged.lock"]


def test_a_cut_last_log_line_is_skipped_with_a_warning(root, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "runs/t5", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')
    assert main(["report", str(run), "-o", str(tmp_path / "report")]) == 0
    assert "skipped its last line" in capsys.readouterr().err
    assert main(train_args(root, "random:t5-tiny", "data/seq.jsonl", str(run), "--input-column", "dialogue",
                           "--target-column", "summary", "--save-steps", "1", "--resume", "latest")) == 0
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_resume_from_another_runs_checkpoint_is_one_line(root, tmp_path, capsys):
    import shutil

    import torch

    loose = tmp_path / "loose/checkpoint-2"
    shutil.copytree(root / "runs/t5/checkpoint-2", loose)  # no config.yaml beside it to compare settings with
    argv = train_args(root, "random:t5-tiny", "data/seq.jsonl", str(tmp_path / "run"), "--input-column", "dialogue",
                      "--target-column", "summary", "--resume", str(loose))
    assert main([*argv, "--targets", "q,k,v"]) == 2  # other adapter weights
    assert "saved for a different model or config" in capsys.readouterr().err
    state = torch.load(loose / "trainer_state.pt", weights_only=True)  # the same weights, another run's optimizer
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-1]
    torch.save(state, loose / "trainer_state.pt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "optimizer state does not fit this run" in err, err


def test_generate_file_rows_with_and_without_an_adapter_field(root, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"input": "w1 a b c"}, {"input": "w2 a b c", "adapter": "__base__"},
                       {"input": "w3 a b c", "adapter": "default"}])
    capsys.readouterr()
    assert main(["generate", "-p", str(root / "runs/t5"), "--file", str(rows), "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_labels_given_in_data_labels_may_be_numbers_and_names(root, tmp_path):
    assert main(train_args(root, "random:bert-tiny", "data/mixed.jsonl", str(tmp_path / "run"),
                           "data.labels=[0, 1, negative]")) == 0


def test_one_class_empty_texts_and_a_rank_above_the_width_are_warned(root, tmp_path, capsys):
    write_jsonl(tmp_path / "one.jsonl", [{"text": "", "label": "pos"} for _ in range(8)])
    assert main(train_args(root, "random:bert-tiny", str(tmp_path / "one.jsonl"), str(tmp_path / "run"),
                           "--r", "512")) == 0
    out = capsys.readouterr().out
    assert "every training example has the label 'pos'" in out
    assert "training texts are empty" in out
    assert "rank 512 is above the width of every adapted layer" in out


def test_yaml_aliases_expanding_beyond_the_budget_are_refused():
    from peftlab.errors import PeftlabError
    from peftlab.io import load_yaml

    assert load_yaml("a: &x [1]\nb: *x\n") == {"a": [1], "b": [1]}
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values, 80 aliases
    with pytest.raises(PeftlabError, match="YAML aliases"):
        load_yaml("\n".join(levels))
    assert len(load_yaml("\n".join(levels[:4]))["a3"]) == 10  # 10**4 values: a config may share that much
