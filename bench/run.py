"""Side-by-side training benchmark: peftlab against HF peft + Seq2SeqTrainer, in the same run.

    python bench/run.py                       # LoRA r=8 on q,v, full fine-tuning, LoRA + gradient checkpointing,
                                              # LoRA with peftlab's dropout masks redrawn in backward, and with
                                              # its linear outputs recomputed in backward
    python bench/run.py --steps 4 --batches 32 --methods lora

Each (tool, method, batch) runs in its own process so peak RSS is its own. Same data (random tokens,
128 source and 64 target tokens), same model (`random:flan-t5-small`: flan-t5-small's architecture),
same hyperparameters, fp32, dropout as in the model (T5 0.1, LoRA 0.05). Achieved GFLOP/s counts the
model's own FLOPs (torch's FlopCounterMode on the stock model, the same for both tools), not what either
tool spends. The loss-trajectory check trains both tools with dropout off on the same 8 rows (every step
sees all of them, so sampling order cannot matter) and compares the logged losses. peftlab runs on the
allocator `peftlab train` preloads (tcmalloc, else jemalloc, where installed) and with the linear products its
run.linear_backend=auto takes (oneDNN on x86 CPUs not made by Intel), peft + Trainer on the system's; extra
rows give peft the same allocator, and then also a process-wide flush of subnormal numbers
(on Intel CPUs the random-init model's softmax makes peft's LM-head backward multiply subnormals, which
peftlab's loss flushes). Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE_TOKENS, TARGET_TOKENS = 128, 64
TIME_TARGETS = {"lora": 0.5, "full": 0.7}  # the headline step-time ratios
MEMORY_TARGETS = {"lora": 0.5, "full": 0.7}  # and peak-memory ratios
# what `make bench` runs (the defaults below)
# peftlab's own switches for extra rows (peft has none of them: its side runs as in the plain row)
PEFTLAB_ONLY = {"redraw": ("run.redraw_masks", "dropout masks drawn again in backward instead of kept"),
                "recompute": ("run.recompute_linear", "q, k, v, gate and up recomputed in backward from the "
                              "normalised input instead of kept")}
DEFAULTS = {"methods": "lora,full,lora+gc,lora+redraw,lora+recompute", "batches": "8,32", "steps": 8,
            "trajectory_steps": 20, "repeats": 1}
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import update_section  # noqa: E402


def make_data(path: Path, n: int) -> None:
    """Rows whose byte-level encodings are exactly 128 and 64 tokens long (with the end-of-sequence token)."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    with open(path, "w") as f:
        for _ in range(n):
            src = "".join(rng.choice(letters) for _ in range(SOURCE_TOKENS - 1))
            tgt = "".join(rng.choice(letters) for _ in range(TARGET_TOKENS - 1))
            f.write(json.dumps({"source": src, "target": tgt}) + "\n")


def peak_rss_mb() -> float:
    from peftlab.measure.memory import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def run_peftlab(data: Path, method: str, batch: int, steps: int, out: Path, dropout: bool, extras: list[str]) -> dict:
    validation = out.parent / "validation.jsonl"  # the loop scores it once at the end: keep it one batch
    validation.write_text("".join(data.read_text().splitlines(keepends=True)[:batch]))
    from peftlab.train.config import load_config
    from peftlab.train.loop import train

    config = load_config(None, {
        "run.gradient_checkpointing": "gc" in extras,
        **{key: extra in extras for extra, (key, _) in PEFTLAB_ONLY.items()},
        "model.name": "random:flan-t5-small", "data.train": str(data), "data.validation": str(validation),
        "data.input_column": "source", "data.target_column": "target", "data.group_by_length": False,
        "data.max_source_length": SOURCE_TOKENS, "data.max_target_length": TARGET_TOKENS,
        "method.name": method, "model.overrides": None if dropout else {"dropout_rate": 0.0},
        **({} if method == "full" else {"method.r": 8, "method.alpha": 16, "method.targets": ["q", "v"],
                                        "method.dropout": 0.05 if dropout else 0.0}),
        "optim.lr": 1e-4, "run.batch_size": batch, "run.max_steps": steps,
        "run.logging_steps": 1, "run.output": str(out), "run.eval_before": False, "run.seed": 0,
    })
    result = train(config, progress=False)
    before_model = json.loads((out / "results.json").read_text())["baseline_memory_mb"]
    return {"step_times": [r["step_time_s"] for r in result.logs], "losses": [r["loss"] for r in result.logs],
            "before_model_mb": before_model}


