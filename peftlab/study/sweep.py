"""`peftlab sweep`: a grid of training runs, each in its own directory and process, then one summary.

`--grid r=4,8,16,32 --grid alpha=2r --grid method=full,lora`: a key takes a list of values or a multiple
of another grid key (`alpha=2r`). Each point runs `peftlab train` in a fresh process (so its peak memory
is its own); a point whose results.json exists is skipped, so re-running a sweep resumes it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.eval.metrics import PICK_METRIC
from peftlab.io import holds_run, load_yaml, output_lock, refuse_run_output, write_text
from peftlab.methods import METHODS
from peftlab.models import resolve_task
from peftlab.train.config import TrainConfig, changed_settings, full_key, load_config, method_default
from peftlab.train.monitor import read_log

ALIASES = {"method": "method.name", "rank": "method.r"}
DERIVED = re.compile(r"^(\d*\.?\d*)\s*\*?\s*([A-Za-z_][\w.]*)$")  # 2r, 0.5*r, r
PICK_TOLERANCE = 0.01  # a run this close (relative) to the best evaluation counts as just as good
SUMMARY_COLUMNS = ["point", "method", "r", "alpha", "trainable_params", "trainable_pct", "peak_memory_mb",
                   "step_time_s", "tokens_per_s", "final_loss", "eval_metric", "eval_value", "model", "data"]


def resolve_key(key: str) -> str:
    """A full dotted config key for a grid key (`r` -> `method.r`); unknown keys name the closest."""
    return full_key(ALIASES.get(key, key))


@dataclass
class Grid:
    values: dict[str, list[str]]  # full key -> values
    derived: dict[str, tuple[float, str]]  # full key -> (factor, full key it multiplies)

    def points(self) -> list[dict[str, Any]]:
        """Every combination, with derived keys filled in; a method setting the point's method does not have is
        dropped (rank and alpha for full fine-tuning or IA3)."""
        keys = list(self.values)
        seen, points = set(), []
        for combo in itertools.product(*(self.values[k] for k in keys)):
            point: dict[str, Any] = dict(zip(keys, combo, strict=True))
            for key, (factor, source) in self.derived.items():
                point[key] = _number(factor * float(point[source]))
            if "method.name" in point:
                own = METHODS[point["method.name"]].field_names() if point["method.name"] in METHODS else set()
                point = {k: v for k, v in point.items()
                         if not k.startswith("method.") or k == "method.name" or k.split(".")[1] in own}
            name = point_name(point)
            if name not in seen:
                seen.add(name)
                points.append(point)
        return points


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def parse_grid(specs: list[str]) -> Grid:
    if not specs:
        raise PeftlabError("empty grid: pass at least one --grid KEY=V1,V2 (e.g. --grid r=4,8,16,32)")
    values, derived = {}, {}
    raw = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not text.strip():
            raise PeftlabError(f"--grid {spec!r} has no values: write KEY=V1,V2,... (e.g. r=4,8,16,32)")
        full = resolve_key(key.strip())
        if any(k == full for k, _ in raw):
            raise PeftlabError(f"--grid names {full} twice: give all its values in one, e.g. --grid "
                               f"{key.strip()}=4,8")
        raw.append((full, [v.strip() for v in text.split(",") if v.strip()]))
    keys = {k for k, _ in raw}
    for key, items in raw:
        match = DERIVED.match(items[0]) if len(items) == 1 else None
        source = match and ALIASES.get(match.group(2), match.group(2))
        source = source and next((k for k in keys if k == source or k.split(".")[-1] == source), None)
        if source and source != key:
            derived[key] = (float(match.group(1) or 1), source)
        elif match and match.group(1):
            raise PeftlabError(f"--grid {key}={items[0]} refers to {match.group(2)!r}, which is not in the grid: "
                               f"add --grid {match.group(2)}=V1,V2,...")
        else:
            values[key] = items
    for key, (_, source) in derived.items():
        if source in derived:
            raise PeftlabError(f"--grid {key.split('.')[-1]} derives from {source.split('.')[-1]}, which is derived "
                               "itself: give one of them a list of values (e.g. r=4,8 and alpha=2r)")
    return Grid(values, derived)


def point_name(point: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1] if k != 'method.name' else 'method'}={v}" for k, v in point.items())


def sweep(config: str | None, grids: list[str], output: str | Path, overrides: list[str] = ()) -> list[dict]:
    """Run every point not yet finished, then write summary.csv and summary.md; returns the summary rows."""
    grid = parse_grid(grids)
    fixed = dict(o.split("=", 1) for o in overrides)
    base = load_config(config, fixed)  # checks the base config once
    points = grid.points()
    for point in points:
        load_config(config, {**fixed, **point}).validate()
    out, settings = Path(output), base.to_dict()
    check_study_output(out, "--output")
    check_same_sweep(out, settings)
    with output_lock(out, "sweep"):
        out.mkdir(parents=True, exist_ok=True)
        return _run_sweep(config, grids, out, overrides, settings, points)


def check_study_output(out: Path, flag: str) -> None:
    """A sweep (or a d90 search) writes one run directory per point into its output, named `key=value,...`:
    refuse an output that is or lies inside a training run, or that holds runs of something else."""
    refuse_run_output(out, flag, may_hold_runs=True)
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"{flag} {out} is a file, not a directory: choose another {flag}")
    others = [p for p in (out.iterdir() if out.is_dir() else []) if "=" not in p.name and holds_run(p)]
    if others:
        raise PeftlabError(f"{flag} {out} holds the training run {others[0]}, which is not a point of a study: "
                           f"choose another {flag}")


def _run_sweep(config: str | None, grids: list[str], out: Path, overrides: list[str], settings: dict,
               points: list[dict[str, Any]]) -> list[dict]:
    write_text(out / "sweep.json", json.dumps({"config": settings, "grid": grids, "points": points}, indent=2))
    for i, point in enumerate(points, 1):
        run_point(config, point, out, overrides, f"[{i}/{len(points)}] ")
    rows = [summary_row(out / point_name(p)) for p in points]
    write_summary(out, rows)
    return rows


def check_same_sweep(out: Path, settings: dict[str, dict]) -> None:
    """A sweep re-run into its directory resumes it (finished points are skipped, new grid points run):
    refuse it when the settings outside the grid changed, since the finished points would not follow them."""
    try:
        saved = json.loads((out / "sweep.json").read_text())["config"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError) as e:
        raise PeftlabError(f"{out / 'sweep.json'} cannot be read ({e}): use another --output") from None
    defaults = TrainConfig().to_dict()  # a setting newer than the saved sweep: it ran as its default then
    saved = {section: {**defaults.get(section, {}), **values} for section, values in saved.items()}
    if changed := changed_settings(saved, settings, list(settings)):
        raise PeftlabError(f"{out} holds a sweep of other settings ({'; '.join(changed)}): its finished points "
                           f"would be reused as they are; use another --output, or delete {out} to run it anew")


def run_point(config: str | None, point: dict[str, Any], out: Path, overrides: list[str] = (),
              label: str = "") -> Path:
    """Train one point in its own process under out/<point name>, unless it finished earlier."""
    run_dir = out / point_name(point)
    if (run_dir / "results.json").is_file():
        print(f"{label}{run_dir.name}: done earlier, skipped")
        return run_dir
    print(f"{label}{run_dir.name}", flush=True)
    command = [sys.executable, "-m", "peftlab", "train", "--output", str(run_dir), "--overwrite",
               *(["--config", config] if config else []), *overrides, *(f"{k}={v}" for k, v in point.items())]
    if subprocess.call(command) != 0:
        raise PeftlabError(f"point {run_dir.name} failed (its output is above); fix it and re-run: "
                           "finished points are skipped")
    return run_dir


def summary_row(run_dir: Path) -> dict[str, Any]:
    """One run's figures, read from what it wrote (config.yaml, results.json, metrics.jsonl)."""
    config = load_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"), str(run_dir / "config.yaml"))
    results = json.loads((run_dir / "results.json").read_text())
    logs = [r for r in read_metrics(run_dir) if "loss" in r]
    method = config["method"]["name"]
    task = config["model"].get("task") or resolve_task(config["model"]["name"])
    evaluated = results["eval_after"] or {}
    metric = next((k for k in (f"eval_{PICK_METRIC[task]}", "eval_accuracy", "eval_loss") if k in evaluated), None)
    ranked = method in METHODS and "r" in METHODS[method].field_names()  # a method with a rank and an alpha
    return {"point": run_dir.name, "method": method,
            "r": config["method"].get("r") or method_default("r", method) if ranked else "",
            "alpha": config["method"].get("alpha") or method_default("alpha", method) if ranked else "",
            "trainable_params": results["trainable_params"],
            "trainable_pct": round(100 * results["trainable_params"] / results["all_params"], 4),
            "peak_memory_mb": round(results["peak_memory_mb"], 1),
            "step_time_s": round(statistics.median(r["step_time_s"] for r in logs), 4),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in logs), 1),
            "final_loss": round(logs[-1]["loss"], 4), "eval_metric": metric or "",
            "eval_value": round(results["eval_after"][metric], 4) if metric else "",
            "model": config["model"]["name"], "data": config["data"]["train"]}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_log(run_dir / "metrics.jsonl")


