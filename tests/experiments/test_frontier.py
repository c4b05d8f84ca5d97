"""train.py frontier: the spec, the points it expands to, the paired report, and a smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from models_testing import tiny_config

from experiments.frontier import COLUMNS, collect, frontier_main, load_spec, write_report
from models.cli import main
from models.summary import SUMMARY_FILE
from train import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, **changes) -> Path:
    config = tmp_path / "family.yaml"
    config.write_text("{}")
    spec = {
        "seeds": [0, 1],
        "panels": [
            {"name": "E4", "num_experts": 4, "expert_d_ff": 16, "active": [1, 2]},
            {"name": "E8", "num_experts": 8, "expert_d_ff": 8, "active": [2, 4]},
        ],
        "routers": [
            {"name": "topk", "config": str(config), "baseline": True},
            {"name": "sparse", "config": str(config), "knob": "target_active"},
            {"name": "soft", "config": str(config), "active": {"E4": [2]}},
        ],
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_repository_spec_expands_to_the_issue_grid():
    spec = load_spec(ROOT / "configs" / "frontier.yaml")
    points = spec.points()
    assert spec.baseline.name == "topk" and spec.seeds == (0, 1, 2)
    # E8: 3 families x K = 1, 2, 4 plus soft_topk at 2; E32: 3 families x 4, 8, 16.
    assert len(points) == (3 * 3 + 1 + 3 * 3) * 3
    e32 = {p.panel.name: p.panel for p in points}["E32"]
    e8 = {p.panel.name: p.panel for p in points}["E8"]
    assert e32.num_experts * e32.expert_d_ff == e8.num_experts * e8.expert_d_ff  # equal params
    assert not [p for p in points if p.family.name == "soft_topk" and p.panel.name == "E32"]


def test_point_overrides(tmp_path):
    spec = load_spec(_spec(tmp_path))
    points = spec.points()
    assert [p.seed for p in points][:7] == [0] * 7  # seed-major
    by_key = {p.key: p for p in points if p.seed == 0}
    assert set(by_key) == {
        "E4/topk-1", "E4/topk-2", "E4/sparse-1", "E4/sparse-2", "E4/soft-2",
        "E8/topk-2", "E8/topk-4", "E8/sparse-2", "E8/sparse-4",
    }  # fmt: skip
    sparse = by_key["E8/sparse-4"].overrides(["--trainer.max_steps", "3"])
    assert sparse == [
        "--model.model.num_experts", "8", "--model.model.expert_d_ff", "8",
        "--model.model.k", "4", "--model.model.moe.target_active", "4.0",
        "--trainer.max_steps", "3",
    ]  # fmt: skip
    assert "--model.model.moe.target_active" not in by_key["E4/topk-2"].overrides([])


def test_active_overrides_reach_every_family_at_that_count(tmp_path):
    spec = load_spec(_spec(tmp_path, active_overrides={1: ["--model.model.moe.renormalize", "0"]}))
    for point in spec.points():
        arguments = point.overrides([])
        assert ("--model.model.moe.renormalize" in arguments) == (point.active == 1), point.key
    with pytest.raises(ValueError, match=r"active_overrides\[1\]=.* is invalid"):
        load_spec(_spec(tmp_path, active_overrides={1: "--x"}))
    repository = load_spec(ROOT / "configs" / "frontier.yaml")
    assert dict(repository.active_overrides) == {1: ("--model.model.moe.renormalize", "false")}


def _panel(num_experts=2, active=(1,)):
    return {"name": "E2", "num_experts": num_experts, "expert_d_ff": 4, "active": list(active)}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"seeds": []}, "seeds=.* is invalid"),
        ({"extra": 1}, "unknown keys"),
        ({"panels": [_panel(num_experts=2, active=[3])]}, "at most num_experts=2"),
        ({"panels": [_panel(num_experts=0)]}, r"panels\[0\].num_experts=0 is invalid"),
        ({"routers": [{"name": "a", "config": "missing.yaml", "baseline": True}]}, "no such file"),
        ({"routers": []}, "exactly one `baseline: true`"),
    ],
)
def test_spec_errors_name_the_entry(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        load_spec(_spec(tmp_path, **changes))


def test_spec_router_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    bad_knob = [{"name": "a", "config": str(config), "baseline": True, "knob": "tau"}]
    with pytest.raises(ValueError, match=r"routers\[0\].knob='tau' is invalid"):
        load_spec(_spec(tmp_path, routers=bad_knob))
    bad_panel = [{"name": "a", "config": str(config), "baseline": True, "active": {"E9": [1]}}]
    with pytest.raises(ValueError, match="panel 'E9' is not one of"):
        load_spec(_spec(tmp_path, routers=bad_panel))
    with pytest.raises(ValueError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def _summary(seed, loss, tokens_per_s, active, loads):
    layers = {
        "layer0": {
            "tokens_per_expert": loads,
            "max_vio_global": 0.5,
            "load_cv": 0.25,
            "dead_expert_fraction": 0.25,
            "active_experts_per_token": active,
            "active_experts_p99": active + 1,
            "overflow_rate": 0.01,
        }
    }
    return {
        "seed": seed,
        "num_experts": len(loads),
        "tokens_per_s": tokens_per_s,
        "finished": True,
        "train_curve": [{"step": 1, "loss": loss + 1}, {"step": 2, "loss": loss}],
        "val_curve": [{"step": 2, "loss": loss}],
        "final_val": {"loss": loss, "layers": layers},
    }


def test_report_pairs_by_seed_at_the_same_active_count(tmp_path):
    spec = load_spec(_spec(tmp_path))
    out = tmp_path / "runs"
    runs = {  # (key, seed): (loss, tokens/s)
        ("E4/topk-2", 0): (2.0, 1000.0),
        ("E4/topk-2", 1): (2.2, 1000.0),
        ("E4/sparse-2", 0): (1.9, 900.0),
        ("E4/sparse-2", 1): (2.25, 800.0),
        ("E4/soft-2", 1): (2.1, 500.0),  # seed 0 unfinished: paired on seed 1 only
    }
    for (key, seed), (loss, speed) in runs.items():
        folder = out / key / f"seed{seed}" / "csv" / "version_0"
        folder.mkdir(parents=True)
        summary = _summary(seed, loss, speed, 2.0, [10, 20, 0, 30])
        (folder / SUMMARY_FILE).write_text(json.dumps(summary))
    records = {r["key"]: r for r in collect(spec, out)}
    assert records["E4/sparse-2"]["delta_vs_baseline"] == pytest.approx([-0.1, 0.05])
    assert records["E4/sparse-2"]["speed_vs_baseline"] == pytest.approx([0.9, 0.8])
    assert records["E4/soft-2"]["delta_vs_baseline"] == pytest.approx([-0.1])
    assert records["E8/topk-4"]["runs"] == []
    assert records["E8/sparse-4"]["flops_rel"] == pytest.approx(2.0)  # 4 x 8 / 16
    md_path, _ = write_report(spec, out, tmp_path / "results", ["note"])
    text = md_path.read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in text
    sparse_row = "| 4 | sparse | 2 | 2.00 ± 0.00 | 3.0 ± 0.0 | 2 | 2.0750 ± 0.2475 | "
    assert sparse_row + "-0.0250 ± 0.1061 | 1/2 |" in text
    assert "| 4 | soft | 2 | 2.00 | 3.0 | 1 | 2.1000 | -0.1000 | 1/1 |" in text
    assert "| 8 | topk | 4 | n/a |" in text
    payload = json.loads((tmp_path / "results" / "report.json").read_text())
    assert payload["columns"] == list(COLUMNS) and len(payload["points"]) == 9
    for name in ("frontier.png", "curves.png", "load.png"):
        assert (tmp_path / "results" / name).stat().st_size > 1000


def test_frontier_smoke_run(corpus_dir, tmp_path, capsys):
    """The command end to end: two routers, one seed, a tiny model, three steps each."""
    topk = tiny_config(tmp_path, corpus_dir, gate="topk", name="topk.yaml")
    sparse = tiny_config(
        tmp_path,
        corpus_dir,
        gate="sparse_soft_topk",
        name="sparse.yaml",
        moe={"target_active": 2.0, "expert_bias": True, "bias_update_rate": 0.01},
    )
    spec = tmp_path / "frontier.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "seeds": [0],
                "panels": [{"name": "E4", "num_experts": 4, "expert_d_ff": 8, "active": [2]}],
                "routers": [
                    {"name": "topk", "config": str(topk), "baseline": True},
                    {"name": "sparse", "config": str(sparse), "knob": "target_active"},
                ],
            }
        )
    )
    results = tmp_path / "results"
    args = ["--spec", str(spec), "--out", str(tmp_path / "runs")]
    args += ["--results", str(results), "--jobs", "2", "--trainer.max_steps", "3"]
    frontier_main(args)
    printed = capsys.readouterr().out
    assert "[frontier] E4/sparse-2 seed 0 (2/2): step 3/3, validation loss" in printed
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = (results / "report.md").read_text().splitlines()
    assert header in lines
    rows = [line for line in lines if line.startswith("| 4 |")]
    assert [row.split(" | ")[1] for row in rows] == ["topk", "sparse"]
    assert all("n/a" not in row for row in rows)
    for name in ("report.json", "frontier.png", "curves.png", "load.png"):
        assert (results / name).is_file()
    summary_path = next((tmp_path / "runs").glob(f"E4/sparse-2/seed0/**/{SUMMARY_FILE}"))
    summary = json.loads(summary_path.read_text())
    assert summary["num_experts"] == 4 and summary["moe"]["target_active"] == 2.0
    frontier_main(args)  # finished runs are reused
    assert capsys.readouterr().out.count("done already") == 2
    with pytest.raises(ValueError, match="set per point"):
        frontier_main([*args, "--model.model.k", "1"])
    with pytest.raises(ValueError, match="matches none of the spec's points"):
        frontier_main([*args, "--points", "E9/*"])
    frontier_main([*args, "--points", "E4/topk-*"])  # a subset runs; the report covers the spec
    assert capsys.readouterr().out.count("done already") == 1


def test_a_failed_run_does_not_cancel_the_others(tmp_path, monkeypatch, capsys):
    """Every run is tried; the report covers the finished ones; the failures are raised last."""
    import experiments.compare as compare
    import experiments.frontier as frontier

    spec_path = _spec(tmp_path, seeds=[0])
    monkeypatch.setattr(compare, "effective_config", lambda *args: {"same": 1})
    ran = []

    def fake_run_one(config, seed, run_dir, overrides, **kwargs):
        ran.append(str(run_dir))
        if "E4/topk-1" in str(run_dir):
            raise RuntimeError("boom")
        folder = run_dir / "csv" / "version_0"
        folder.mkdir(parents=True)
        summary = _summary(seed, 2.0, 100.0, 2.0, [1, 2, 3, 4])
        (folder / SUMMARY_FILE).write_text(json.dumps(summary))

    monkeypatch.setattr(frontier, "run_one", fake_run_one)
    results = tmp_path / "results"
    args = ["--spec", str(spec_path), "--out", str(tmp_path / "runs"), "--results", str(results)]
    with pytest.raises(RuntimeError, match=r"1 frontier run\(s\) failed: E4/topk-1 seed 0: boom"):
        frontier.frontier_main([*args, "--jobs", "2"])
    assert len(ran) == 9  # every point of seed 0 was tried
    assert (results / "report.md").is_file()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3\n", "a frontier spec is a mapping with panels and routers, got 3"),
        ("panels: [E8\n", "is not valid YAML (line 2, column 1): expected ',' or ']'"),
        ("", "a frontier spec is a mapping with panels and routers, got None"),
        ("panels: 3\n", "panels=3 is invalid: a list of mappings"),
        ("panels: [3]\n", "panels[0]=3 is invalid"),
        ("routers: {a: 1}\n", "routers={'a': 1} is invalid: a list of mappings"),
    ],
    ids=["int", "bad_yaml", "empty", "panels_int", "panel_int", "routers_mapping"],
)
def test_a_malformed_spec_is_one_error_line_naming_the_file(
    tmp_path, monkeypatch, capsys, text, expected
):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    monkeypatch.setattr("sys.argv", ["train.py", "frontier", "--spec", str(spec)])
    with pytest.raises(SystemExit) as exit_:
        main(COMMANDS)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {spec}") and expected in line
