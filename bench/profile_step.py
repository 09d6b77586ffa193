"""Where a peftlab training step spends its time: torch.profiler over a few steps.

    python bench/profile_step.py [--method lora|full] [--batch 8] [--steps 3]

Writes the top operators by self CPU time into bench/RESULTS.md (section "Profile on <CPU vendor>", with
": full fine-tuning" for full), and what the step's tensor memory holds at its peak (torch's memory
timeline). Runs on the allocator `peftlab train` preloads (tcmalloc, else jemalloc, where installed): on
glibc's malloc every tensor over 32 MB is fresh pages, and their faults land in whichever operator touches them first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update_section  # noqa: E402
from run import SOURCE_TOKENS, TARGET_TOKENS, cpu_model, cpu_vendor, make_data  # noqa: E402

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "mkldnn::_linear_pointwise")
GRADIENT_COLUMN = 6  # torch's memory timeline export: [0, parameter, optimizer state, input, temporary,
#                      activation, gradient, autograd detail, unknown] bytes at each time


@dataclass
class Step:
    """One peftlab training step (forward, backward, clipping to norm 1.0, fused AdamW) on random:flan-t5-small,
    as `peftlab train` runs it: through `accel.prepare` with the default run settings (lean kernels, model
    dropout, LoRA dropout 0.05, the linear products that run.linear_backend=auto takes here)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    fast: Any  # peftlab.accel.Accelerated

    def __call__(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with self.fast, self.fast.backward_scope(self.model):
            with self.fast.autocast():
                loss = self.fast.loss(self.model, self.batch)
            self.fast.backward(loss)
        self.fast.step(self.optimizer, trainable, 1.0, self.fast.gradient_norms(self.optimizer, trainable))


def build_step(method: str, batch_size: int) -> Step:
    from peftlab import accel
    from peftlab.data.batching import collate
    from peftlab.methods import LoraConfig
    from peftlab.methods.inject import apply
    from peftlab.models import load_model
    from peftlab.train.config import RunSection

    model, tokenizer = load_model("random:flan-t5-small")
    if method == "lora":
        apply(model, LoraConfig(r=8, alpha=16, targets=["q", "v"], dropout=0.05))
    fast = accel.prepare(model, torch.device("cpu"), RunSection(), "seq2seq")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        make_data(data, batch_size)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = [{"input_ids": tokenizer(r["source"])["input_ids"], "labels": tokenizer(r["target"])["input_ids"]}
                for r in rows]
    return Step(model, optimizer, collate(examples, tokenizer.pad_token_id), fast)


def memory_at_peak(step: Step) -> str:
    """What the step's live tensors hold when their total peaks (one profiled step after a warm-up)."""
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:  # the memory timeline needs shapes and stacks
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated in favour of CUDA memory snapshots, which see no CPU tensor
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    peak = max(sizes, key=sum)
    from peftlab.measure.estimate import optimizer_bytes, weight_bytes

    weights, states = weight_bytes(step.model), optimizer_bytes(step.optimizer)  # there at every instant
    rest = sum(peak) - weights - states - peak[GRADIENT_COLUMN]
    mib = [f"{b / 2**20:,.0f} MiB" for b in (sum(peak), weights, states, peak[GRADIENT_COLUMN], rest)]
    return (f"Live tensors at the step's peak: {mib[0]} = weights {mib[1]} + optimizer state {mib[2]} + gradients "
            f"{mib[3]} + activations and temporaries {mib[4]} (torch's memory timeline; the process's peak RSS "
            "adds what is not a tensor: the interpreter, the imported libraries and the allocator's slack).")


def profiled(step: Callable[[], None], steps: int) -> profile:
    for _ in range(2):  # warm-up: the heap grows through the second step (AdamW's state appears in the first),
        step()  # and first-touched pages would bill their faults to whichever operator writes them
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    return prof


def matmul_seconds_per_step(prof: profile, steps: int) -> float:
    """Self time of the matrix products (every FLOP the model counts is in one of them)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / 1e6 / steps


def main() -> None:
    from peftlab.accel.allocator import allocator_in_use, reexec_with_allocator

    reexec_with_allocator()  # profile what `peftlab train` runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    args = p.parse_args()

    step = build_step(args.method, args.batch)
    prof = profiled(step, args.steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
    print(table)
    memory = memory_at_peak(step)
    print(memory)
    what = "LoRA r=8 on q,v" if args.method == "lora" else "full fine-tuning"
    update_section(f"Profile on {cpu_vendor()}" + ("" if args.method == "lora" else ": full fine-tuning"),
                   f"`python bench/profile_step.py --method {args.method} --batch {args.batch} --steps {args.steps}`: "
                   f"peftlab {what}, random:flan-t5-small, {SOURCE_TOKENS}+{TARGET_TOKENS} tokens, batch "
                   f"{args.batch}, {args.steps} steps, top {args.top} operators by self CPU time; allocator "
                   f"{allocator_in_use()}; {cpu_model()}.\n\n"
                   f"```\n{table}\n```\n\n{memory}")


if __name__ == "__main__":
    main()
