"""Where a peftlab training step spends its time: torch.profiler over a few steps.

    python bench/profile_step.py [--method lora|full] [--batch 8] [--steps 3]

Writes the top operators by self CPU time into bench/RESULTS.md (section "Profile", or "Profile: full
fine-tuning").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update_section  # noqa: E402
from run import SOURCE_TOKENS, TARGET_TOKENS, make_data  # noqa: E402

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm")


def build_step(method: str, batch_size: int) -> Callable[[], None]:
    """One peftlab training step (forward, backward, fused AdamW) on random:flan-t5-small, as `peftlab train`
    runs it (lean kernels, model dropout, LoRA dropout 0.05)."""
    from peftlab.data.batching import collate
    from peftlab.methods import LoraConfig
    from peftlab.methods.inject import apply
    from peftlab.models import load_model
    from peftlab.train.lean import make_lean
    from peftlab.train.loss import lm_loss

    model, tokenizer = load_model("random:flan-t5-small")
    if method == "lora":
        apply(model, LoraConfig(r=8, alpha=16, targets=["q", "v"], dropout=0.05))
    make_lean(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        make_data(data, batch_size)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = [{"input_ids": tokenizer(r["source"])["input_ids"], "labels": tokenizer(r["target"])["input_ids"]}
                for r in rows]
    batch = collate(examples, tokenizer.pad_token_id)

    def step() -> None:
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profiled(step: Callable[[], None], steps: int) -> profile:
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    return prof


def matmul_seconds_per_step(prof: profile, steps: int) -> float:
    """Self time of the matrix products (every FLOP the model counts is in one of them)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / 1e6 / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    args = p.parse_args()

    prof = profiled(build_step(args.method, args.batch), args.steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
    print(table)
    what = "LoRA r=8 on q,v" if args.method == "lora" else "full fine-tuning"
    update_section("Profile" if args.method == "lora" else "Profile: full fine-tuning",
                   f"`python bench/profile_step.py --method {args.method} --batch {args.batch} --steps {args.steps}`: "
                   f"peftlab {what}, random:flan-t5-small, {SOURCE_TOKENS}+{TARGET_TOKENS} tokens, batch "
                   f"{args.batch}, {args.steps} steps, top {args.top} operators by self CPU time.\n\n"
                   f"```\n{table}\n```")


if __name__ == "__main__":
    main()
