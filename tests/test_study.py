"""Sweeps, reports and the seed study."""

import json

import pytest
from matplotlib.image import AxesImage
from test_train import seq_rows

from peftlab.cli import main
from peftlab.data.synth import write_jsonl
from peftlab.errors import PeftlabError
from peftlab.study import report as report_module
from peftlab.study.seed import SEED_TRAINABLE_LINES, trainable_lines
from peftlab.study.sweep import parse_grid, pick, read_metrics, sweep


def test_grid_points_derived_keys_and_full_collapsed():
    grid = parse_grid(["r=4,8", "alpha=2r", "method=lora,full"])
    names = [",".join(f"{k}={v}" for k, v in p.items()) for p in grid.points()]
    assert names == ["method.r=4,method.name=lora,method.alpha=8", "method.name=full",
                     "method.r=8,method.name=lora,method.alpha=16"]


@pytest.mark.parametrize("specs, message", [
    ([], "empty grid"), (["r="], "has no values"), (["alhpa=4,8"], "did you mean 'method.alpha'"),
    (["alpha=2r"], "refers to 'r', which is not in the grid")])
def test_bad_grids_get_one_line_errors(specs, message):
    with pytest.raises(PeftlabError, match=message):
        parse_grid(specs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    data = write_jsonl(seq_rows(40), tmp / "data.jsonl")
    fixed = ["model.name=random:t5-tiny", f"data.train={data}", "data.input_column=dialogue",
             "data.target_column=summary", "run.max_steps=4", "run.logging_steps=2", "run.batch_size=8"]
    rows = sweep(None, ["r=2,4", "alpha=2r"], tmp / "sweep", fixed)
    return tmp / "sweep", rows, fixed


def test_summary_rows_match_each_runs_own_metrics(swept):
    directory, rows, _ = swept
    assert [r["point"] for r in rows] == ["r=2,alpha=4", "r=4,alpha=8"]
    for row in rows:
        run = directory / row["point"]
        results = json.loads((run / "results.json").read_text())
        logs = [r for r in read_metrics(run) if "loss" in r]
        assert row["trainable_params"] == results["trainable_params"]
        assert row["final_loss"] == round(logs[-1]["loss"], 4)
        assert row["eval_metric"] == "eval_rougeL"  # a seq2seq sweep is ranked by its task's metric, not the loss
        assert row["eval_value"] == round(results["eval_after"]["eval_rougeL"], 4)
        assert row["peak_memory_mb"] == round(max(r["peak_memory_mb"] for r in logs), 1)
    assert rows[1]["trainable_params"] == 2 * rows[0]["trainable_params"]  # LoRA params are linear in r
    csv_lines = (directory / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("point,method,r,alpha,trainable_params")


def test_sweep_resumes_without_rerunning_finished_points(swept, capsys):
    directory, rows, fixed = swept
    before = {r["point"]: (directory / r["point"] / "results.json").stat().st_mtime_ns for r in rows}
    assert sweep(None, ["r=2,4", "alpha=2r"], directory, fixed) == rows
    after = {r["point"]: (directory / r["point"] / "results.json").stat().st_mtime_ns for r in rows}
    assert before == after
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    sweep_json = (directory / "sweep.json").read_bytes()
    with pytest.raises(PeftlabError, match=r"holds a sweep of other settings \(run.max_steps 4 -> 6\): its finished "
                                           "points would be reused"):
        sweep(None, ["r=2,4", "alpha=2r"], directory, [*fixed, "run.max_steps=6"])
    assert (directory / "sweep.json").read_bytes() == sweep_json
    older = json.loads(sweep_json)  # as saved by a version without run.linear_backend: it ran as the default
    del older["config"]["run"]["linear_backend"]
    (directory / "sweep.json").write_text(json.dumps(older))
    assert sweep(None, ["r=2,4", "alpha=2r"], directory, fixed) == rows
    assert capsys.readouterr().out.count("done earlier, skipped") == 2


def test_report_files_and_figures(swept, tmp_path):
    directory, rows, _ = swept
    runs = report_module.find_runs([directory])
    assert [r.name for r in runs] == [r["point"] for r in rows]
    curves = report_module.curves_figure(runs)
    assert [len(ax.lines) for ax in curves.axes] == [2, 2]
    heat = report_module.heatmap_figure(runs[0])
    images = [a for ax in heat.axes for a in ax.get_children() if isinstance(a, AxesImage)]
    layers, steps, grid = report_module.grad_norm_grid(runs[0], "lora_A")
    assert len(images) == 2 and images[0].get_array().shape == (len(layers), len(steps)) == grid.shape
    assert len(layers) == 12 and steps == [2, 4]  # t5-tiny: q, v in 2 encoder + 2x2 decoder attention blocks
    assert len(report_module.params_figure(rows).axes[0].lines[0].get_xdata()) == 2
    assert len(report_module.memory_time_figure(rows).axes[0].patches) == 2
    html = report_module.report([directory], tmp_path / "report")
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["curves.png", "grad_norms_r=2_alpha=4.png", "grad_norms_r=4_alpha=8.png", "memory_time.png",
                    "params.png"]
    assert all((tmp_path / "report" / p).stat().st_size > 1000 for p in pngs)
    assert html.read_text().count("data:image/png;base64,") == len(pngs)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert all(f"]({p})" in markdown for p in pngs)
    assert f"**Which to pick.** {pick(rows)}" in markdown and "Which to pick." in html.read_text()


def row(point, metric, value, params, memory=500.0):
    return {"point": point, "eval_metric": metric, "eval_value": value, "trainable_params": params,
            "peak_memory_mb": memory, "step_time_s": 0.1}


def test_pick_names_the_leanest_run_within_the_tolerance_of_the_best():
    losses = [row("full", "eval_loss", 1.000, 10_000), row("r=4", "eval_loss", 1.009, 40),
              row("r=2", "eval_loss", 1.011, 20), row("r=8", "eval_loss", 1.005, 80)]
    advice = pick(losses)
    assert advice.startswith("Best eval_loss: full (eval_loss 1.0") and "Pick r=4 (eval_loss 1.009" in advice
    assert pick(losses, tolerance=0.02).split("Pick ")[1].startswith("r=2")  # 1.011 is within 2%
    accuracies = [row("full", "eval_accuracy", 0.80, 10_000), row("lora", "eval_accuracy", 0.90, 40)]
    assert pick(accuracies).startswith("Pick lora (eval_accuracy 0.9")  # higher is better: best and leanest
    tie = [row("a", "eval_loss", 1.0, 40, memory=600.0), row("b", "eval_loss", 1.0, 40, memory=550.0)]
    assert "Pick b " in pick(tie)  # equal parameters: less memory
    assert pick([losses[0], accuracies[1]]) is None  # no common metric to compare
    assert pick(losses[:1]) is None
    other_data = [{**r, "model": "random:t5-tiny", "data": f"d{i}.jsonl"} for i, r in enumerate(accuracies)]
    assert pick(other_data).startswith("No pick: these runs train different models or data")


def test_summary_says_which_to_pick(swept):
    directory, rows, _ = swept
    assert {(r["model"], r["data"]) for r in rows} == {("random:t5-tiny", str(directory.parent / "data.jsonl"))}
    assert pick(rows).startswith(("Pick ", "Best ")) and pick(rows) in (directory / "summary.md").read_text()


def test_report_without_runs_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_study_seed_part_a_prints_the_seeds_lines_exactly(tmp_path, capsys):
    assert trainable_lines("random:flan-t5-small") == SEED_TRAINABLE_LINES
    assert main(["study", "seed", "--parts", "a", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in SEED_TRAINABLE_LINES.values())
    assert "| True |" in (tmp_path / "report.md").read_text()


def test_a_sweep_of_every_kind_of_method_picks_by_rouge_and_reports(tmp_path):
    data = write_jsonl(seq_rows(40), tmp_path / "data.jsonl")
    fixed = ["model.name=random:t5-tiny", f"data.train={data}", "data.input_column=dialogue",
             "data.target_column=summary", "run.max_steps=2", "run.logging_steps=1", "run.batch_size=8",
             "run.eval_before=false"]
    rows = sweep(None, ["method=lora,ia3,prompt_tuning,full", "r=4"], tmp_path / "sweep", fixed)
    assert [r["point"] for r in rows] == ["method=lora,r=4", "method=ia3", "method=prompt_tuning", "method=full"]
    assert {r["eval_metric"] for r in rows} == {"eval_rougeL"} and [r["r"] for r in rows] == [4, "", "", ""]
    assert "the best eval_rougeL" in pick(rows) or "Best eval_rougeL" in pick(rows)
    assert main(["report", str(tmp_path / "sweep"), "-o", str(tmp_path / "report")]) == 0
    assert "eval_rougeL" in (tmp_path / "report" / "report.md").read_text()
