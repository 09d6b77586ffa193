"""`peftlab report DIR...`: plots of runs and sweeps (matplotlib PNGs), a Markdown and a self-contained
HTML report. Each figure function returns the matplotlib Figure, so what it draws can be checked."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.io import atomic_write, output_lock, refuse_run_output, write_text  # noqa: E402
from peftlab.methods import METHODS  # noqa: E402
from peftlab.study.sweep import SUMMARY_COLUMNS, markdown_table, pick, read_metrics, summary_row  # noqa: E402


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "results.json").is_file()


def find_runs(directories: list[str | Path]) -> list[Path]:
    """Finished runs: each directory given, or its subdirectories (a sweep)."""
    runs: list[Path] = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise PeftlabError(f"{directory} is not a directory: pass run or sweep directories")
        runs += [directory] if is_run(directory) else sorted(p for p in directory.iterdir() if is_run(p))
    if not runs:
        raise PeftlabError(f"no finished runs in {', '.join(map(str, directories))}: a run directory holds "
                           "metrics.jsonl and results.json (written by peftlab train or peftlab sweep)")
    return runs


def label(run: Path) -> str:
    return run.name


def curves_figure(runs: list[Path]) -> Figure:
    """Loss and grad_norm against step, one line per run on each of the two axes."""
    fig, (loss_ax, norm_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        logs = [r for r in read_metrics(run) if "loss" in r]
        steps = [r["step"] for r in logs]
        loss_ax.plot(steps, [r["loss"] for r in logs], marker=".", label=label(run))
        norm_ax.plot(steps, [r["grad_norm"] for r in logs], marker=".", label=label(run))
    for ax, name in ((loss_ax, "loss"), (norm_ax, "grad_norm (before clipping)")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    norm_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def grad_norm_grid(run: Path, tensor: str) -> tuple[list[str], list[int], np.ndarray]:
    """(layer names, steps, layers x steps gradient norms) of every adapter tensor named `tensor`."""
    logs = [r for r in read_metrics(run) if r.get("grad_norms")]
    layers = sorted({k for r in logs for k in r["grad_norms"] if k.endswith("." + tensor)}, key=_natural)
    grid = np.array([[r["grad_norms"].get(layer, np.nan) for r in logs] for layer in layers])
    return [layer.removesuffix("." + tensor) for layer in layers], [r["step"] for r in logs], grid


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def heatmap_figure(run: Path) -> Figure | None:
    """Per-layer gradient norms of lora_A and lora_B as layer x step heat maps; None without LoRA tensors."""
    grids = {t: grad_norm_grid(run, t) for t in ("lora_A", "lora_B")}
    if not any(len(layers) for layers, _, _ in grids.values()):
        return None
    rows = max(len(layers) for layers, _, _ in grids.values())
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.22 * rows))
    for ax, (tensor, (layers, steps, grid)) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        every = max(1, len(steps) // 12)
        ax.set_xticks(range(0, len(steps), every), steps[::every])
        ax.set_xlabel("step")
        ax.set_title(f"{run.name}: |grad| of {tensor}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def trains_base(row: dict[str, Any]) -> bool:
    """Whether a run's method trains the base itself (full fine-tuning), asked of the method."""
    method = METHODS.get(row["method"])
    return method is not None and method.trains_base


def params_figure(rows: list[dict[str, Any]]) -> Figure:
    """Trainable parameters against LoRA rank; full fine-tuning as a horizontal line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lora = sorted({(int(r["r"]), r["trainable_params"]) for r in rows if r["r"] != ""})  # methods with a rank
    if lora:
        ax.plot([r for r, _ in lora], [n for _, n in lora], marker="o", label="LoRA")
    for r in rows:
        if trains_base(r):
            ax.axhline(r["trainable_params"], color="gray", linestyle="--", label="full fine-tuning")
            break
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def memory_time_figure(rows: list[dict[str, Any]]) -> Figure:
    """Peak memory and median step time per run (full fine-tuning against LoRA), as bars."""
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["point"] for r in rows]
    colors = ["tab:gray" if trains_base(r) else "tab:blue" for r in rows]
    mem_ax.bar(names, [r["peak_memory_mb"] for r in rows], color=colors)
    time_ax.bar(names, [r["step_time_s"] for r in rows], color=colors)
    mem_ax.set_ylabel("peak memory (MB)")
    time_ax.set_ylabel("median step time (s)")
    for ax in (mem_ax, time_ax):
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def report(directories: list[str | Path], output: str | Path, title: str = "peftlab report",
           preamble: str = "") -> Path:
    """Write the PNGs, report.md and report.html into `output`; returns the HTML path."""
    runs = find_runs(directories)
    rows = [summary_row(run) for run in runs]
    out = Path(output)
    refuse_run_output(out, "-o")
    with output_lock(out, "report"):
        out.mkdir(parents=True, exist_ok=True)
        return _write_report(runs, rows, out, title, preamble)


def _write_report(runs: list[Path], rows: list[dict[str, Any]], out: Path, title: str, preamble: str) -> Path:
    figures = [("Loss and gradient norm", save_figure(curves_figure(runs), out / "curves.png"))]
    for run in runs:
        fig = heatmap_figure(run)
        if fig is not None:
            figures.append((f"Adapter gradient norms per layer: {run.name}",
                            save_figure(fig, out / f"grad_norms_{_slug(run.name)}.png")))
    figures.append(("Trainable parameters against rank", save_figure(params_figure(rows), out / "params.png")))
    figures.append(("Peak memory and step time", save_figure(memory_time_figure(rows), out / "memory_time.png")))
    table = markdown_table(rows, SUMMARY_COLUMNS)
    advice = pick(rows)
    markdown = [f"# {title}", "", preamble, "## Runs", "", table]
    markdown += [f"**Which to pick.** {advice}", ""] if advice else []
    markdown += [f"## {name}\n\n![{name}]({path.name})\n" for name, path in figures]
    write_text(out / "report.md", "\n".join(markdown))
    write_text(out / "report.html", _html(title, preamble, rows, figures, advice))
    return out / "report.html"


def _slug(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name)


def _html(title: str, preamble: str, rows: list[dict[str, Any]], figures: list[tuple[str, Path]],
          advice: str | None) -> str:
    """One file, images embedded as data URIs: it can be mailed or attached as it is."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in SUMMARY_COLUMNS)
                   + "</tr>" for r in rows)
    images = "".join(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(path.read_bytes()).decode()}'>" for name, path in figures)
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}pre{background:#f6f6f6}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><pre>{html.escape(preamble)}</pre>"
            f"<h2>Runs</h2><table><tr>{head}</tr>{body}</table>"
            + (f"<p><b>Which to pick.</b> {html.escape(advice)}</p>" if advice else "") + f"{images}</body></html>")