def run_hf(data: Path, method: str, batch: int, steps: int, out: Path, dropout: bool, extras: list[str]) -> dict:
    """peft + Seq2SeqTrainer; of the extras only "gc" has a counterpart there (the others: the plain run)."""
    checkpointing = "gc" in extras
    import datasets
    import peft
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from peftlab.models import load_model

    before_model = peak_rss_mb()
    model, tokenizer = load_model("random:flan-t5-small", overrides=None if dropout else {"dropout_rate": 0.0})
    if checkpointing:
        model.enable_input_require_grads()  # peft's documented recipe: the frozen embeddings' output needs grad
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"],
                                                           lora_dropout=0.05 if dropout else 0.0,
                                                           task_type="SEQ_2_SEQ_LM"))
    table = datasets.load_dataset("json", data_files=str(data), split="train")

    def encode(row):
        return {"input_ids": tokenizer(row["source"])["input_ids"],
                "labels": tokenizer(row["target"])["input_ids"]}

    table = table.map(encode, remove_columns=table.column_names)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    args = Seq2SeqTrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                                    learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                                    dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True,
                                    gradient_checkpointing=checkpointing)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=table,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": times, "losses": losses, "before_model_mb": before_model}


def matmul_gflops(kernel: str = "mkl") -> float:
    """This machine's fp32 matmul throughput, measured now (the ceiling for a training step). `mkl`: torch's
    mm, which runs MKL's sgemm on x86; `onednn`: the same product by oneDNN, which picks its kernel by the
    CPU's instruction sets where MKL also goes by its vendor (a faster oneDNN here is a lever for AMD)."""
    import torch

    if kernel == "onednn" and not torch.backends.mkldnn.is_available():
        return float("nan")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    product = (lambda: a @ b) if kernel == "mkl" else (
        lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    for _ in range(3):
        product()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        product()
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def subnormal_slowdown() -> float:
    """How many times slower a product runs when one factor holds subnormal numbers (below fp32's 1.2e-38):
    Intel CPUs take microcode assists for them (the AMD EPYC of earlier runs showed no such cost). A random-init
    model's softmax over a 32k vocabulary holds many (its loss starts near 94): its LM-head backward pays this."""
    import torch

    normal, b = torch.rand(256, 2048), torch.rand(2048, 512)
    subnormal = torch.full_like(normal, torch.finfo(torch.float32).tiny / 2)
    seconds = []
    for a in (normal, subnormal):
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        seconds.append(time.perf_counter() - t0)
    return seconds[1] / seconds[0]


def flush_subnormal() -> None:
    """Flush subnormal numbers to zero in every thread from here on (torch.set_flush_denormal, which the
    threads started after it inherit): what peftlab's loss does to its softmax, given to peft's whole process."""
    import torch

    torch.set_flush_denormal(True)
    tiny = torch.finfo(torch.float32).tiny
    if (torch.full((512, 512), tiny / 2) @ torch.ones(512, 512)).count_nonzero():
        raise SystemExit("torch.set_flush_denormal did not reach every thread of this process")


def child(args: argparse.Namespace) -> None:
    if args.flush_subnormal:  # first: before any thread pool starts
        flush_subnormal()
    if args.tool == "floor":  # what no faster kernel or leaner allocator changes: see write_results
        from profile_step import build_step, matmul_seconds_per_step, profiled

        from peftlab.measure.estimate import optimizer_bytes, saved_for_backward, weight_bytes

        step = build_step(args.method, args.batch)
        prof = profiled(step, steps=1)  # AdamW's state exists from here on
        with step.fast:
            kept, _ = saved_for_backward(step.model, step.batch, step.fast.loss)
        print("RESULT " + json.dumps({"matmul_s": matmul_seconds_per_step(prof, steps=1), "kept_mb": kept / 2**20,
                                      "weights_mb": weight_bytes(step.model) / 2**20,
                                      "optimizer_mb": optimizer_bytes(step.optimizer) / 2**20}))
        return
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        runner = run_peftlab if args.tool == "peftlab" else run_hf
        # "lora+gc": the same run with gradient checkpointing on both sides; PEFTLAB_ONLY's extras switch
        # peftlab's own options, peft has no such switch and runs as it is
        method, *extras = args.method.split("+")
        result = runner(data, method, args.batch, args.steps, Path(tmp) / "out", not args.no_dropout, extras)
    from peftlab.accel.allocator import allocator_in_use

    result["peak_rss_mb"] = peak_rss_mb()
    result["allocator"] = allocator_in_use()
    result["subnormals"] = "flushed" if args.flush_subnormal else "kept"
    print("RESULT " + json.dumps(result))


def model_flops_per_token(method: str) -> float:
    """Forward + backward FLOPs of the stock model per (source + target) token: LoRA has no weight gradients
    for frozen layers, full fine-tuning has them all."""
    method = method.split("+")[0]  # the model's FLOPs; recomputation is overhead
    import peft
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peftlab.models import load_model

    model, _ = load_model("random:flan-t5-small")
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"],
                                                           task_type="SEQ_2_SEQ_LM"))
    batch = {"input_ids": torch.randint(2, 32000, (1, SOURCE_TOKENS)),
             "labels": torch.randint(2, 32000, (1, TARGET_TOKENS))}
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops() / (SOURCE_TOKENS + TARGET_TOKENS)


