"""`peftlab study seed`: the seed study's three experiments in one command, our figures beside the seed's.

(a) trainable parameters of LoRA on q,v with alpha = 2r, r = 4, 8, 16, 32 (exact, the lines peft prints);
(b) r = 8 with alpha 4, 8, 16, 32: grad_norm curves and the ratio of first-logged grad norms per doubling;
(c) peak training memory of full fine-tuning against LoRA at batch 32.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.data.synth import summary_rows, write_jsonl
from peftlab.measure.sizes import trainable_line
from peftlab.methods import LoraConfig
from peftlab.methods.inject import apply, remove_adapter
from peftlab.models import load_model
from peftlab.study.report import report
from peftlab.study.sweep import markdown_table, read_metrics, sweep

# The seed's own figures (google/flan-t5-small, HF peft + Trainer; memory on an M4 MacBook Pro, MPS).
SEED_TRAINABLE_LINES = {
    4: "trainable params: 172,032 || all params: 77,133,184 || trainable%: 0.2230",
    8: "trainable params: 344,064 || all params: 77,305,216 || trainable%: 0.4451",
    16: "trainable params: 688,128 || all params: 77,649,280 || trainable%: 0.8862",
    32: "trainable params: 1,376,256 || all params: 78,337,408 || trainable%: 1.7568",
}
SEED_GRAD_NORMS = {  # r = 8: grad_norm at the three logged steps, per alpha
    4: [0.6093101501464844, 0.9116100072860718, 1.1311554908752441],
    8: [1.3949666023254395, 1.6945232152938843, 2.20668625831604],
    16: [2.7735562324523926, 3.5233919620513916, 4.484832763671875],
    32: [5.783611297607422, 6.987475872039795, 9.144457817077637],
}
SEED_MEMORY_GB = {"full": 37.60, "lora": 28.0}  # batch 32


def trainable_lines(model_name: str = "random:flan-t5-small", ranks=(4, 8, 16, 32)) -> dict[int, str]:
    """Experiment (a): peft's trainable-parameter line per rank (one adapter at a time on one model)."""
    model, _ = load_model(model_name)
    lines = {}
    for r in ranks:
        apply(model, LoraConfig(r=r, alpha=2 * r, targets=["q", "v"]), adapter=f"r{r}")
        lines[r] = trainable_line(model)
        remove_adapter(model, f"r{r}")
    return lines


def run_study(output: str | Path, model: str = "random:flan-t5-small", parts: str = "abc", steps: int = 30,
              batch_size: int = 8, memory_batch_size: int = 32, memory_steps: int = 3, source_len: int = 128,
              target_len: int = 64) -> Path:
    """Run the chosen parts into `output` (finished runs are reused) and write report.md / report.html."""
    out = Path(output)
    sections, run_dirs = [], []
    if "a" in parts:
        sections.append(_part_a(model))
    common = [f"model.name={model}", "data.input_column=dialogue", "data.target_column=summary",
              f"data.max_source_length={source_len}", f"data.max_target_length={target_len}", "run.seed=0",
              "run.eval_before=false"]
    if "b" in parts:
        data = write_jsonl(summary_rows(40 * batch_size, source_len, target_len, seed=0), out / "data" / "b.jsonl")
        rows = sweep(None, ["r=8", "alpha=4,8,16,32"], out / "alpha",
                     [*common, f"data.train={data}", f"run.batch_size={batch_size}", f"run.max_steps={steps}",
                      f"run.logging_steps={max(1, steps // 3)}", "optim.lr=5e-4", "optim.warmup_steps=0"])
        sections.append(_part_b(out / "alpha", rows))
        run_dirs.append(out / "alpha")
    if "c" in parts:
        data = write_jsonl(summary_rows(memory_batch_size * (memory_steps + 1), source_len, target_len, seed=1),
                           out / "data" / "c.jsonl")
        rows = sweep(None, ["method=full,lora", "r=8", "alpha=16"], out / "memory",
                     [*common, f"data.train={data}", f"run.batch_size={memory_batch_size}",
                      f"run.max_steps={memory_steps}", "run.logging_steps=1", "data.validation_fraction=0.01"])
        sections.append(_part_c(out / "memory", rows))
        run_dirs.append(out / "memory")
    preamble = "\n\n".join(sections)
    if not run_dirs:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# The seed study with peftlab\n\n{preamble}\n")
        print(preamble)
        return out / "report.md"
    path = report(run_dirs, out, title=f"The seed study with peftlab ({model})", preamble=preamble)
    print(preamble)
    print(f"\nreport: {path}")
    return path


def _part_a(model: str) -> str:
    ours = trainable_lines(model)
    rows = [{"r": r, "alpha": 2 * r, "peftlab": ours[r], "seed": SEED_TRAINABLE_LINES[r],
             "equal": ours[r] == SEED_TRAINABLE_LINES[r]} for r in ours]
    return "## (a) Trainable parameters, LoRA on q,v, alpha = 2r\n\n" + markdown_table(
        rows, ["r", "alpha", "peftlab", "seed", "equal"])


def _part_b(sweep_dir: Path, rows) -> str:
    first = {}
    for row in rows:
        logs = [r for r in read_metrics(sweep_dir / row["point"]) if "grad_norm" in r]
        first[int(row["alpha"])] = logs[0]["grad_norm"]
    alphas = sorted(first)
    table = [{"alpha": a, "peftlab first grad_norm": round(first[a], 4),
              "peftlab ratio to alpha/2": round(first[a] / first[a // 2], 3) if a // 2 in first else "",
              "seed first grad_norm": round(SEED_GRAD_NORMS[a][0], 4) if a in SEED_GRAD_NORMS else "",
              "seed ratio to alpha/2": round(SEED_GRAD_NORMS[a][0] / SEED_GRAD_NORMS[a // 2][0], 3)
              if a in SEED_GRAD_NORMS and a // 2 in SEED_GRAD_NORMS else ""} for a in alphas]
    return ("## (b) r = 8, alpha 4 to 32: first logged grad_norm (before clipping)\n\nLoRA's update scales with "
            "alpha / r, so each doubling of alpha should about double the gradient norm.\n\n"
            + markdown_table(table, list(table[0])))


def _part_c(sweep_dir: Path, rows) -> str:
    table = []
    for row in rows:
        results = json.loads((sweep_dir / row["point"] / "results.json").read_text())
        above = results["peak_memory_mb"] - results["baseline_memory_mb"]
        table.append({"method": row["method"], "peak memory MB": row["peak_memory_mb"],
                      "above baseline MB": round(above, 1), "seed GB": SEED_MEMORY_GB[row["method"]]})
    by = {t["method"]: t for t in table}
    ratio = by["lora"]["above baseline MB"] / by["full"]["above baseline MB"] if len(by) == 2 else float("nan")
    seed_ratio = SEED_MEMORY_GB["lora"] / SEED_MEMORY_GB["full"]
    return ("## (c) Peak training memory, full fine-tuning against LoRA\n\n" + markdown_table(table, list(table[0]))
            + f"\nLoRA / full (above baseline): peftlab {ratio:.2f}, seed {seed_ratio:.2f}. The seed measured "
            "on an M4 MacBook Pro (MPS); ours is this process's RSS peak.\n")
