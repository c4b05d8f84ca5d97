"""train.py: shipped configs, fit / validate tables, bad configs stopped before training."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
from models_testing import tiny_config

from models.cli import MoECLI, cli_main
from models.data import ByteCorpusDataModule
from models.lit_module import MoELanguageModel

REPO = Path(__file__).resolve().parents[2]
# Every fit config (the frontier's families included); configs/frontier.yaml is the frontier's
# spec, not a fit config (tests/experiments/test_frontier.py loads it).
CONFIGS = sorted(
    path
    for pattern in ("*.yaml", "frontier/*.yaml", "main/*.yaml")
    for path in (REPO / "configs").glob(pattern)
    if path != REPO / "configs" / "frontier.yaml"
)


def test_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"quickstart", "topk", "soft_topk", "sparse_soft_topk", "gpu"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}_{p.stem}_yaml")
def test_shipped_configs_build(config, tmp_path):
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    if config.stem == "gpu":  # built on CPU here: only the device settings change
        args += [
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
        ]
    cli = MoECLI(args=args, run=False)
    assert isinstance(cli.model, MoELanguageModel)
    assert isinstance(cli.datamodule, ByteCorpusDataModule)
    assert cli.model.model_config.max_seq_len == cli.datamodule.seq_len
    assert cli.trainer.max_steps > 0


def test_compare_configs_differ_only_in_the_gate():
    """Same model, data and token budget; what may differ is the gate, its `moe` settings
    (balancing, tau) and the peak learning rate, each tuned per gate on held-out seeds
    (benchmarks/results/tuning/sweep.md): a hard baseline at the soft gates' learning rate would
    not be the tuned baseline the comparison asks for."""
    import yaml

    def settings(name):
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        config["trainer"].pop("default_root_dir")
        model = config["model"]["model"]
        lr = config["model"]["optim"].pop("lr")
        return config, model.pop("gate"), model.pop("moe"), lr

    base, base_gate, _, _ = settings("topk")
    for name in ("soft_topk", "sparse_soft_topk"):
        other, gate, _, lr = settings(name)
        assert other == base and gate == name != base_gate and 0 < lr


def test_main_configs_differ_only_in_the_router():
    """The main job's two configs: the same model, data, budget and optimiser (one shared lr);
    only the gate and its `moe` options differ."""
    import yaml

    def without_router(name):
        config = yaml.safe_load((REPO / "configs" / "main" / f"{name}.yaml").read_text())
        config["trainer"].pop("default_root_dir")
        model = config["model"]["model"]
        return config, model.pop("gate"), model.pop("moe")

    topk, topk_gate, topk_moe = without_router("topk")
    balanced, balanced_gate, balanced_moe = without_router("balanced")
    assert topk == balanced
    assert (topk_gate, balanced_gate) == ("topk", "balanced_soft_topk")
    assert topk_moe["aux_loss_coef"] > 0 and "aux_loss_coef" not in balanced_moe
    trainer = topk["trainer"]
    assert trainer["max_steps"] % trainer["val_check_interval"] == 0  # MaxVio_batch at the end


def test_fit_prints_the_table_and_validate_reproduces_it(corpus_dir, tmp_path, capsys):
    config = tiny_config(tmp_path, corpus_dir)
    cli_main(["fit", "--config", str(config)])
    fit_out = capsys.readouterr().out
    assert "validation loss" in fit_out and "| layer0 |" in fit_out and "| layer1 |" in fit_out
    summaries = list((tmp_path / "run").glob("csv/version_*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["finished"] and summary["global_step"] == 6
    assert [point["step"] for point in summary["val_curve"]] == [3, 6]
    assert summary["tokens_per_s"] > 0
    assert (tmp_path / "run" / "tb").is_dir()

    checkpoint = next((tmp_path / "run").glob("csv/version_0/checkpoints/last.ckpt"))
    cli_main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    validate_out = capsys.readouterr().out
    loss_line = next(line for line in fit_out.splitlines() if line.startswith("gate "))
    loss_text = loss_line.split("validation loss ")[1].split(" ")[0]
    assert f"validation loss {loss_text}" in validate_out
    assert "| layer0 |" in validate_out


def test_fit_validates_at_the_last_step_when_the_schedule_does_not(corpus_dir, tmp_path, capsys):
    config = tiny_config(tmp_path, corpus_dir, max_steps=4, val_check_interval=3)
    cli_main(["fit", "--config", str(config)])
    assert "step 4" in capsys.readouterr().out
    summary = json.loads(next((tmp_path / "run").glob("csv/*/summary.json")).read_text())
    assert [point["step"] for point in summary["val_curve"]] == [3, 4]
    assert summary["finished"]


def _error_text(args: list[str], capsys) -> str:
    try:
        cli_main(args)
    except ValueError as err:
        return str(err)
    except SystemExit as exit_:
        assert exit_.code != 0
        return capsys.readouterr().err
    raise AssertionError("the bad config was accepted")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.model.gate", "bogus"], "gate='bogus' is invalid"),
        (["--model.model.k", "5"], "k=5 is not allowed: it must be <= num_experts=4"),
        (["--data.files", "[/no/such/dir/*.txt]"], "matches no file"),
        (["--trainer.max_steps", "-1"], "trainer.max_steps=-1"),
    ],
    ids=["unknown_gate", "k_above_E", "missing_path", "no_max_steps"],
)
def test_bad_configs_stop_before_training(corpus_dir, tmp_path, capsys, overrides, expected):
    config = tiny_config(tmp_path, corpus_dir)
    message = _error_text(["fit", "--config", str(config), *overrides], capsys)
    assert expected in message
    assert not list(tmp_path.glob("run/**/*.ckpt")) and not list(tmp_path.glob("run/**/*.csv"))


def test_empty_corpus_stops_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    config = tiny_config(tmp_path, empty)
    message = _error_text(["fit", "--config", str(config)], capsys)
    assert "is empty: no bytes to train on" in message
    assert not list(tmp_path.glob("run/**/*.ckpt"))


def test_help_lists_fit_validate_and_the_commands_given(capsys):
    def never(argv):
        raise AssertionError("a listed command runs only when named")

    commands = {"compare": ("Run every config for every seed.", never)}
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"], commands)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,compare}" in out
    assert "Run every config for every seed." in out
    assert "predict" not in out and " test " not in out
    ran = []
    cli_main(["compare", "--x", "1"], {"compare": ("help", ran.append)})
    assert ran == [["--x", "1"]]


def test_train_py_lists_its_drivers_and_the_cli_imports_none(capsys):
    """The drivers import the CLI, never the other way round (no import cycle)."""
    import subprocess
    import sys

    from train import COMMANDS

    with pytest.raises(SystemExit):
        cli_main(["--help"], COMMANDS)
    assert "{fit,validate,compare,frontier}" in capsys.readouterr().out
    code = "import sys, models.cli; print(sorted(m for m in sys.modules if m.startswith('exp')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_fit_output_is_quiet_and_says_where_things_went(corpus_dir, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    config = tiny_config(tmp_path, corpus_dir, max_steps=4, val_check_interval=3)
    args = [
        "fit",
        "--config",
        str(config),
        "--data.files",
        str(corpus_dir / "*.txt"),  # one string, not a list
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.enable_model_summary",
        "true",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(args)
    out, err = capfd.readouterr()
    text = out + err + caplog.text  # Lightning logs to a handler of its own
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    for noise in ("Tip:", "will override", "Total FLOPs", "v_num", "Epoch 0", "sync_dist"):
        assert noise not in text, noise
    assert "Parameters: " in out and "active per token" in out
    assert "Training steps" in out and "4/4" in out
    assert "data: training 11 files" in text
    outputs = out[out.index("Outputs:") :].splitlines()
    paths = {line.split(": ")[0].strip(): line.split(": ", 1)[1] for line in outputs[1:]}
    checkpoints = Path(paths["checkpoints"].split(" (")[0])
    assert (checkpoints / "last.ckpt").is_file()
    assert f"--ckpt_path {checkpoints / 'last.ckpt'}" in paths["checkpoints"]
    assert Path(paths["run summary"]).is_file()
    assert Path(paths["load heatmap"]).read_bytes().startswith(b"\x89PNG")
    assert Path(paths["CSV metrics"]).is_file()
    assert Path(paths["TensorBoard"].split(" (")[0]).is_dir()
    summary = json.loads(Path(paths["run summary"]).read_text())
    assert [point["step"] for point in summary["train_curve"]] == [1, 2, 3, 4]  # every log step
    assert all(math.isfinite(point["loss"]) for point in summary["train_curve"])


def test_validate_prints_one_table_labelled_with_the_checkpoint_step(corpus_dir, tmp_path, capfd):
    config = tiny_config(tmp_path, corpus_dir, max_steps=6, val_check_interval=3)
    cli_main(["fit", "--config", str(config)])
    capfd.readouterr()
    checkpoint = next((tmp_path / "run").glob("csv/version_0/checkpoints/epoch=0-step=3.ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    out, err = capfd.readouterr()
    assert "step 3\n" in out and "step 0" not in out
    assert out.count("| layer0 |") == 1 and "Validate metric" not in out
    noise = ("dirpath has changed", "callbacks used to create the checkpoint")
    assert not [w for w in caught if any(text in str(w.message) for text in noise)]


def test_resume_refuses_a_config_that_differs_from_the_checkpoint(corpus_dir, tmp_path):
    config = tiny_config(tmp_path, corpus_dir, max_steps=3)
    cli_main(["fit", "--config", str(config)])
    checkpoint = next((tmp_path / "run").glob("csv/version_0/checkpoints/last.ckpt"))
    resume = ["--config", str(config), "--ckpt_path", str(checkpoint)]
    changed = ["--model.model.gate", "topk", "--model.optim.lr", "0.1"]
    with pytest.raises(ValueError) as error:
        cli_main(["fit", *resume, "--trainer.max_steps", "6", *changed])
    message = str(error.value)
    assert f"checkpoint '{checkpoint}' was made with another config" in message
    assert "model.gate: checkpoint 'soft_topk', given 'topk'" in message
    assert "optim.lr: checkpoint 0.01, given 0.1" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="model.num_experts: checkpoint 4, given 8"):
        cli_main(["validate", *resume, "--model.model.num_experts", "8"])


@pytest.mark.parametrize(
    ("moe", "expected"),
    [({"z_loss_coef": 0.001}, None), ({"tau_schedule": "anneal", "tau_final": 0.5}, 6)],
    ids=["fixed", "anneal"],
)
def test_anneal_steps_takes_max_steps_only_for_the_anneal_schedule(
    corpus_dir, tmp_path, moe, expected
):
    config = tiny_config(tmp_path, corpus_dir, moe=moe)
    cli = MoECLI(args=["--config", str(config)], run=False)
    assert cli.model.model_config.moe.anneal_steps == expected


def test_resume_with_more_steps_under_a_fixed_tau(corpus_dir, tmp_path):
    """max_steps is no part of a fixed-temperature model config, so a resume may extend the run
    (anneal_steps, read only by `anneal`, stays unset rather than taking the first max_steps)."""
    config = tiny_config(tmp_path, corpus_dir, max_steps=3)
    cli_main(["fit", "--config", str(config)])
    checkpoint = next((tmp_path / "run").glob("csv/version_0/checkpoints/last.ckpt"))
    cli_main(["fit", "--config", str(config), "--ckpt_path", str(checkpoint),
              "--trainer.max_steps", "6"])  # fmt: skip
    summary = json.loads(next((tmp_path / "run").glob("csv/version_1/summary.json")).read_text())
    assert summary["finished"] and summary["global_step"] == 6
    assert summary["moe"]["anneal_steps"] is None


def test_a_checkpoint_from_before_a_new_option_resumes_at_the_options_default():
    from models.config import ModelConfig, config_differences

    given = ModelConfig(gate="balanced_soft_topk")
    saved = dataclasses.asdict(given)
    del saved["moe"]["balance_window"]  # an option the checkpoint's version did not have
    assert config_differences(saved, given) == []
    changed = ModelConfig(gate="balanced_soft_topk", moe={"balance_window": 64})
    assert config_differences(saved, changed) == [
        "moe.balance_window: checkpoint '<unset>', given 64"
    ]


def test_fit_exits_with_an_error_when_the_final_validation_is_nan(corpus_dir, tmp_path):
    config = tiny_config(tmp_path, corpus_dir, max_steps=3)
    callback = ["--trainer.callbacks+=models_testing.NaNFinalValidation"]
    with pytest.raises(RuntimeError, match="fit: the validation loss at step 3 is nan"):
        cli_main(["fit", "--config", str(config), *callback])


def test_dense_width_follows_k_and_expert_width_from_the_command_line(corpus_dir, tmp_path):
    # LightningCLI takes the model defaults from a ModelConfig() instance: a dense width filled
    # in there would be a fixed 256 whatever k and expert_d_ff the command line sets.
    from models.cli import MoECLI

    config = tiny_config(tmp_path, corpus_dir)
    cli = MoECLI(args=["--config", str(config), "--model.model.moe_every", "2"], run=False)
    model_config = cli.model.model_config
    assert model_config.dense_width == model_config.k * model_config.expert_d_ff
    dense = [b.ffn for b in cli.model.net.blocks if not b.is_moe][0]
    assert dense.w1_DF.shape[1] == model_config.k * model_config.expert_d_ff


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"], ids=["empty", "garbage"])
def test_unreadable_checkpoint_is_one_clear_error(corpus_dir, tmp_path, capsys, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    config = tiny_config(tmp_path, corpus_dir)
    message = _error_text(["validate", "--config", str(config), "--ckpt_path", str(bad)], capsys)
    assert f"ckpt_path='{bad}'" in message