def child_environment(preload: bool) -> dict[str, str]:
    """The system allocator, or the one `peftlab train` preloads on this machine (PEFTLAB_ALLOCATOR)."""
    from peftlab.accel.allocator import preload_environment

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"HF_HUB_OFFLINE": "1"}
    return (preload_environment(env) or env) if preload else env


def run_child(tool: str, method: str, batch: int, steps: int, data: Path, dropout: bool = True,
              preload: bool | None = None, flush: bool = False) -> dict:
    """`child` in its own process; its RESULT line. peftlab runs on the allocator its command picks, peft +
    Trainer on the system's (as their users run them) unless `preload` says otherwise; `flush`: the whole
    process flushes subnormal numbers to zero (`flush_subnormal`)."""
    cmd = [sys.executable, __file__, "--child", "--tool", tool, "--method", method, "--batch", str(batch),
           "--steps", str(steps), "--data", str(data), *([] if dropout else ["--no-dropout"]),
           *(["--flush-subnormal"] if flush else [])]
    env = child_environment(tool != "hf" if preload is None else preload)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tool} {method} batch {batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def measure(tool: str, method: str, batch: int, steps: int, data: Path, dropout: bool = True,
            preload: bool | None = None, flush: bool = False) -> dict:
    """One training run (`run_child`) with its median step time and throughput."""
    result = run_child(tool, method, batch, steps, data, dropout, preload, flush)
    timed = result["step_times"][1:] or result["step_times"]  # the first step warms up allocators
    result["median_step_s"] = statistics.median(timed)
    result["tokens_per_s"] = batch * (SOURCE_TOKENS + TARGET_TOKENS) / result["median_step_s"]
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median step time (the lower middle one for an even count): its figures stay together."""
    return sorted(runs, key=lambda r: r["median_step_s"])[(len(runs) - 1) // 2]


def ratio_cell(ours: dict, theirs: dict) -> str:
    ratio = f"{ours['median_step_s'] / theirs['median_step_s']:.2f}"
    spread = ours.get("time_ratios", [])
    return f"{ratio} ({spread[0]:.2f}-{spread[-1]:.2f})" if len(spread) > 1 else ratio


def versions() -> str:
    import peft
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"Python {platform.python_version()}, {cpu_model()}, {os.cpu_count()} cores")


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return name + (" (AVX-512)" if " avx512f" in info else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool")
    p.add_argument("--data")
    p.add_argument("--method", default="lora")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--methods", default=DEFAULTS["methods"], help="lora, full, and either with +gc (gradient "
                   "checkpointing on both sides), +redraw (peftlab's run.redraw_masks) or +recompute (peftlab's "
                   "run.recompute_linear): extra rows, not in the headline")
    p.add_argument("--batches", default=DEFAULTS["batches"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--trajectory-steps", type=int, default=DEFAULTS["trajectory_steps"],
                   help="loss-trajectory check length (0: skip)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="interleaved peftlab/peft pairs per "
                   "row; the table shows each tool's median run and the range of the pairs' time ratios")
    p.add_argument("--no-dropout", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flush-subnormal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    if args.child:
        return child(args)
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data, rows_8 = Path(tmp) / "data.jsonl", Path(tmp) / "eight.jsonl"
        make_data(data, 40 * 32)
        make_data(rows_8, 8)
        peak, onednn_peak, slowdown = matmul_gflops(), matmul_gflops("onednn"), subnormal_slowdown()
        flops = {method: model_flops_per_token(method) for method in methods}
        rows, trajectories, same_allocator = [], [], []
        peft_runs: dict[tuple[str, int], list[dict]] = {}  # peft's side of a peftlab-only extra is the plain row's
        for method in methods:
            plain = "+".join(part for part in method.split("+") if part not in PEFTLAB_ONLY)
            for batch in map(int, args.batches.split(",")):
                # interleaved pairs, so a slow spell of this shared machine hits both tools alike
                pairs = [(measure("peftlab", method, batch, args.steps, data),
                          peft_runs[plain, batch][i] if (plain, batch) in peft_runs
                          else measure("hf", plain, batch, args.steps, data)) for i in range(args.repeats)]
                peft_runs.setdefault((plain, batch), [theirs for _, theirs in pairs])
                ours, theirs = (median_run([pair[i] for pair in pairs]) for i in (0, 1))
                ours["time_ratios"] = sorted(a["median_step_s"] / b["median_step_s"] for a, b in pairs)
                if method in TIME_TARGETS:
                    ours["floor"] = run_child("floor", method, batch, 1, data)
                rows.append((method, batch, ours, theirs))
                print(f"{method} b{batch}: peftlab {ours['median_step_s']:.2f}s {ours['peak_rss_mb']:.0f}MB | "
                      f"peft+Trainer {theirs['median_step_s']:.2f}s {theirs['peak_rss_mb']:.0f}MB", flush=True)
            largest = max(map(int, args.batches.split(",")))
            if plain != method:  # peft's side is the plain row's again
                continue
            # how much of the gap is the allocator, and then the subnormal flush: peft with them too
            for flush in (False, True):
                if ours["allocator"] != "system" or flush:
                    same_allocator.append((method, largest, measure("hf", method, largest, args.steps, data,
                                                                    preload=True, flush=flush)))
            if args.trajectory_steps:
                pair = [measure(tool, method, 8, args.trajectory_steps, rows_8, dropout=False)["losses"]
                        for tool in ("peftlab", "hf")]
                trajectories.append((method, *pair))
    write_results(Path(args.output), rows, trajectories, same_allocator, (peak, onednn_peak), slowdown, flops, args)


def memory_floor_line(rows) -> str:
    """What peftlab's peak RSS cannot go below without recomputing more (gradient checkpointing): the process
    before the model, the weights, AdamW's state and what backward keeps, all alive at the end of the forward
    pass; against peft's peak and the issue's target."""
    floors = []
    for method, batch, ours, theirs in rows:
        if "floor" not in ours:
            continue
        f = ours["floor"]
        total = ours["before_model_mb"] + f["weights_mb"] + f["optimizer_mb"] + f["kept_mb"]
        floors.append(f"{method} b{batch}: {ours['before_model_mb']:.0f} + {f['weights_mb']:.0f} + "
                      f"{f['optimizer_mb']:.0f} + {f['kept_mb']:.0f} = {total:,.0f} MB, "
                      f"{total / theirs['peak_rss_mb']:.2f} of peft's peak (target {MEMORY_TARGETS[method]}; "
                      f"peftlab's peak {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f})")
    return ("Memory floor: the peak RSS peftlab cannot go below without recomputing more (gradient "
            "checkpointing, redrawn dropout masks or recomputed linear outputs, the extra rows): its RSS before "
            "the model + weights + AdamW state + what backward keeps (saved-tensor hooks, one forward pass; "
            "`recompute.recomputing()` already applied), all alive when the forward pass ends: "
            + "; ".join(floors) + ".")


def cpu_vendor() -> str:
    """Intel, AMD, ...: the ratios differ by vendor (Intel multiplies subnormal numbers ~100x slower, and peft's
    backward multiplies many), so each keeps its own sections in bench/RESULTS.md."""
    return cpu_model().split()[0].removesuffix("(R)")


def section_heading(repeats: int) -> str:
    """Where bench/RESULTS.md keeps a run's figures: one section per CPU vendor for single runs, one per
    vendor and pair count."""
    main = f"Training step on {cpu_vendor()}: peftlab vs HF peft + Seq2SeqTrainer"
    return main if repeats == 1 else f"{main}, {repeats} interleaved pairs"


def linear_products() -> str:
    """What `run.linear_backend=auto` (peftlab's default, the bench's) takes on this machine."""
    from peftlab.accel.products import wants_onednn

    return ("oneDNN's (run.linear_backend=auto on a CPU not made by Intel; weight gradients by torch's mm)"
            if wants_onednn("auto") else "torch's mm (run.linear_backend=auto on an Intel CPU), as peft's")


def write_results(path: Path, rows, trajectories, same_allocator, peaks: tuple[float, float], slowdown: float,
                  flops: dict, args) -> None:
    mkl_peak, onednn_peak = peaks
    peak = max(peaks)  # the machine's best fp32 GEMM: peftlab's products run on oneDNN where it is the faster
    command = (f"python bench/run.py --methods {args.methods} --batches {args.batches} --steps {args.steps} "
               f"--trajectory-steps {args.trajectory_steps}" + (f" --repeats {args.repeats}" if args.repeats > 1
                                                                else ""))
    is_make_bench = all(getattr(args, name) == value for name, value in DEFAULTS.items())
    lines = [f"Reproduce: `{command}`" + (" (or `make bench`)" if is_make_bench else "") + f". Machine: {versions()}. "
             f"fp32 matmul peak measured in the same run: {peak:.0f} GFLOP/s, the faster of torch's mm (MKL: "
             f"{mkl_peak:.0f} GFLOP/s) and the same product by oneDNN ({onednn_peak:.0f} GFLOP/s); a product with "
             f"a subnormal factor: x{slowdown:.0f} slower (peftlab's loss flushes its softmax's subnormals; peft's "
             "backward multiplies them: see the rows with peft flushed too).",
             f"Model `random:flan-t5-small`, {SOURCE_TOKENS} source + {TARGET_TOKENS} target tokens, LoRA r=8 "
             f"alpha=16 on q,v (dropout 0.05), T5 dropout 0.1, AdamW, fp32. Median of steps 2..{args.steps}"
             + (f", of each tool's median run over {args.repeats} interleaved pairs (the time ratio's range over "
                "the pairs in brackets)" if args.repeats > 1 else "") + "; "
             f"peak RSS of the whole process. Allocator: peftlab {rows[0][2]['allocator']} (what `peftlab train` "
             f"preloads here, PEFTLAB_ALLOCATOR), peft + Trainer {rows[0][3]['allocator']} (as its users run "
             "it); the rows after the table give peft the same allocator. peftlab's linear products: "
             f"{linear_products()}.", "",
             "| method | batch | peftlab s/step | peft s/step | time ratio | peftlab tok/s | peft tok/s "
             "| peftlab GFLOP/s (% of peak) | peft GFLOP/s (% of peak) "
             "| peftlab peak RSS MB | peft peak RSS MB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, batch, ours, theirs in rows:
        achieved = [flops[method] * r["tokens_per_s"] / 1e9 for r in (ours, theirs)]
        lines.append(f"| {method} | {batch} | {ours['median_step_s']:.2f} | {theirs['median_step_s']:.2f} | "
                     f"{ratio_cell(ours, theirs)} | {ours['tokens_per_s']:.0f} | "
                     f"{theirs['tokens_per_s']:.0f} | {achieved[0]:.0f} ({achieved[0] / peak:.0%}) | "
                     f"{achieved[1]:.0f} ({achieved[1] / peak:.0%}) | {ours['peak_rss_mb']:.0f} | "
                     f"{theirs['peak_rss_mb']:.0f} | {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} |")
    floors = []
    for method, batch, ours, theirs in rows:  # the model's FLOPs at the measured peak: no step is faster
        at_peak = flops[method] * batch * (SOURCE_TOKENS + TARGET_TOKENS) / (peak * 1e9)
        target = TIME_TARGETS.get(method)
        needs = ""
        if target:
            budget = target * theirs["median_step_s"]
            needs = (f" (the {target} target allows {budget:.2f} s: {at_peak / budget:.0%} of peak over the whole "
                     f"step; our matrix products alone take {ours['floor']['matmul_s']:.2f} s, "
                     f"{ours['floor']['matmul_s'] / budget:.0%}"
                     " of it)")
        floors.append(f"{method} b{batch}: {at_peak / theirs['median_step_s']:.2f}{needs}")
    lines += ["", "Floor: the time ratio peftlab would reach if every FLOP of its step ran at the matmul peak "
              "measured above (the step's FLOPs / peak, over peft's step time), and how much of the time target's "
              "budget peftlab's matrix products alone use (self time of mm, bmm and addmm in one profiled step, "
              "`bench/profile_step.py`): " + "; ".join(floors) + "."]
    lines += ["", memory_floor_line(rows)]
    above = [f"{m} b{b}: {o['before_model_mb']:.0f} / {t['before_model_mb']:.0f} MB, the rest "
             f"{(o['peak_rss_mb'] - o['before_model_mb']) / (t['peak_rss_mb'] - t['before_model_mb']):.2f}"
             for m, b, o, t in rows]
    lines += ["", "Peak RSS before the model loads (the interpreter and the imported libraries: torch, transformers, "
              "datasets; peft and the Trainer's on their side), peftlab / peft, and the memory ratio of what each "
              "peak holds above it: " + "; ".join(above) + ". `python bench/profile_step.py` splits peftlab's "
              "live tensors at the peak into weights, optimizer state, gradients and the rest."]
    plain_peft = {(m, b): theirs["peak_rss_mb"] for m, b, _, theirs in rows}
    ours = {(m, b): o for m, b, o, _ in rows}
    against_plain = [f"{m} batch {b}: {o['peak_rss_mb'] / plain_peft[m.removesuffix('+gc'), b]:.2f}"
                     for m, b, o, _ in rows if m.endswith("+gc") and (m.removesuffix("+gc"), b) in plain_peft]
    if against_plain:
        lines += ["", "With gradient checkpointing, peftlab's peak against peft's without it (the issue's "
                  "LoRA target is <= 0.25): " + "; ".join(against_plain) + "."]
    for extra, (key, what) in PEFTLAB_ONLY.items():
        changed = [f"{m} batch {b}: peak {o['peak_rss_mb'] - ours[plain, b]['peak_rss_mb']:+.0f} MB, step time "
                   f"x{o['median_step_s'] / ours[plain, b]['median_step_s']:.2f}, against peft's peak "
                   f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
                   for m, b, o, t in rows if (plain := m.removesuffix(f"+{extra}"), b) in ours and plain != m]
        if changed:
            lines += ["", f"Rows with +{extra}: peftlab with `{key}` ({what}; peft as in the plain row), against "
                      "peftlab's plain row in the same run: " + "; ".join(changed) + "."]
    if same_allocator:
        lines += ["", "peft + Trainer given what peftlab's speed owes least to its own code: its allocator "
                  "(preloaded), then also its flush of subnormal numbers (torch.set_flush_denormal for peft's "
                  "whole process, which flushes more than peftlab's loss does): what is left of the gap without "
                  "them.", "", "| method | batch | allocator | subnormals | peft s/step | peft peak RSS MB "
                  "| time ratio | memory ratio |", "|---|---|---|---|---|---|---|---|"]
        for method, batch, theirs in same_allocator:
            mine = ours[method, batch]
            lines.append(f"| {method} | {batch} | {theirs['allocator']} | {theirs['subnormals']} | "
                         f"{theirs['median_step_s']:.2f} | {theirs['peak_rss_mb']:.0f} | "
                         f"{mine['median_step_s'] / theirs['median_step_s']:.2f} | "
                         f"{mine['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} |")
        same = {(m, b): theirs for m, b, theirs in same_allocator if theirs["subnormals"] == "kept"}
        gc_rows = [f"{m} batch {b}: {o['peak_rss_mb'] / same[m.removesuffix('+gc'), b]['peak_rss_mb']:.2f}"
                   for (m, b), o in ours.items() if m.endswith("+gc") and (m.removesuffix("+gc"), b) in same]
        if gc_rows:
            lines += ["", "With gradient checkpointing against peft's without it, same allocator: "
                      + "; ".join(gc_rows) + "."]
    if trajectories:
        lines += ["", f"Loss trajectory, dropout off, batch 8 (the same 8 rows every step), "
                  f"{args.trajectory_steps} steps: largest relative difference between the tools' logged losses "
                  "(target <= 1e-4).", "", "| method | max relative difference | first loss peftlab / peft "
                  "| last loss peftlab / peft | within 1e-4 |", "|---|---|---|---|---|"]
        for method, ours, theirs in trajectories:
            worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))
            lines.append(f"| {method} | {worst:.1e} | {ours[0]:.6f} / {theirs[0]:.6f} | {ours[-1]:.6f} / "
                         f"{theirs[-1]:.6f} | {'yes' if worst <= 1e-4 else 'NO'} |")
    if args.repeats > 1:  # its own section: the single-run table (make bench) stays
        lines.insert(0, "One run's ratio moves by about ±0.1 on this shared machine, so these rows are measured as "
                        "interleaved peftlab/peft pairs:\n")
    update_section(section_heading(args.repeats), "\n".join(lines), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
