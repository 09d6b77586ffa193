"""Predicted against measured peak training memory (fp32 AdamW): three architectures, full fine-tuning and
LoRA r=8, batch 8 and 32, 128 source and 64 target tokens.

    python bench/memory_estimate.py [--steps 2] [--batches 8,32]

The prediction is `peftlab inspect --estimate-memory`'s; the measurement is a `peftlab train` run in its own
process (peak RSS above the memory before the model loaded, from its results.json). Both run on the allocator
the `peftlab` command preloads (tcmalloc, else jemalloc, where installed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import update_section  # noqa: E402
from run import SOURCE_TOKENS, TARGET_TOKENS, child_environment, make_data  # noqa: E402

# name -> (model, overrides, LoRA targets): widened tiny presets stand in for the other architectures
MODELS = {
    "flan-t5-small": ("random:flan-t5-small", {}, ["q", "v"]),
    "bart (d=512, 6+6 layers)": ("random:bart-tiny", {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
                                                       "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
                                                       "encoder_attention_heads": 8, "decoder_attention_heads": 8,
                                                       "vocab_size": 32000}, ["q_proj", "v_proj"]),
    "gpt2 (d=512, 8 layers)": ("random:gpt2-tiny", {"n_embd": 512, "n_layer": 8, "n_head": 8, "vocab_size": 32000},
                               ["c_attn"]),
}


def measure(model: str, overrides: dict, targets: list[str], method: str, batch: int, steps: int,
            tmp: Path) -> tuple[float, str]:
    """The run's peak memory in MB and the allocator it ran on, from its results.json."""
    data = tmp / "data.jsonl"
    if not data.exists():
        make_data(data, 64)
    template = "{source}" if "gpt2" in model else None
    config = {"model": {"name": model, "overrides": overrides},
              "data": {"train": str(data), "validation": str(data), "input_column": "source",
                       "target_column": "target", "template": template, "max_source_length": SOURCE_TOKENS,
                       "max_target_length": TARGET_TOKENS, "group_by_length": False},
              "method": {"name": method, "r": 8, "alpha": 16, "targets": targets, "dropout": 0.05},
              "run": {"batch_size": batch, "max_steps": steps, "logging_steps": 1, "eval_before": False,
                      "output": str(tmp / "run"), "overwrite": True}}
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "peftlab", "train", "--config", str(path)], check=True,
                   capture_output=True)
    results = json.loads((tmp / "run" / "results.json").read_text())
    return results["memory_mb"]["total"], results["allocator"]


def predict(model: str, overrides: dict, targets: list[str] | None, batch: int) -> float:
    """`estimate_memory` in a fresh process, as `peftlab inspect --estimate-memory` runs it (on the allocator
    the command preloads)."""
    target_len = TARGET_TOKENS if "gpt2" not in model else TARGET_TOKENS - 1
    code = ("import sys, json\n"
            "from peftlab.measure.inspect import estimate_memory\n"
            "from peftlab.methods import LoraConfig\n"
            "model, overrides, targets, batch, s, t = json.loads(sys.argv[1])\n"
            "config = LoraConfig(r=8, alpha=16, targets=targets, dropout=0.05) if targets else None\n"
            "print(estimate_memory(model, config, None, batch, s, t, overrides)[1].as_mb()['total'])\n")
    args = json.dumps([model, overrides, targets, batch, SOURCE_TOKENS, target_len])
    done = subprocess.run([sys.executable, "-c", code, args], check=True, capture_output=True, text=True,
                          env=child_environment(preload=True))
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batches", default="8,32")
    args = parser.parse_args()
    rows, allocators = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model, overrides, targets) in MODELS.items():
            for method in ("full", "lora"):
                for batch in map(int, args.batches.split(",")):
                    predicted = predict(model, overrides, targets if method == "lora" else None, batch)
                    measured, allocator = measure(model, overrides, targets, method, batch, args.steps, Path(tmp))
                    allocators.add(allocator)
                    rows.append((label, method, batch, predicted, measured))
                    print(rows[-1], flush=True)
    lines = ["| model | method | batch | predicted MB | measured MB | predicted / measured |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {meth} | {b} | {p:,.0f} | {x:,.0f} | {p / x:.2f} |" for m, meth, b, p, x in rows]
    body = (f"Command: `python bench/memory_estimate.py --steps {args.steps} --batches {args.batches}`. "
            "Measured = peak RSS above the memory before the model loaded "
            f"(CPU, fp32, AdamW; each run its own process; allocator: {', '.join(sorted(allocators))}).\n\n"
            + "\n".join(lines))
    update_section("Memory: predicted against measured", body)
    print(body)


if __name__ == "__main__":
    main()
