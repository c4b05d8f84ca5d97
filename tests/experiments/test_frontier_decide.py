"""The decision spec of train.py frontier: its loading, the pairing of seeds, the equal tuning,
the verdict and divergence in the report, the budget, and the stages end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from models_testing import tiny_config

from experiments import frontier_budget, frontier_tune, tune_sweep
from experiments.frontier import (
    DIVERGED_FILE,
    VERDICT_COLUMNS,
    collect,
    frontier_main,
    load_spec,
    report_columns,
    scale_candidates,
    write_report,
)
from models.config import ModelConfig
from models.summary import SUMMARY_FILE
from models.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[2]
DECIDE = ROOT / "configs" / "frontier_decide.yaml"


def test_the_decision_spec():
    spec = load_spec(DECIDE)
    names = [f.name for f in spec.families]
    assert names == [
        "topk", "topk_bias", "remoe", "topk_default", "balanced", "sparse", "balanced_default",
    ]  # fmt: skip
    assert spec.baseline.name == "topk" and spec.seeds == (0, 1, 2, 3, 4)
    assert [(p.name, p.num_experts, p.active) for p in spec.panels] == [
        ("E8", 8, (2,)),
        ("E32", 32, (8,)),
    ]
    e8, e32 = spec.panels
    assert e8.active[0] * e8.expert_d_ff == e32.active[0] * e32.expert_d_ff  # same active FLOPs
    assert len(spec.points()) == 7 * 2 * 5
    tuning = spec.tuning
    assert tuning.seed == 100 and tuning.seed not in spec.seeds + spec.scale.seeds
    assert len(tuning.lr) == 3 and tuning.lr[1] / tuning.lr[0] == tuning.lr[2] / tuning.lr[1]
    trials = frontier_tune.plan(spec, [])
    assert len(trials) == 42 and len({t.name for t in trials}) == 42
    assert all(sum(t.family.name == n for t in trials) == 6 for n in names)
    assert (spec.verdict.margin, spec.verdict.confidence) == (0.01, 0.95)
    assert spec.divergence.factor == 2.0 and spec.divergence.after_step == 50
    scale = spec.scale
    assert scale.panel.width_ratio == 2.0 and "topk" in scale.routers and len(scale.seeds) == 3
    assert [p.key for p in spec.points("scale")][:3] == [
        "D128/topk-2", "D128/remoe-2", "D128/topk_default-2",
    ]  # fmt: skip
    assert "--model.model.d_model" in spec.points("scale")[0].overrides([])
    # the first frontier's spec and report are untouched by the decision spec
    assert load_spec(ROOT / "configs" / "frontier.yaml").tuning is None
    assert (spec.out, spec.results) == (
        Path("runs/frontier_decide"),
        Path("benchmarks/results/frontier_decide"),
    )


def _without(config: dict, *paths: str) -> dict:
    config = json.loads(json.dumps(config))
    for path in paths:
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node.pop(leaf, None)
    return config


def test_the_families_differ_in_the_router_only():
    spec = load_spec(DECIDE)
    configs = {f.name: yaml.safe_load(f.config.read_text()) for f in spec.families}
    base = _without(configs["topk"], "model.model.gate", "model.model.moe", "model.optim.lr")
    for name, config in configs.items():
        rest = _without(config, "model.model.gate", "model.model.moe", "model.optim.lr")
        assert rest == base, name  # trainer, data, sizes, optimiser: the same


def test_a_seed_gives_every_family_the_same_initialisation_and_data_order():
    from models.data import BlockStream

    spec = load_spec(DECIDE)
    for panel in spec.panels:
        parameters = {}
        for family in spec.families:
            point = next(p for p in spec.points() if p.family is family and p.panel is panel)
            assert "--seed_everything" not in point.overrides([])
            assert not any(a.startswith("--data.") for a in point.overrides([]))
            model = yaml.safe_load(family.config.read_text())["model"]["model"]
            model |= {"num_experts": panel.num_experts, "expert_d_ff": panel.expert_d_ff}
            model |= {"k": point.active}
            if family.knob == "target_active":
                model["moe"] = {**model["moe"], "target_active": float(point.active)}
            torch.manual_seed(3)
            net = MoETransformer(ModelConfig(**model))
            parameters[family.name] = dict(net.named_parameters())
        for name, mine in parameters.items():
            assert mine.keys() == parameters["topk"].keys(), name
            for key, value in mine.items():
                assert torch.equal(value, parameters["topk"][key]), (panel.name, name, key)
    # the training order is a function of the seed alone (not of the global RNG state)
    blocks = torch.arange(40 * 5).reshape(40, 5)
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        stream = iter(BlockStream(blocks, 4, seed=3))
        orders.append(torch.stack([next(stream) for _ in range(12)]))
    assert torch.equal(orders[0], orders[1])


def _write_spec(tmp_path: Path, configs: dict[str, Path], **changes) -> Path:
    spec = {
        "seeds": [0, 1],
        "panels": [{"name": "E4", "num_experts": 4, "expert_d_ff": 8, "active": [2]}],
        "routers": [
            {
                "name": "topk",
                "config": str(configs["topk"]),
                "baseline": True,
                "tune": {"option": "--model.model.moe.aux_loss_coef", "values": [0.01]},
            },
            {
                "name": "balanced",
                "config": str(configs["balanced"]),
                "tune": {"option": "--model.model.moe.balance_momentum", "values": [0.9]},
            },
        ],
        "tuning": {
            "seed": 100,
            "panel": "E4",
            "active": 2,
            "lr": [0.01],
            "out": str(tmp_path / "tune_runs"),
            "results": str(tmp_path / "tune_results"),
        },
        "verdict": {"margin": 0.01, "confidence": 0.95},
        "divergence": {"factor": 2.0, "after_step": 0},
        "out": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def placeholder_configs(tmp_path):
    config = tmp_path / "family.yaml"
    config.write_text("model:\n  model:\n    d_model: 16\n")
    return {"topk": config, "balanced": config}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"tuning": {"seed": 1}}, "tuning=.* is invalid: keys"),
        ({"verdict": {"margin": 0.01, "level": 0.9}}, "verdict=.* is invalid"),
        ({"verdict": {"margin": -1}}, "verdict.margin=-1 is invalid"),
        ({"divergence": {"factor": 0.5}}, "divergence.factor=0.5 is invalid"),
        ({"seeds": [0, 100]}, r"tuning.seed=100 is invalid: .* \(not in \[0, 100\]\)"),
        ({"results": 3}, "results=3 is invalid: a path"),
    ],
)
def test_decision_spec_errors(tmp_path, placeholder_configs, changes, match):
    with pytest.raises(ValueError, match=match):
        load_spec(_write_spec(tmp_path, placeholder_configs, **changes))


def test_equal_tuning_and_scale_errors(tmp_path, placeholder_configs):
    path = _write_spec(tmp_path, placeholder_configs)
    raw = yaml.safe_load(path.read_text())
    raw["routers"][1]["tune"]["values"] = [0.9, 0.99]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="must be as many"):
        load_spec(path)
    del raw["routers"][1]["tune"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"routers \['balanced'\] have no `tune` knob"):
        load_spec(path)
    scale = {
        "name": "D32", "num_experts": 4, "expert_d_ff": 16, "active": 2, "d_model": 32,
        "n_layers": 2, "n_heads": 2, "max_steps": 6, "routers": ["balanced"], "seeds": [0],
    }  # fmt: skip
    with pytest.raises(ValueError, match="the baseline 'topk' must be one"):
        load_spec(_write_spec(tmp_path, placeholder_configs, scale=scale))
    scale["routers"] = ["topk"]
    with pytest.raises(ValueError, match="a grid panel's name"):
        load_spec(_write_spec(tmp_path, placeholder_configs, scale={**scale, "name": "E4"}))
    spec = load_spec(_write_spec(tmp_path, placeholder_configs, scale=scale))
    assert spec.scale.panel.width_ratio == 2.0  # d_model 32 over the config's 16


def _record(trial, loss, diverged=None):
    return {
        "name": trial.name,
        "family": trial.family.name,
        "overrides": list(trial.overrides),
        "tuned": list(trial.tuned),
        "seed": 100,
        "gate": "topk",
        "val_loss": loss,
        "diverged": diverged,
        "max_vio_worst": 0.1,
        "max_vio_layers": [0.1],
        "dead_experts": 0,
        "active_per_token": [2.0],
        "wall_s": 1.0,
    }


def test_the_winner_of_each_family_reaches_every_run(tmp_path, placeholder_configs):
    path = _write_spec(tmp_path, placeholder_configs)
    raw = yaml.safe_load(path.read_text())
    raw["tuning"]["lr"] = [0.003, 0.006]
    raw["routers"][0]["tune"]["values"] = [0.001, 0.01]
    raw["routers"][1]["tune"]["values"] = [0.9, 0.99]
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    trials = frontier_tune.plan(spec, ["--trainer.max_steps", "3"])
    assert [t.name for t in trials[:4]] == [
        "topk-lr0.003-aux_loss_coef0.001",
        "topk-lr0.003-aux_loss_coef0.01",
        "topk-lr0.006-aux_loss_coef0.001",
        "topk-lr0.006-aux_loss_coef0.01",
    ]
    assert trials[1].overrides[-6:] == (
        "--model.optim.lr", "0.003", "--model.model.moe.aux_loss_coef", "0.01",
        "--trainer.max_steps", "3",
    )  # fmt: skip
    results = spec.tuning.results
    results.mkdir(parents=True)
    losses = {  # topk: the lowest loss diverged, two tie after it; balanced: 2 of 4 here
        trials[0].name: (1.20, "spike"),
        trials[1].name: (1.30, None),
        trials[2].name: (1.30, None),
        trials[3].name: (1.40, None),
        trials[4].name: (1.50, None),
        trials[5].name: (1.45, None),
    }
    with (results / tune_sweep.TRIALS_FILE).open("w") as f:
        for trial in trials[:6]:
            loss, diverged = losses[trial.name]
            f.write(json.dumps(_record(trial, loss, diverged)) + "\n")
    extra = ["--trainer.max_steps", "3"]
    with pytest.raises(ValueError, match="the tuning of 2 trial"):
        frontier_tune.apply_tuning(spec, extra)
    partial, notes = frontier_tune.apply_tuning(spec, extra, required=False)
    assert partial.families[1].overrides == () and "balanced as configured" in notes[-1]
    with (results / tune_sweep.TRIALS_FILE).open("a") as f:
        for trial in trials[6:]:
            f.write(json.dumps(_record(trial, 1.35)) + "\n")
    tuned, notes = frontier_tune.apply_tuning(spec, extra)
    assert tuned.families[0].overrides == trials[1].tuned
    assert tuned.families[1].overrides == trials[6].tuned  # two at 1.35: the earlier
    point = next(p for p in tuned.points() if p.family.name == "topk")
    assert point.overrides(extra)[-6:-2] == list(trials[1].tuned)
    assert "tuned topk: --model.optim.lr 0.003" in notes[0]
    # the grid runs only with the tuning the same extra arguments recorded
    with pytest.raises(ValueError, match="not recorded"):
        frontier_tune.apply_tuning(spec, [])
    table = tune_sweep.table(tune_sweep.load_trials(results), "# t")
    assert "## topk" in table and "## balanced" in table and "(diverged: spike)" in table
    assert "topk-lr0.003-aux_loss_coef0.01 **(best loss)**" in table


def _summary(seed, loss, curve):
    layers = {
        "layer0": {
            "tokens_per_expert": [10, 20, 30, 40],
            "max_vio_global": 0.5,
            "load_cv": 0.25,
            "dead_expert_fraction": 0.0,
            "active_experts_per_token": 2.0,
            "active_experts_p99": 2.0,
            "overflow_rate": 0.0,
        }
    }
    return {
        "seed": seed,
        "num_experts": 4,
        "tokens_per_s": 1000.0,
        "finished": True,
        "global_step": 200,
        "train_curve": [{"step": 50 * (i + 1), "loss": v} for i, v in enumerate(curve)],
        "val_curve": [{"step": 200, "loss": loss}],
        "final_val": {"loss": loss, "layers": layers},
    }


def test_the_report_carries_the_rule_the_divergence_and_the_verdict(tmp_path):
    config = tmp_path / "family.yaml"
    config.write_text("{}")
    families = [
        {"name": "topk", "config": str(config), "baseline": True},
        {"name": "good", "config": str(config)},
        {"name": "same", "config": str(config)},
        {"name": "spiky", "config": str(config)},
    ]
    spec_path = _write_spec(
        tmp_path,
        {"topk": config, "balanced": config},
        seeds=[0, 1, 2],
        routers=families,
        tuning=None,
        divergence={"factor": 2.0, "after_step": 50},
    )
    spec = load_spec(spec_path)
    out = tmp_path / "runs"
    smooth = [5.0, 2.0, 1.6, 1.4]
    base = {0: 1.30, 1: 1.32, 2: 1.31}
    losses = {
        "topk": base,
        "good": {s: v - 0.03 - 0.001 * s for s, v in base.items()},
        "same": {s: v + 0.001 * (s - 1) for s, v in base.items()},
        "spiky": base,
    }
    for family, by_seed in losses.items():
        for seed, loss in by_seed.items():
            run_dir = out / f"E4/{family}-2" / f"seed{seed}"
            if family == "spiky" and seed == 2:  # stopped on a NaN: a marker, no summary
                run_dir.mkdir(parents=True)
                (run_dir / DIVERGED_FILE).write_text(json.dumps({"reason": "NonFiniteLossError"}))
                continue
            curve = [5.0, 1.5, 3.2, 1.4] if family == "spiky" and seed == 0 else smooth
            folder = run_dir / "csv" / "version_0"
            folder.mkdir(parents=True)
            (folder / SUMMARY_FILE).write_text(json.dumps(_summary(seed, loss, curve)))
    records = {r["key"]: r for r in collect(spec, out)}
    assert records["E4/good-2"]["verdict"] == "better"
    assert records["E4/same-2"]["verdict"] == "equivalent"
    spiky = records["E4/spiky-2"]
    assert "step 150" in spiky["runs"][0]["diverged"] and spiky["runs"][1]["diverged"] is None
    penalty = spec.divergence.penalty_loss
    assert spiky["delta_counted"] == pytest.approx([penalty - 1.30, 0.0, penalty - 1.31])
    assert spiky["delta_vs_baseline"] == pytest.approx([0.0, 0.0])  # raw: finished runs only
    assert spiky["verdict"] == "inconclusive"
    md_path, _ = write_report(spec, out, tmp_path / "results", ["note"])
    text = md_path.read_text()
    assert "## Pre-registered before any run" in text
    assert "mean Δ ≤ −0.01 nats" in text and "stricter than TOST" in text
    assert "exceeds 2 x the lowest logged training loss after step 50" in text
    assert "| " + " | ".join(report_columns(spec)) + " |" in text
    assert set(VERDICT_COLUMNS) <= set(report_columns(spec))
    assert "| 4 | spiky | 2 |" in text and "| 2/3 |" in text and "**inconclusive**" in text
    assert "- good: E4 2 active: better" in text
    payload = json.loads((tmp_path / "results" / "report.json").read_text())
    assert payload["columns"] == list(report_columns(spec))


def test_the_scale_step_candidates_follow_the_rule():
    spec = load_spec(DECIDE)
    means = {  # family: (mean Δ at E8, at E32, verdict at E32)
        "topk_bias": (-0.001, 0.0, "equivalent"),
        "remoe": (-0.05, 0.02, "worse"),  # the best mean, but worse at one point
        "topk_default": (-0.004, -0.004, "equivalent"),
        "balanced": (-0.02, 0.0, "inconclusive"),
        "sparse": (0.001, 0.003, "equivalent"),
        "balanced_default": (-0.003, -0.003, "equivalent"),
    }
    records = []
    for family, (e8, e32, verdict) in means.items():
        for panel, mean, said in (("E8", e8, "inconclusive"), ("E32", e32, verdict)):
            interval = {"mean": mean}
            records.append(
                {"panel": panel, "family": family, "verdict": said, "interval": interval}
            )
    assert scale_candidates(spec, records) == ["balanced", "topk_default"]
    records[0]["interval"] = None  # a point still pending
    assert scale_candidates(spec, records) is None


def test_a_decision_report_exists_before_any_run(tmp_path, placeholder_configs):
    spec = load_spec(_write_spec(tmp_path, placeholder_configs))
    md_path, _ = write_report(spec, tmp_path / "none", tmp_path / "pre", [])
    text = md_path.read_text()
    assert "## Pre-registered before any run" in text and "pending (0/2 seeds)" in text


def test_the_budget(tmp_path, capsys):
    spec = load_spec(DECIDE)
    text = frontier_budget.budget_report(spec, [], ["20000"], None, "decide")
    rows = {line.split(" | ")[0].strip("| ").split(":")[0]: line for line in text.splitlines()}
    assert rows["tune"].split(" | ")[1] == "42" and rows["grid"].split(" | ")[1] == "70"
    assert rows["scale"].split(" | ")[1] == "9" and rows["total"].split(" | ")[1] == "121"
    # 2000 x 32 x 64 tokens at 20000 tokens/s, 15 s to start, 4 validations of 2048 x 64 / 3
    minutes = (15 + (2000 * 2048 + 4 * 2048 * 64 / 3) / 20000) / 60
    assert f"| {minutes:.1f} |" in rows["tune"]
    measured = tmp_path / "step_time.json"
    rows_json = [{"panel": "E8", "family": "topk", "step_ms": 204.8}]
    measured.write_text(json.dumps({"smoke": False, "rows": rows_json, "repeats": 5}))
    text = frontier_budget.budget_report(spec, [], ["20000", "E32=10000"], measured)
    assert "E8/topk: 10000 (step time)" in text and "(--tokens_per_s E32)" in text
    with pytest.raises(ValueError, match="is not a panel"):
        frontier_budget.parse_rates(["E9=3"], spec)
    with pytest.raises(ValueError, match="N > 0"):
        frontier_budget.parse_rates(["topk=-3"], spec)
    with pytest.raises(ValueError, match="no throughput for E8/topk"):
        frontier_budget.budget_report(spec, [], None, None)
    assert frontier_budget.two_side_by_side_minutes([3, 3, 2, 2]) == 5
    assert frontier_budget.two_side_by_side_minutes([4, 1, 1]) == 4
    frontier_main(["--spec", str(DECIDE), "--budget", "--tokens_per_s", "20000"])
    assert "| total | 121 |" in capsys.readouterr().out


def _tiny_configs(tmp_path: Path, corpus_dir: Path) -> dict[str, Path]:
    return {
        "topk": tiny_config(tmp_path, corpus_dir, gate="topk", name="topk.yaml"),
        "balanced": tiny_config(
            tmp_path, corpus_dir, gate="balanced_soft_topk", name="balanced.yaml"
        ),
    }


def _tiny_spec(tmp_path: Path, corpus_dir: Path, lr: list[float]) -> Path:
    path = _write_spec(tmp_path, _tiny_configs(tmp_path, corpus_dir))
    raw = yaml.safe_load(path.read_text())
    raw["tuning"]["lr"] = lr
    raw["routers"][1]["tune"]["values"] = [0.95]
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_tuning_stage(corpus_dir, tmp_path, monkeypatch, capsys):
    """Every trial tried and recorded; a stop on a non-finite loss is a diverged trial, another
    failure is raised after the others and tried again on the next call."""
    spec_path = _tiny_spec(tmp_path, corpus_dir, [0.01, 0.02])
    broken = {"topk-lr0.02-aux_loss_coef0.01"}
    ran = []

    def fake_run_trial(name, config, seed, overrides, out, threads=None):
        ran.append(name)
        (out / name).mkdir(parents=True, exist_ok=True)
        if name == "balanced-lr0.02-balance_momentum0.95":
            (out / name / "train.log").write_text("NonFiniteLossError: non-finite loss\n")
            raise RuntimeError("exit 1")
        if name in broken:
            raise RuntimeError("disk full")
        loss = {"topk-lr0.01-aux_loss_coef0.01": 1.5}.get(name, 1.4)
        return {
            "name": name, "config": config, "overrides": overrides, "seed": seed,
            "gate": "topk", "val_loss": loss, "max_vio_worst": 0.1, "max_vio_layers": [0.1],
            "dead_experts": 0, "active_per_token": [2.0], "wall_s": 1.0,
            "train_curve": [[1, 5.0], [2, 4.0]],
        }  # fmt: skip

    monkeypatch.setattr(tune_sweep, "run_trial", fake_run_trial)
    args = ["--spec", str(spec_path), "--stage", "tune", "--jobs", "2"]
    with pytest.raises(RuntimeError, match=r"1 tuning trial\(s\) failed: topk-lr0.02-.*disk"):
        frontier_main(args)
    assert len(ran) == 4
    results = tmp_path / "tune_results"
    records = {r["name"]: r for r in tune_sweep.load_trials(results)}
    assert len(records) == 3
    assert records["balanced-lr0.02-balance_momentum0.95"]["diverged"].startswith("NonFinite")
    assert records["topk-lr0.01-aux_loss_coef0.01"]["tuned"] == [
        "--model.optim.lr", "0.01", "--model.model.moe.aux_loss_coef", "0.01",
    ]  # fmt: skip
    sweep = (results / tune_sweep.TABLE_FILE).read_text()
    assert "**Tuning**" in sweep and "(diverged: NonFiniteLossError" in sweep
    assert "[tune] topk: no winner yet" in capsys.readouterr().out
    broken.clear()
    frontier_main(args)
    assert ran[4:] == ["topk-lr0.02-aux_loss_coef0.01"]  # only the failed one again
    printed = capsys.readouterr().out
    assert "[tune] topk: topk-lr0.02-aux_loss_coef0.01 (1.4000)" in printed
    assert "[tune] balanced: balanced-lr0.01-balance_momentum0.95 (1.4000)" in printed
    with pytest.raises(ValueError, match="with other arguments"):
        frontier_main([*args, "--trainer.max_steps", "3"])


def test_the_grid_end_to_end(corpus_dir, tmp_path, capsys, monkeypatch):
    """Two families x 2 seeds of a tiny model, 3 steps each, with their tuned settings; the
    report with the verdict column; the step-time benchmark of the spec in smoke mode."""
    import runpy

    spec_path = _tiny_spec(tmp_path, corpus_dir, [0.01])
    extra = ["--trainer.max_steps", "3"]
    args = ["--spec", str(spec_path), "--jobs", "2", *extra]
    with pytest.raises(ValueError, match="the tuning of 2 trial"):
        frontier_main(args)  # no grid before the tuning
    spec = load_spec(spec_path)
    results = spec.tuning.results
    results.mkdir(parents=True)
    with (results / tune_sweep.TRIALS_FILE).open("w") as f:
        for trial in frontier_tune.plan(spec, extra):
            f.write(json.dumps(_record(trial, 1.4)) + "\n")
    frontier_main(args)
    printed = capsys.readouterr().out
    assert "[frontier] E4/balanced-2 seed 1 (4/4): step 3/3, validation loss" in printed
    text = (tmp_path / "results" / "report.md").read_text()
    assert "tuned balanced: --model.optim.lr 0.01 --model.model.moe.balance_momentum 0.95" in text
    assert "| " + " | ".join(report_columns(spec)) + " |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4 | balanced |"))
    verdicts = ("better", "equivalent", "worse", "inconclusive")
    assert "| 0/2 |" in row and any(f"**{v}**" in row for v in verdicts)
    summary = next((tmp_path / "runs").glob(f"E4/balanced-2/seed1/**/{SUMMARY_FILE}"))
    assert json.loads(summary.read_text())["moe"]["balance_momentum"] == 0.95
    for name in ("report.json", "frontier.png", "curves.png", "load.png"):
        assert (tmp_path / "results" / name).is_file()
    # the step-time benchmark of the same spec, in smoke mode (in this process)
    stem = tmp_path / "step_time"
    bench = ROOT / "benchmarks" / "bench_step_time.py"
    argv = [str(bench), "--spec", str(spec_path), "--smoke", "--out", str(stem), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(bench), run_name="__main__")
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert payload["smoke"] and {r["family"] for r in payload["rows"]} == {"topk", "balanced"}
    assert all(math.isfinite(r["step_ms"]) and r["step_ms"] > 0 for r in payload["rows"])
    assert "tuned balanced" in payload["settings"]
    assert "| E4 | balanced | balanced_soft_topk |" in stem.with_suffix(".md").read_text()
