"""One short check for a lent GPU: peftlab against peft + Seq2SeqTrainer on flan-t5-small's architecture, LoRA
(r 8, q and v) and full fine-tuning, fp32 and bf16, 30 steps each at batch 8: step time, peak CUDA memory and
the loss trajectories side by side, with the device policy peftlab applied (peftlab/accel/policy.py).

    python bench/gpu_check.py                      # on the GPU (about 5 minutes on an H100)
    python bench/gpu_check.py --device cpu --steps 2 --methods lora --precisions fp32   # a smoke run anywhere

Each run is a process of its own, so each peak is its own. Writes its section of bench/RESULTS.md on CUDA."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_WORDS, TARGET_WORDS, BATCH = 100, 40, 8


def make_data(path: Path, n: int) -> None:
    from peftlab.data.synth import summary_rows, write_jsonl

    write_jsonl([{"source": r["dialogue"], "target": r["summary"]}
                 for r in summary_rows(n, SOURCE_WORDS, TARGET_WORDS, seed=0)], path)


def peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")


def run_peftlab(data: Path, method: str, precision: str, steps: int, device: str, out: Path) -> dict:
    import torch

    from peftlab.accel import policy
    from peftlab.train.config import load_config
    from peftlab.train.loop import train

    lora = {} if method == "full" else {"method.r": 8, "method.alpha": 16, "method.targets": ["q", "v"]}
    config = load_config(None, {
        "model.name": "random:flan-t5-small", "model.overrides": {"dropout_rate": 0.0}, "data.train": str(data),
        "data.validation": str(data), "data.input_column": "source", "data.target_column": "target",
        "data.group_by_length": False, "method.name": method, **lora, "optim.lr": 1e-4, "run.batch_size": BATCH,
        "run.max_steps": steps, "run.logging_steps": 1, "run.output": str(out), "run.eval_before": False,
        "run.eval_metrics": False, "run.seed": 0, "run.device": device, "run.precision": precision})
    result = train(config, progress=False)
    switches = policy.switches(config.run, torch.device(device))
    return {"step_times": [r["step_time_s"] for r in result.logs], "losses": [r["loss"] for r in result.logs],
            "peak_mb": peak_mb(device), "policy": {k: v for k, v in vars(switches).items()}}


def run_hf(data: Path, method: str, precision: str, steps: int, device: str, out: Path) -> dict:
    import datasets
    import peft
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from peftlab.models import load_model

    model, tokenizer = load_model("random:flan-t5-small", overrides={"dropout_rate": 0.0})
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"],
                                                           lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
    table = datasets.load_dataset("json", data_files=str(data), split="train")
    table = table.map(lambda row: {"input_ids": tokenizer(row["source"], truncation=True, max_length=128)["input_ids"],
                                   "labels": tokenizer(row["target"], truncation=True, max_length=64)["input_ids"]},
                      remove_columns=table.column_names)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            times.append(time.perf_counter() - self.t0)

        def _sync(self):
            import torch

            if device.startswith("cuda"):
                torch.cuda.synchronize()

    args = Seq2SeqTrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
                                    learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                                    dataloader_num_workers=0, use_cpu=device == "cpu", seed=0, disable_tqdm=True,
                                    bf16=precision == "bf16", lr_scheduler_type="linear")
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=table,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), callbacks=[Timer()])
    trainer.train()
    return {"step_times": times, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_mb": peak_mb(device)}


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = run_peftlab if args.child == "peftlab" else run_hf
        print("RESULT " + json.dumps(run(Path(args.data), args.method, args.precision, args.steps, args.device,
                                         Path(tmp) / "out")))


def measure(tool: str, method: str, precision: str, args: argparse.Namespace, data: Path) -> dict:
    command = [sys.executable, __file__, "--child", tool, "--method", method, "--precision", precision,
               "--steps", str(args.steps), "--device", args.device, "--data", str(data)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tool} {method} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    lines = ["| method | precision | peftlab s/step | peft s/step | time ratio | peftlab peak MB | peft peak MB | "
             "memory ratio | max loss difference |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        make_data(data, BATCH * (args.steps + 1))
        for method in args.methods.split(","):
            for precision in args.precisions.split(","):
                ours, theirs = (measure(t, method, precision, args, data) for t in ("peftlab", "hf"))
                time_ours = statistics.median(ours["step_times"][1:] or ours["step_times"])
                time_theirs = statistics.median(theirs["step_times"][1:] or theirs["step_times"])
                gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=False))
                lines.append(f"| {method} | {precision} | {time_ours:.4f} | {time_theirs:.4f} | "
                             f"{time_ours / time_theirs:.2f}x | {ours['peak_mb']:.0f} | {theirs['peak_mb']:.0f} | "
                             f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x | {gap:.2e} |")
                print(lines[-1], "policy:", ours["policy"], flush=True)
    body = "\n".join([f"`python bench/gpu_check.py --device {args.device} --steps {args.steps}` "
                      f"({time.strftime('%Y-%m-%d')}): flan-t5-small architecture, batch {BATCH}, dropout off; the "
                      "first step of each run left out of the median. peftlab's switches on this device: "
                      "peftlab/accel/policy.py.", "", *lines])
    print(body)
    if args.device.startswith("cuda"):
        sys.path.insert(0, str(HERE))
        from results import update_section

        update_section("GPU check: peftlab vs HF peft + Seq2SeqTrainer", body)


if __name__ == "__main__":
    main()
