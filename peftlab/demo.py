"""`peftlab demo` / `make demo`: offline, on 2 CPU cores in a few minutes. Fine-tunes the real pretrained
MiniLM with LoRA on a seeded synthetic sentiment task, scores it before and after, and prints the seed
study's rank table for flan-t5-small's architecture."""

from __future__ import annotations

from pathlib import Path

from peftlab.data.synth import generate, write_jsonl
from peftlab.errors import PeftlabError
from peftlab.io import refuse_run_output
from peftlab.study.seed import trainable_lines
from peftlab.train.config import load_config
from peftlab.train.loop import train


def rank_table(model_name: str = "random:flan-t5-small") -> list[str]:
    """The seed's trainable-parameter lines (LoRA on q,v, alpha = 2r), each with its rank."""
    return [f"r={r:<3} alpha={2 * r:<3} {line}" for r, line in trainable_lines(model_name).items()]


def check_demo_output(out: Path) -> None:
    """The demo replaces its own data/ and run/ in `out`, so `out` must hold nothing else (a directory of the
    user's, or a training run, is refused)."""
    refuse_run_output(out, "--output", may_hold_runs=True)
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--output {out} is a file, not a directory: choose another --output")
    if other := sorted(p.name for p in (out.iterdir() if out.is_dir() else []) if p.name not in ("data", "run")):
        raise PeftlabError(f"--output {out} holds {', '.join(other[:5])}, which the demo did not write: choose an "
                           "empty or new --output")


def run_demo(output: str | Path = "runs/demo", steps: int = 150) -> dict:
    out = Path(output)
    check_demo_output(out)
    print("== The seed's LoRA rank table (flan-t5-small architecture, targets q,v, alpha = 2r)")
    for line in rank_table():
        print(line)
    train_file = write_jsonl(generate("sentiment", 2000, seed=0), out / "data" / "train.jsonl")
    val_file = write_jsonl(generate("sentiment", 400, seed=1), out / "data" / "validation.jsonl")
    print(f"\n== LoRA on pretrained all-MiniLM-L6-v2, synthetic sentiment ({train_file}, {val_file})")
    config = load_config(None, {
        "model.name": "minilm", "data.train": str(train_file), "data.validation": str(val_file),
        "method.r": 8, "method.alpha": 16, "method.targets": ["query", "value"], "method.dropout": 0.05,
        "optim.lr": 1e-3, "optim.warmup_steps": 10, "run.batch_size": 32, "run.max_steps": steps,
        "run.logging_steps": 25, "run.output": str(out / "run"), "run.overwrite": True, "run.seed": 0,
    })
    result = train(config)
    before, after = result.eval_before["eval_accuracy"], result.eval_after["eval_accuracy"]
    print(f"\nvalidation accuracy: {before:.3f} before -> {after:.3f} after {steps} steps "
          f"(adapter in peft format: {result.output})")
    return {"before": before, "after": after}
