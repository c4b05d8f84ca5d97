"""train.py: shipped configs, fit / validate tables, bad configs stopped before training."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from models_testing import tamper_checkpoint, tiny_config, write_corpus

from models.cli import MoECLI, cli_main, main
from models.data import ByteCorpusDataModule
from models.lit_module import MoELanguageModel

REPO = Path(__file__).resolve().parents[2]
# Every fit config (the frontier's families included); configs/frontier*.yaml are the frontier's
# specs, not fit configs (tests/experiments/test_frontier.py loads them).
CONFIGS = sorted(
    path
    for pattern in ("*.yaml", "frontier/*.yaml", "main/*.yaml")
    for path in (REPO / "configs").glob(pattern)
    if not (path.parent == REPO / "configs" and path.stem.startswith("frontier"))
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


# ------------------------------------------------------------------- one line per user error


def _main(args: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """``train.py ARGS`` in-process: the exit code and stderr of ``models.cli.main``."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.delenv("MOE_ROUTER_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        try:
            main()
        except KeyboardInterrupt:  # would stop the test session
            pytest.fail("Ctrl-C escaped main as a KeyboardInterrupt")
    return exit_.value.code, capfd.readouterr().err


def _the_error_line(err: str) -> str:
    """The one ``error:`` line a user error ends with (no traceback before it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    return lines[-1]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny config and the step-3 ``last.ckpt`` of its fit (one fit for the module)."""
    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "corpus")
    config = tiny_config(root, root / "corpus", max_steps=3)
    cli_main(["fit", "--config", str(config)])
    return config, next((root / "run").glob("csv/version_0/checkpoints/last.ckpt"))


def _damaged_checkpoint(kind: str, source: Path, target: Path) -> str:
    """Writes a damaged copy of ``source`` to ``target``; returns what the error must say."""
    import torch

    if kind == "tampered":
        member = tamper_checkpoint(source, target)
        return f"the data of {member!r} does not match its CRC"
    if kind == "not_torch":
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
        return "not a torch checkpoint"
    checkpoint = torch.load(source, weights_only=True)
    if kind == "bare_state_dict":
        torch.save(checkpoint["state_dict"], target)
        return "is a bare state_dict"
    key = kind.removeprefix("no_")
    del checkpoint[key]
    torch.save(checkpoint, target)
    return f"lacks {key!r}"


@pytest.mark.parametrize(
    ("kind", "subcommand"),
    [
        ("tampered", "fit"),
        ("tampered", "validate"),
        ("no_hyper_parameters", "fit"),
        ("no_hyper_parameters", "validate"),
        ("no_state_dict", "fit"),
        ("no_state_dict", "validate"),
        ("no_optimizer_states", "fit"),
        ("no_loops", "fit"),
        ("no_global_step", "validate"),
        ("bare_state_dict", "fit"),
        ("bare_state_dict", "validate"),
        ("not_torch", "validate"),
    ],
)
def test_a_damaged_or_incomplete_checkpoint_is_refused_naming_the_file(
    trained_checkpoint, tmp_path, monkeypatch, capfd, kind, subcommand
):
    config, checkpoint = trained_checkpoint
    bad = tmp_path / f"{kind}.ckpt"
    expected = _damaged_checkpoint(kind, checkpoint, bad)
    # A changed config flag: without the checkpoint's config it would go through unchecked.
    args = [subcommand, "--config", str(config), "--ckpt_path", str(bad)]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--model.model.moe.tau", "0.5"]
    code, err = _main(args, monkeypatch, capfd)
    line = _the_error_line(err)
    assert code == 2
    assert f"ckpt_path='{bad}'" in line and expected in line, line
    assert not list(tmp_path.glob("run/**/*.ckpt"))


def test_a_weights_only_checkpoint_validates_but_does_not_resume(
    trained_checkpoint, tmp_path, monkeypatch, capfd
):
    import torch

    config, checkpoint = trained_checkpoint
    weights_only = tmp_path / "weights.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    for key in ("optimizer_states", "lr_schedulers"):
        del saved[key]
    torch.save(saved, weights_only)
    root = ["--trainer.default_root_dir", str(tmp_path / "run")]
    cli_main(["validate", "--config", str(config), "--ckpt_path", str(weights_only), *root])
    capfd.readouterr()
    code, err = _main(
        ["fit", "--config", str(config), "--ckpt_path", str(weights_only), *root],
        monkeypatch,
        capfd,
    )
    assert code == 2 and "lacks 'optimizer_states' (the AdamW state)" in _the_error_line(err)


def _repeated_tau(config: Path) -> tuple[Path, int, int]:
    """``config`` with ``tau:`` given twice under ``model.model.moe``, and both lines."""
    lines = config.read_text().splitlines()
    moe = lines.index("    moe:")
    lines[moe + 1 : moe + 1] = ["      tau: 0.5", "      tau: 2.0"]
    repeated = config.with_name("repeated.yaml")
    repeated.write_text("\n".join(lines) + "\n")
    return repeated, moe + 2, moe + 3


def test_a_key_given_twice_in_a_config_is_refused_with_both_lines(
    corpus_dir, tmp_path, monkeypatch, capfd
):
    repeated, first, second = _repeated_tau(tiny_config(tmp_path, corpus_dir))
    code, err = _main(["fit", "--config", str(repeated)], monkeypatch, capfd)
    line = _the_error_line(err)
    assert code == 2
    assert str(repeated) in line and "'tau'" in line and f"lines {first} and {second}" in line
    assert not (tmp_path / "run").exists()


