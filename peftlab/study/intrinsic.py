"""`peftlab intrinsic-dim`: the smallest subspace dimension d whose fine-tuning reaches a share (90%) of
full fine-tuning's metric (d90; Aghajanyan et al. 2020). From --d-start, doubling until the target is met
(or halving while it is met), then bisection (in log space) between the last miss and the first hit.
Each d is a run of its own (resumable: finished runs are skipped); writes curve.csv, curve.png and
result.json."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.io import atomic_write, output_lock, write_text
from peftlab.study.sweep import check_study_output, run_point, summary_row


def search(evaluate: Callable[[int], float], threshold: float, d_start: int, d_max: int,
           precision: float = 0.25, d_min: int = 1) -> tuple[int | None, dict[int, float]]:
    """(smallest d found with evaluate(d) >= threshold, or None below d_max; every d tried and its metric).
    Halving stops at d_min (a hit there only bounds d90 from above). Bisection stops when the bracket
    [miss, hit] is within `precision` of hit."""
    if not 0 < d_min <= d_start <= d_max:
        raise PeftlabError(f"need 0 < --d-min <= --d-start <= --d-max, got {d_min}, {d_start} and {d_max}")
    curve: dict[int, float] = {}

    def reaches(d: int) -> bool:
        curve[d] = evaluate(d)
        return curve[d] >= threshold

    if reaches(d_start):  # halve until a miss: d_start may already be far above d90
        hit, d = d_start, d_start // 2
        while d >= d_min and reaches(d):
            hit, d = d, d // 2
        if d < d_min:
            return hit, curve
        miss = d
    else:
        miss, d = d_start, d_start * 2
        while d <= d_max and not reaches(d):
            miss, d = d, d * 2
        if d > d_max:
            return None, curve
        hit = d
    while hit - miss > max(1, precision * hit):
        middle = round(math.sqrt(miss * hit))
        if middle in (miss, hit):
            break
        if reaches(middle):
            hit = middle
        else:
            miss = middle
    return hit, curve


def intrinsic_dim(config: str | None, output: str | Path, overrides: list[str] = (), method: str = "said",
                  target: float = 0.9, full_metric: float | None = None, d_start: int = 16,
                  d_max: int = 1 << 20, precision: float = 0.25, d_min: int = 1) -> dict:
    if method not in ("said", "did"):
        raise PeftlabError(f"--method must be said or did, got {method!r}")
    if not 0 < target <= 1:
        raise PeftlabError(f"--target must be in (0, 1], got {target}")
    out = Path(output)
    check_study_output(out, "--output")
    with output_lock(out, "intrinsic-dim"):
        out.mkdir(parents=True, exist_ok=True)
        return _search_and_write(config, out, overrides, method, target, full_metric, d_start, d_max, precision,
                                 d_min)


def _search_and_write(config, out: Path, overrides, method: str, target: float, full_metric: float | None,
                      d_start: int, d_max: int, precision: float, d_min: int) -> dict:
    def metric_of(point: dict) -> tuple[str, float]:
        row = summary_row(run_point(config, point, out, overrides))
        if row["eval_metric"] != "eval_accuracy":
            raise PeftlabError("intrinsic-dim needs a metric where higher is better: use a classification task "
                               "(eval_accuracy)")
        return row["eval_metric"], float(row["eval_value"])

    if full_metric is None:
        full_metric = metric_of({"method.name": "full"})[1]
    threshold = target * full_metric
    d90, curve = search(lambda d: metric_of({"method.name": method, "method.d": d})[1], threshold, d_start, d_max,
                       precision, d_min)
    result = {"method": method, "target": target, "full_metric": full_metric, "threshold": threshold,
              "d": d90, "at_most": d90 is not None and d90 == min(curve),  # no miss below: an upper bound
              "curve": {str(d): m for d, m in sorted(curve.items())}}
    write_text(out / "result.json", json.dumps(result, indent=2))
    write_text(out / "curve.csv", "d,eval_accuracy\n" + "".join(f"{d},{m}\n" for d, m in sorted(curve.items())))
    figure = curve_figure(curve, full_metric, threshold, d90, method)
    atomic_write(out / "curve.png", lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    return result


def curve_figure(curve: dict[int, float], full_metric: float, threshold: float, d90: int | None, method: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ds = sorted(curve)
    ax.plot(ds, [curve[d] for d in ds], "o-", label=method.upper())
    ax.axhline(full_metric, color="gray", label="full fine-tuning")
    ax.axhline(threshold, color="gray", linestyle="--", label="target")
    if d90 is not None:
        ax.axvline(d90, color="tab:red", linestyle=":", label=f"d = {d90}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("eval accuracy")
    ax.legend()
    fig.tight_layout()
    return fig
