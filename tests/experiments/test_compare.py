"""train.py compare: aggregation over seeds, report files, resume, argument errors."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from models_testing import tiny_config

import experiments.compare as compare
from experiments.compare import (
    RUN_CONFIG_FILE,
    SUMMARY_COLUMNS,
    ConfigResult,
    collect,
    compare_main,
    config_mismatch,
    default_config,
    effective_config,
    last_checkpoint,
    mean_std,
    report_figure,
    report_markdown,
    run_dir_for,
    summary_table,
    write_report,
)
from models.cli import main
from models.summary import SUMMARY_FILE
from train import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def _summary(gate: str, seed: int, loss: float, loads: list[list[float]], tokens_per_s: float):
    layers, train_layers = {}, {}
    for index, counts in enumerate(loads):
        mean = sum(counts) / len(counts)
        layers[f"layer{index}"] = {
            "tokens_per_expert": counts,
            "max_vio_global": (max(counts) - mean) / mean,
            "load_cv": statistics.pstdev(counts) / mean,
            "dead_expert_fraction": sum(c == 0 for c in counts) / len(counts),
            "active_experts_per_token": 2.0 + 0.5 * seed,
        }
        train_layers[f"layer{index}"] = {
            "max_vio_batch_mean": 0.1 * (seed + 1) + index,
            "max_vio_global": 0.0,
            "active_experts_per_token": 2.0,
            "batches": 5,
        }
    return {
        "gate": gate,
        "seed": seed,
        "num_experts": len(loads[0]),
        "k": 2,
        "global_step": 10,
        "max_steps": 10,
        "tokens_per_s": tokens_per_s,
        "finished": True,
        "train_curve": [
            {"step": 2, "loss": loss + 1.0 + seed},
            {"step": 4, "loss": loss + 0.7},
            {"step": 6, "loss": loss + 0.2 * seed},
        ],
        "val_curve": [{"step": 5, "loss": loss + 0.5}, {"step": 10, "loss": loss}],
        "final_val": {"step": 10, "loss": loss, "layers": layers, "train_layers": train_layers},
    }


def _write_runs(out: Path) -> list[Path]:
    runs = {
        "topk": [(2.0, [[10, 30, 0, 40]], 1000.0), (2.2, [[20, 20, 20, 20]], 1200.0)],
        "soft_topk": [(1.9, [[25, 15, 20, 20]], 800.0), (2.0, [[20, 20, 20, 20]], 900.0)],
    }
    configs = []
    for name, seeds in runs.items():
        configs.append(Path(f"{name}.yaml"))
        for seed, (loss, loads, speed) in enumerate(seeds):
            folder = out / name / f"seed{seed}" / "csv" / "version_0"
            folder.mkdir(parents=True)
            summary = _summary(name, seed, loss, loads, speed)
            (folder / SUMMARY_FILE).write_text(json.dumps(summary))
    return configs


def test_last_checkpoint_is_the_newest(tmp_path):
    assert last_checkpoint(tmp_path) is None
    old = tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "csv" / "version_1" / "checkpoints" / "last.ckpt"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_text("x")
    os.utime(old, (1, 1))
    assert last_checkpoint(tmp_path) == new


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_report_aggregates_over_seeds(tmp_path):
    configs = _write_runs(tmp_path)
    md_path, png_path = write_report(tmp_path, configs, [0, 1])
    text = md_path.read_text()
    assert png_path.stat().st_size > 10_000
    topk_row = next(line for line in text.splitlines() if line.startswith("| topk | topk |"))
    cells = [cell.strip() for cell in topk_row.strip("|").split("|")]
    assert cells[3] == f"2.1000 ± {statistics.stdev([2.0, 2.2]):.4f}"
    assert cells[4] == (
        f"{statistics.fmean([math.exp(2.0), math.exp(2.2)]):.3f} ± "
        f"{statistics.stdev([math.exp(2.0), math.exp(2.2)]):.3f}"
    )
    assert cells[5] == f"0.150 ± {statistics.stdev([0.1, 0.2]):.3f}"  # MaxVio_batch
    assert cells[6] == f"0.500 ± {statistics.stdev([1.0, 0.0]):.3f}"  # (40 - 20) / 20 and 0
    assert cells[7] == f"2.25 ± {statistics.stdev([2.0, 2.5]):.2f}"  # active experts / token
    assert cells[8] == f"1100 ± {statistics.stdev([1000.0, 1200.0]):.0f}"
    assert cells[10] == f"0.5 ± {statistics.stdev([1.0, 0.0]):.1f}"  # one dead expert, then none
    layer_row = next(line for line in text.splitlines() if line.startswith("| topk | layer0 |"))
    assert layer_row.startswith("| topk | layer0 | 0.150 ± 0.071 | 0.500 ± 0.707 |")
    delta_row = next(line for line in text.splitlines() if line.startswith("| soft_topk | -"))
    assert f"-0.1500 ± {statistics.stdev([-0.1, -0.2]):.4f}" in delta_row and "2/2" in delta_row
    assert json.loads((tmp_path / "report.json").read_text())["soft_topk"][1]["seed"] == 1


def test_report_skips_unfinished_runs(tmp_path):
    configs = _write_runs(tmp_path)
    path = tmp_path / "soft_topk" / "seed1" / "csv" / "version_0" / SUMMARY_FILE
    summary = json.loads(path.read_text())
    summary["finished"] = False
    path.write_text(json.dumps(summary))
    md_path, _ = write_report(tmp_path, configs, [0, 1])
    row = next(
        line
        for line in md_path.read_text().splitlines()
        if line.startswith("| soft_topk | soft_topk |")
    )
    assert "| 1 | 1.9000 |" in row  # one seed: the value alone


def test_report_markdown_without_runs_marks_missing_configs():
    text = report_markdown([ConfigResult("topk")], title="t", notes=[])
    assert "| topk | ? | 0 | n/a |" in text


def test_summary_table_marks_runs_without_training_batch_balance():
    """Summaries written before MaxVio_batch was recorded (or whose last validation was not at
    the last step) have no train_layers: n/a, not a crash."""
    summary = _summary("topk", 0, 2.0, [[1, 2, 3, 4]], 10.0)
    del summary["final_val"]["train_layers"]
    (_, _, row) = summary_table([ConfigResult("old", [summary])])
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5] == "n/a" and cells[6] != "n/a"


def _report_only_setup(tmp_path, monkeypatch) -> list[str]:
    """Real config files named as the runs of _write_runs; run matching skipped."""
    monkeypatch.chdir(tmp_path)
    configs = _write_runs(tmp_path)
    for config in configs:
        config.write_text("{}")
    monkeypatch.setattr(compare, "resolve_runs", lambda *args: {})
    return ["--configs", *map(str, configs), "--seeds", "2", "--out", str(tmp_path)]


def test_compare_prints_one_table_and_points_to_the_report(tmp_path, monkeypatch, capsys):
    compare_main([*_report_only_setup(tmp_path, monkeypatch), "--report_only"])
    out = capsys.readouterr().out
    assert out.count("| config |") == 1 and "| layer0 |" not in out  # one table
    assert "| " + " | ".join(SUMMARY_COLUMNS) + " |" in out
    assert "| topk | topk | 2 | 2.1000 ± 0.1414 |" in out and "| soft_topk | soft_topk |" in out
    assert "MaxVio_batch per training batch" in out  # the legend
    assert f"wrote {tmp_path / 'report.md'} (with the paired differences" in out


@pytest.mark.parametrize(
    "content",
    ['{"finished": tr', "[1, 2]", '{"finished": true, "final_val": {"loss": 1.0}}'],
    ids=["truncated", "not_an_object", "no_layers"],
)
@pytest.mark.parametrize("report_only", [False, True], ids=["run", "report_only"])
def test_a_corrupted_summary_is_one_error_line_naming_the_file(
    tmp_path, monkeypatch, capsys, content, report_only
):
    args = _report_only_setup(tmp_path, monkeypatch)
    bad = tmp_path / "soft_topk" / "seed1" / "csv" / "version_0" / SUMMARY_FILE
    bad.write_text(content)
    monkeypatch.setattr(
        "sys.argv", ["train.py", "compare", *args, *(["--report_only"] * report_only)]
    )
    with pytest.raises(SystemExit) as exit_:
        main(COMMANDS)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {bad} ") and line.endswith(
        f": delete {tmp_path / 'soft_topk' / 'seed1'} to run it again"
    )


def test_compare_refuses_two_configs_of_one_name(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "topk.yaml").write_text("{}")
    configs = [str(tmp_path / "a" / "topk.yaml"), str(tmp_path / "b" / "topk.yaml")]
    with pytest.raises(ValueError, match="two configs share a file name"):
        compare_main(["--configs", *configs, "--out", str(tmp_path / "o")])


def test_compare_runs_from_outside_the_checkout(corpus_dir, tmp_path):
    """`cd /tmp && python <checkout>/train.py compare ...`: the child `train.py fit` runs find
    the checkout's packages whatever the working directory (they once failed to import
    `models`)."""
    config = tiny_config(tmp_path, corpus_dir, gate="topk", max_steps=2, val_check_interval=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    command = [sys.executable, str(REPO / "train.py"), "compare", "--configs", str(config)]
    command += ["--seeds", "1", "--out", "out"]
    result = subprocess.run(
        command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| tiny | topk | 1 |" in result.stdout
    assert (elsewhere / "out" / "report.md").is_file()
    assert next((elsewhere / "out" / "tiny" / "seed0").glob(f"**/{SUMMARY_FILE}")).is_file()


def test_compare_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        compare_main(["--configs", str(tmp_path / "nope.yaml")])
    config = tmp_path / "a.yaml"
    config.write_text("{}")
    with pytest.raises(ValueError, match="--seeds=0"):
        compare_main(["--configs", str(config), "--seeds", "0"])
    with pytest.raises(ValueError, match="--threads=0 is not allowed"):
        compare_main(["--configs", str(config), "--threads", "0"])
    with pytest.raises(ValueError, match="no finished run"):
        compare_main(["--configs", str(config), "--out", str(tmp_path / "o"), "--report_only"])


@pytest.mark.slow
def test_compare_end_to_end_and_resume(corpus_dir, tmp_path, capsys):
    configs = [
        tiny_config(
            tmp_path,
            corpus_dir,
            gate="topk",
            max_steps=4,
            name="topk.yaml",
            moe={"aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        ),
        tiny_config(
            tmp_path,
            corpus_dir,
            gate="soft_topk",
            max_steps=4,
            name="soft.yaml",
            moe={"expert_bias": True, "bias_update_rate": 0.01},
        ),
    ]
    out = tmp_path / "cmp"
    args = [
        "--configs",
        *map(str, configs),
        "--seeds",
        "2",
        "--out",
        str(out),
        "--trainer.max_steps",
        "3",
    ]
    compare_main(args)
    text = (out / "report.md").read_text()
    assert "| topk | topk | 2 |" in text and "| soft | soft_topk | 2 |" in text
    assert (out / "report.png").is_file()
    summary = json.loads(next((out / "soft" / "seed1").glob(f"**/{SUMMARY_FILE}")).read_text())
    assert summary["global_step"] == 3 and summary["seed"] == 1  # the override reached the run
    first_out = capsys.readouterr().out  # progress of each run, with its place in the plan
    assert "[compare] topk seed 0 (1/4): step 3/3, training loss" in first_out
    assert "[compare] soft seed 1 (4/4): step 3/3, validation loss" in first_out
    compare_main(args)  # every run finished already: only the report is rebuilt
    assert capsys.readouterr().out.count("done already") == 4

    # An interrupted run (no finished summary) resumes from its last checkpoint.
    path = next((out / "topk" / "seed1").glob(f"**/{SUMMARY_FILE}"))
    interrupted = json.loads(path.read_text())
    path.write_text(json.dumps({**interrupted, "finished": False}))
    compare_main(args)
    assert capsys.readouterr().out.count("done already") == 3
    assert "--ckpt_path" in (out / "topk" / "seed1" / "train.log").read_text()
    resumed = json.loads(
        next((out / "topk" / "seed1").glob(f"csv/version_1/{SUMMARY_FILE}")).read_text()
    )
    assert resumed["finished"] and resumed["final_val"]["loss"] == interrupted["final_val"]["loss"]
    assert resumed["val_curve"] == interrupted["val_curve"]


def test_compare_reuses_a_run_only_with_the_same_effective_config(corpus_dir, tmp_path, capsys):
    config = tiny_config(tmp_path, corpus_dir, gate="topk", name="topk.yaml")
    out = tmp_path / "cmp"
    run_dir = run_dir_for(out, config, 0)
    folder = run_dir / "csv" / "version_0"
    folder.mkdir(parents=True)
    (folder / SUMMARY_FILE).write_text(json.dumps(_summary("topk", 0, 2.0, [[1, 2, 3, 4]], 9.0)))
    made = effective_config(config, 0, run_dir, ["--trainer.max_steps", "4"])
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(made))
    args = ["--configs", str(config), "--seeds", "1", "--out", str(out)]

    compare_main([*args, "--trainer.max_steps", "4"])  # same settings: reused, nothing runs
    assert "[compare] topk seed 0 (1/1): done already" in capsys.readouterr().out
    # A run recorded before an option existed still matches while that option is at its default.
    older = yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text())
    del older["model"]["model"]["moe"]["balance_window"]
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(older))
    compare_main([*args, "--trainer.max_steps", "4"])
    assert "done already" in capsys.readouterr().out
    with pytest.raises(ValueError, match="balance_window: recorded '<unset>', now 8"):
        compare_main([*args, "--trainer.max_steps", "4", "--model.model.moe.balance_window", "8"])
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(made))
    with pytest.raises(ValueError) as error:
        compare_main([*args, "--trainer.max_steps", "20", "--model.optim.lr", "0.1"])
    message = str(error.value)
    assert f"--out {out} holds runs made with other settings" in message
    assert "model.optim.lr: recorded 0.01, now 0.1" in message
    assert "trainer.max_steps: recorded 4, now 20" in message
    with pytest.raises(ValueError, match="trainer.max_steps: recorded 4, now 6"):
        compare_main([*args, "--report_only"])  # the config's own max_steps is 6
    (run_dir / RUN_CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match=f"{run_dir} holds a run without {RUN_CONFIG_FILE}"):
        compare_main([*args, "--trainer.max_steps", "4"])


@pytest.mark.parametrize(
    "override",
    [["--trainer.default_root_dir", "elsewhere"], ["--seed_everything=3"], ["--ckpt_path", "x"]],
)
def test_compare_refuses_the_arguments_it_sets_itself(tmp_path, override):
    config = tmp_path / "a.yaml"
    config.write_text("{}")
    name = override[0].split("=")[0]
    with pytest.raises(ValueError, match=f"{name} is not allowed with compare"):
        compare_main(["--configs", str(config), "--out", str(tmp_path / "o"), *override])
    assert not (tmp_path / "o").exists()


def test_compare_refuses_overrides_that_do_not_parse_before_running(corpus_dir, tmp_path):
    config = tiny_config(tmp_path, corpus_dir)
    with pytest.raises(ValueError, match="does not parse: .*no_such_flag"):
        compare_main(["--configs", str(config), "--out", str(tmp_path / "o"), "--no_such_flag"])
    assert not list((tmp_path / "o").glob("**/train.log"))


def test_report_figure_has_training_curves_a_legend_below_and_readable_cells(tmp_path):
    from matplotlib.colors import to_rgba

    from moe_router.report import contrast_ratio

    configs = _write_runs(tmp_path)
    results = collect(tmp_path, configs, [0, 1])
    figure = report_figure(results)
    train_ax = next(ax for ax in figure.axes if ax.get_title().startswith("training loss"))
    for line, result in zip(train_ax.lines, results, strict=True):
        curves = [[p["loss"] for p in s["train_curve"]] for s in result.summaries]
        assert list(line.get_xdata()) == [2, 4, 6]
        np.testing.assert_allclose(line.get_ydata(), np.mean(curves, axis=0))
    (legend,) = figure.legends  # one legend for both curve panels, outside the axes
    assert [t.get_text() for t in legend.get_texts()] == [
        "topk (topk, 2 seeds)",
        "soft_topk (soft_topk, 2 seeds)",
    ]
    assert all(not ax.get_legend() for ax in figure.axes)
    cells = 0
    for ax in figure.axes:
        if not ax.images:
            continue
        image = ax.images[0]
        values = np.asarray(image.get_array())
        for text in ax.texts:
            column, row = text.get_position()
            cell = image.cmap(image.norm(values[int(row), int(column)]))
            assert contrast_ratio(to_rgba(text.get_color()), cell) >= 4.5, text.get_text()
            cells += 1
    assert cells == 2 * 4  # two configs, one layer of four experts each


def test_a_record_without_a_newer_setting_matches_while_it_is_at_its_default(corpus_dir, tmp_path):
    """The rule is the field's default, not None: here a Trainer flag that defaults to true."""
    config = tiny_config(tmp_path, corpus_dir, gate="topk", name="topk.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    made = effective_config(config, 0, run_dir, [])
    assert default_config()["trainer"]["enable_autolog_hparams"] is True
    older = yaml.safe_load(yaml.safe_dump(made))
    del older["trainer"]["enable_autolog_hparams"]
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(older))
    assert config_mismatch(run_dir, made) is None
    changed = effective_config(config, 0, run_dir, ["--trainer.enable_autolog_hparams", "false"])
    assert config_mismatch(run_dir, changed) == (
        f"{run_dir} was run with other settings: "
        "trainer.enable_autolog_hparams: recorded '<unset>', now False"
    )