def test_the_drivers_read_user_yaml_with_the_same_check(corpus_dir, tmp_path):
    """compare (its configs, its run records) and frontier (its spec) refuse a repeated key."""
    from experiments.compare import RUN_CONFIG_FILE, config_mismatch, effective_config
    from experiments.frontier import load_spec

    repeated, first, second = _repeated_tau(tiny_config(tmp_path, corpus_dir))
    with pytest.raises(ValueError, match=f"'tau' is given twice .* lines {first} and {second}"):
        effective_config(repeated, 0, tmp_path / "run", [])
    record = tmp_path / "record"
    record.mkdir()
    (record / RUN_CONFIG_FILE).write_text("seed_everything: 0\nseed_everything: 1\n")
    with pytest.raises(ValueError, match="'seed_everything' is given twice .* lines 1 and 2"):
        config_mismatch(record, {"seed_everything": 0})
    spec = tmp_path / "spec.yaml"
    spec.write_text("seeds: [0]\nseeds: [1]\n")
    with pytest.raises(ValueError, match=f"{spec}: key 'seeds' is given twice .* lines 1 and 2"):
        load_spec(spec)


def test_yaml_merge_keys_may_be_overridden():
    from models.cli import load_yaml

    text = "base: &base {tau: 1.0, k: 2}\nmoe:\n  <<: *base\n  tau: 0.5\n"
    assert load_yaml(text, "x.yaml")["moe"] == {"tau": 0.5, "k": 2}
    with pytest.raises(ValueError, match="x.yaml: key 'k' is given twice"):
        load_yaml("{k: 1, k: 2}", "x.yaml")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a YAML text file: it is binary"),
        (b"trainer:\n  max_steps: \xff\xfe\n", "is not a YAML text file: it is not UTF-8"),
        (b"trainer: [1, 2\n", "is not valid YAML (line 2, column 1)"),
        (b"- fit\n- validate\n", "holds a list, not a mapping"),
    ],
    ids=["empty", "comment_only", "binary", "not_utf8", "syntax", "list"],
)
def test_an_unusable_config_file_is_one_line_naming_it(
    tmp_path, monkeypatch, capfd, content, expected
):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    code, err = _main(["fit", "--config", str(config)], monkeypatch, capfd)
    line = _the_error_line(err)
    assert code == 2 and f"--config {config}" in line and expected in line, line


def test_a_gpu_accelerator_on_a_machine_without_one_names_the_flag(
    corpus_dir, tmp_path, monkeypatch, capfd
):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    for accelerator in (
        CUDAAccelerator,
        MPSAccelerator,
    ):  # this machine has no GPU, whatever it has
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))
    config = tiny_config(tmp_path, corpus_dir)
    for name in ("gpu", "cuda"):
        code, err = _main(
            ["fit", "--config", str(config), "--trainer.accelerator", name], monkeypatch, capfd
        )
        line = _the_error_line(err)
        assert code == 2 and f"trainer.accelerator='{name}'" in line, line
        assert "--trainer.accelerator cpu" in line
    assert not list(tmp_path.glob("run/**/*.ckpt"))


def test_a_diverging_run_is_one_line_naming_the_step_and_the_learning_rate(
    corpus_dir, tmp_path, monkeypatch, capfd
):
    config = tiny_config(tmp_path, corpus_dir)
    code, err = _main(
        ["fit", "--config", str(config), "--model.optim.lr", "1e6"], monkeypatch, capfd
    )
    line = _the_error_line(err)
    assert code == 2
    assert re.search(r"optimizer step \d+: .* not finite|optimizer step \d+: the loss is", line)
    assert "training diverged" in line and "lower --model.optim.lr (now 1e+06)" in line


def test_an_unwritable_root_dir_is_one_line_naming_the_flag(
    corpus_dir, tmp_path, monkeypatch, capfd
):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # a folder below a file cannot be made, even by root
    config = tiny_config(tmp_path, corpus_dir)
    root = str(not_a_folder / "run")
    code, err = _main(
        ["fit", "--config", str(config), "--trainer.default_root_dir", root], monkeypatch, capfd
    )
    line = _the_error_line(err)
    assert code == 2 and f"trainer.default_root_dir='{root}' is not a writable folder" in line


@pytest.mark.parametrize("where", ["scanning_files", "building_blocks"])
def test_ctrl_c_before_training_exits_130_without_a_traceback(
    corpus_dir, tmp_path, monkeypatch, capfd, where
):
    import models.data

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "scanning_files":  # in the data module's constructor
        monkeypatch.setattr(models.data, "resolve_files", interrupt)
    else:  # in prepare_data, inside trainer.fit (Lightning would exit with 1)
        monkeypatch.setattr(models.data.ByteCorpusDataModule, "_load_splits", interrupt)
    config = tiny_config(tmp_path, corpus_dir)
    code, err = _main(["fit", "--config", str(config)], monkeypatch, capfd)
    assert code == 130
    assert "interrupted (Ctrl-C)" in _the_error_line(err)
    assert not list(tmp_path.glob("run/**/*.ckpt"))


def test_a_bug_keeps_its_traceback_and_the_switch_shows_every_one(
    corpus_dir, tmp_path, monkeypatch
):
    config = tiny_config(tmp_path, corpus_dir)

    def bug(self, blocks_BL):
        raise ZeroDivisionError("a bug in the model")

    monkeypatch.setattr(MoELanguageModel, "_loss", bug)
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(config)])
    with pytest.raises(ZeroDivisionError, match="a bug in the model"):
        main()
    monkeypatch.setenv("MOE_ROUTER_TRACEBACK", "1")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(empty)])
    with pytest.raises(ValueError, match="is empty"):
        main()