def pick(rows: list[dict[str, Any]], tolerance: float = PICK_TOLERANCE) -> str | None:
    """Which setting to pick: the best evaluation, and the run with the fewest trainable parameters (then the
    least memory) whose evaluation is within `tolerance` (relative) of it. None without a common metric; a "no
    pick" line for runs of different models or data."""
    metrics = {r["eval_metric"] for r in rows}
    if len(rows) < 2 or len(metrics) != 1 or any(r["eval_value"] == "" for r in rows):
        return None
    if len({(r.get("model"), r.get("data")) for r in rows}) > 1:
        return ("No pick: these runs train different models or data, so their evaluations do not compare; "
                "report the runs of one model on one dataset together.")
    metric = metrics.pop()
    sign = -1 if metric == "eval_loss" else 1  # loss: lower is better; accuracy, ROUGE: higher
    best = max(rows, key=lambda r: sign * r["eval_value"])
    close = [r for r in rows if sign * (best["eval_value"] - r["eval_value"]) <= tolerance * abs(best["eval_value"])]
    lean = min(close, key=lambda r: (r["trainable_params"], r["peak_memory_mb"]))

    def described(r):
        return (f"{r['point']} ({metric} {r['eval_value']}, {r['trainable_params']:,} trainable parameters, "
                f"{r['peak_memory_mb']} MB peak, {r['step_time_s']} s/step)")

    within = f"within {tolerance:.0%} of it"
    caveat = " (One run per setting: a difference smaller than the spread between seeds is noise.)"
    if lean is best:
        return f"Pick {described(best)}: the best {metric}, and no run {within} trains fewer parameters.{caveat}"
    return (f"Best {metric}: {described(best)}. Pick {described(lean)}: {within}, with the fewest trainable "
            f"parameters.{caveat}")


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buffer.getvalue())
    advice = pick(rows)
    write_text(out / "summary.md", markdown_table(rows, SUMMARY_COLUMNS) + (f"\n{advice}\n" if advice else ""))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{row.get(c, '')}" for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
