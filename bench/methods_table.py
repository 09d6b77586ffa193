"""The methods table: every PEFT method on the real pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2,
the `minilm` preset) fine-tuned on an SST-2 training subset and scored on the 872-sentence dev set: dev
accuracy, trainable share, peak memory and time. SAID is reported at its d90 (the smallest d reaching 90%
of full fine-tuning's accuracy, found by `peftlab intrinsic-dim`).

    python bench/methods_table.py [--train 2000] [--epochs 1] [--data ../shared/data/sst2]

Reads SST-2 from ../shared/data (never copied into the repository); runs go to a temporary directory
unless --output is given. Writes the "Methods on SST-2" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import update_section  # noqa: E402

from peftlab.study.intrinsic import intrinsic_dim  # noqa: E402
from peftlab.study.sweep import markdown_table, run_point, summary_row  # noqa: E402

# method -> (its config keys, learning rate): learning rates in the usual range of each method (not tuned here)
METHODS = {
    "full": ({}, 1e-4),
    "lora": ({"method.r": 8, "method.alpha": 16}, 1e-3),
    "dora": ({"method.r": 8, "method.alpha": 16}, 1e-3),
    "ia3": ({}, 1e-2),
    "houlsby": ({"method.bottleneck": 64}, 1e-3),
    "prompt_tuning": ({"method.num_virtual_tokens": 20}, 3e-2),
    "bitfit": ({}, 2e-3),
    "ln_tuning": ({}, 2e-3),
}
SAID_LR = 1e-2
SAID_PARAMETERS = r".*encoder\..*"  # the transformer layers; the 11.7M-value word embeddings stay frozen


def read_tsv(path: Path) -> list[dict]:
    with path.open(newline="") as f:  # SOURCE.txt: bare " characters, so no quoting
        return [{"sentence": r["sentence"].strip(), "label": r["label"]}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train", type=int, default=2000, help="training sentences (a seeded random subset)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--output", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--methods", default=",".join([*METHODS, "said"]))
    parser.add_argument("--d-start", type=int, default=1024, help="SAID search: the first d tried")
    parser.add_argument("--d-min", type=int, default=64, help="SAID search: halving stops here")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "dev.tsv").is_file():
        sys.exit(f"no SST-2 at {data}: pass --data DIR holding train_full.tsv and dev.tsv")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or tmp)
        out.mkdir(parents=True, exist_ok=True)
        train = read_tsv(data / "train_full.tsv")
        random.Random(0).shuffle(train)
        train_file = write_jsonl(train[: args.train], out / "train.jsonl")
        dev_file = write_jsonl(read_tsv(data / "dev.tsv"), out / "dev.jsonl")
        common = [f"data.train={train_file}", f"data.validation={dev_file}", "model.name=minilm",
                  "model.task=classification", "data.input_column=sentence", "data.target_column=label",
                  "data.max_source_length=64", "run.batch_size=32", f"run.epochs={args.epochs}",
                  "run.eval_before=false", "run.logging_steps=10", "run.seed=0", "optim.warmup_steps=10"]
        wanted = args.methods.split(",")
        rows = []
        for method, (keys, lr) in METHODS.items():
            if method not in wanted:
                continue
            point = {"method.name": method, **keys, "optim.lr": lr}
            rows.append(summary_row(run_point(None, point, out, [*common])))
        if "said" in wanted:
            full = next((r for r in rows if r["method"] == "full"), None)
            if full is None:
                sys.exit("SAID's d90 needs the full fine-tuning row: keep 'full' in --methods")
            result = intrinsic_dim(None, out / "said", [*common, f"optim.lr={SAID_LR}",
                                                        f"method.parameters={SAID_PARAMETERS}"],
                                   full_metric=float(full["eval_value"]), d_start=args.d_start, d_max=1 << 16,
                                   precision=0.5, d_min=args.d_min)
            if result["d"]:
                rows.append({**summary_row(out / "said" / f"method=said,d={result['d']}"),
                             "method": f"said (d90 {'<=' if result['at_most'] else '='} {result['d']})",
                             "d_curve": ", ".join(f"{d}: {m:.3f}" for d, m in result["curve"].items())})
            else:
                rows.append({"method": "said", "eval_value": f"d90 not reached up to d = {1 << 16}: "
                             f"{result['curve']}"})
        report(rows, args)


def report(rows: list[dict], args) -> None:
    columns = ["method", "eval_value", "trainable_params", "trainable_pct", "peak_memory_mb", "step_time_s"]
    curve = next((f" SAID accuracy by d (threshold {0.9 * float(r['eval_value']):.3f}): {c['d_curve']}."
                  for r in rows if r["method"] == "full" for c in rows if "d_curve" in c), "")
    body = (f"`python bench/methods_table.py --train {args.train} --epochs {args.epochs} --d-start {args.d_start} "
            f"--d-min {args.d_min}` "
            f"(minilm = all-MiniLM-L6-v2, SST-2 train subset of {args.train} sentences, dev 872; batch 32, "
            f"64 tokens, fp32, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}). eval_value = dev accuracy; peak memory = RSS above the pre-model "
            "baseline; step_time_s = median seconds per training step. Every row also trains the "
            "classifier head (770 values), which may carry most of SAID's accuracy at small d (not measured "
            f"separately).{curve}\n\n"
            + markdown_table(rows, columns))
    update_section("Methods on SST-2 (MiniLM)", body)
    print(body)


if __name__ == "__main__":
    main()
