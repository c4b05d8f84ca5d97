"""Run callbacks: non-finite guard, corrupted checkpoints, checkpoint on SIGINT / SIGTERM,
routing logs in TensorBoard, MoE-aware parameter summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from models_testing import (
    nan_loss_at,
    tiny_config,
    tiny_datamodule,
    tiny_module,
    tiny_trainer,
    weights,
)

from models.callbacks import (
    CheckpointOnSignal,
    NonFiniteGuard,
    NonFiniteLossError,
    parameter_summary,
    routing_tags,
)

REPO = Path(__file__).resolve().parents[2]


class _Snapshots(L.Callback):
    """The module's weights at the end of every optimizer step, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.by_step[trainer.global_step] = weights(pl_module)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize(
    ("where", "message"),
    [("loss", "optimizer step 3: the loss is nan"), ("grad", "optimizer step 3: a gradient")],
)
def test_non_finite_step_stops_before_the_weights_change(corpus_dir, tmp_path, where, message):
    L.seed_everything(0)
    module = tiny_module()
    nan_loss_at(module, step=3, where=where)
    snapshots = _Snapshots()
    trainer = tiny_trainer(tmp_path, max_steps=5, callbacks=[snapshots])
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path))
    assert trainer.global_step == 2
    _assert_same(weights(module), snapshots.by_step[2])  # the bad step was never applied
    assert all(torch.isfinite(value).all() for value in weights(module).values())


def test_non_finite_step_is_skipped_when_asked(corpus_dir, tmp_path):
    L.seed_everything(0)
    module = tiny_module()
    nan_loss_at(module, step=3)
    snapshots = _Snapshots()
    guard = NonFiniteGuard(action="skip")
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[snapshots, guard])
    with pytest.warns(UserWarning, match="optimizer step 3 skipped: the loss is nan"):
        trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path))
    assert trainer.global_step == 4 and guard.skipped_steps == [3]
    _assert_same(snapshots.by_step[3], snapshots.by_step[2])  # step 3 left the weights alone
    changed = [n for n in snapshots.by_step[4] if "net." in n]
    assert any(not torch.equal(snapshots.by_step[4][n], snapshots.by_step[3][n]) for n in changed)
    assert all(torch.isfinite(value).all() for value in weights(module).values())


def test_guard_arguments():
    with pytest.raises(ValueError, match="action='ignore' is not allowed"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match="max_skipped_in_a_row=0"):
        NonFiniteGuard(max_skipped_in_a_row=0)


def _checkpointed_run(corpus_dir, tmp_path, root: Path, max_steps: int, callbacks=(), **fit):
    L.seed_everything(0)
    module = tiny_module()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1000)
    trainer = tiny_trainer(
        root, max_steps=max_steps, callbacks=[*callbacks, checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path), **fit)
    return module, trainer


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("exp_avg_sq", r"exp_avg_sq \(an Adam second moment\) holds 1 negative values"),
        ("weight", r"state_dict\['net.embed.weight'\] holds non-finite values \(1 of 4096\)"),
    ],
)
def test_corrupted_checkpoint_is_refused(corpus_dir, tmp_path, corrupt, message):
    _checkpointed_run(corpus_dir, tmp_path, tmp_path / "a", max_steps=2)
    checkpoint = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=False)
    if corrupt == "exp_avg_sq":
        state = next(iter(checkpoint["optimizer_states"][0]["state"].values()))
        state["exp_avg_sq"].view(-1)[0] = -1.0
    else:
        checkpoint["state_dict"]["net.embed.weight"][0, 0] = float("nan")
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match=f"checkpoint '{bad}' is corrupted: .*{message}"):
        _checkpointed_run(corpus_dir, tmp_path, tmp_path / "b", max_steps=4, ckpt_path=str(bad))


# -------------------------------------------------------------------------------- signals


class _SignalAt(L.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_sigint_saves_the_step_and_a_resume_loses_nothing(corpus_dir, tmp_path):
    full, _ = _checkpointed_run(corpus_dir, tmp_path, tmp_path / "full", max_steps=4)
    previous = signal.getsignal(signal.SIGINT)
    stopped, trainer = _checkpointed_run(
        corpus_dir,
        tmp_path,
        tmp_path / "part",
        max_steps=4,
        callbacks=[_SignalAt(2, signal.SIGINT)],
    )
    assert signal.getsignal(signal.SIGINT) is previous  # handed back after training
    assert trainer.global_step == 2
    handler = next(cb for cb in trainer.callbacks if isinstance(cb, CheckpointOnSignal))
    saved = tmp_path / "part" / "ckpt" / "last.ckpt"
    assert handler.received == signal.SIGINT and handler.checkpoint_path == saved
    assert torch.load(saved, weights_only=False)["global_step"] == 2

    resumed, resumed_trainer = _checkpointed_run(
        corpus_dir, tmp_path, tmp_path / "resumed", max_steps=4, ckpt_path=str(saved)
    )
    assert resumed_trainer.global_step == 4
    _assert_same(weights(resumed), weights(full))
    assert not torch.equal(weights(stopped)["net.embed.weight"], weights(full)["net.embed.weight"])


@pytest.mark.slow  # a fresh interpreter: ~15 s of imports before the first step
def test_sigterm_to_a_training_process_saves_and_exits_143(corpus_dir, tmp_path):
    config = tiny_config(
        tmp_path, corpus_dir, max_steps=100, val_check_interval=100, checkpoint_every=100
    )
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:  # the first progress line (step 10) means training runs
        lines.append(line)
        if line.startswith("[progress] step"):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, output
    saved = next((tmp_path / "run").glob("csv/version_0/checkpoints/last.ckpt"))
    step = torch.load(saved, weights_only=False)["global_step"]
    assert 10 <= step < 100
    assert f"SIGTERM: saved {saved} at step {step}/100" in output


# -------------------------------------------------------------------------------- routing


def test_routing_logger_writes_tau_bias_and_load_share_to_tensorboard(corpus_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    moe = {"expert_bias": True, "bias_update_rate": 0.05, "tau_schedule": "anneal"}
    module = tiny_module(moe={**moe, "tau_final": 0.3, "anneal_steps": 4})
    loads = []  # per training forward: [layers, experts]
    for index, layer in enumerate(module.net.moe_layers):

        def record(mod, args, routing, index=index):
            if mod.training:
                if index == 0:
                    loads.append([])
                loads[-1].append(routing.tokens_per_expert_E.detach().float().clone())

        layer.router.register_forward_hook(record)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = tiny_trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=2)
    trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path))

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    for layer_index, (name, layer) in enumerate(
        zip(module.moe_layer_names, module.net.moe_layers, strict=True)
    ):
        tags = routing_tags(name)
        taus = events.Scalars(tags["tau"])
        assert [e.step for e in taus] == [2, 4]
        assert taus[-1].value == pytest.approx(float(layer.router.tau))
        assert taus[0].value > taus[-1].value  # annealed
        for expert in range(4):
            bias = events.Scalars(f"{tags['bias']}e{expert}")
            assert bias[-1].value == pytest.approx(float(layer.router.expert_bias.bias_E[expert]))
        for interval, step in enumerate((2, 4)):
            counts = torch.stack([loads[i][layer_index] for i in (2 * interval, 2 * interval + 1)])
            expected = counts.sum(0) / counts.sum()
            logged = [
                next(e.value for e in events.Scalars(f"{tags['load']}e{x}") if e.step == step)
                for x in range(4)
            ]
            torch.testing.assert_close(torch.tensor(logged), expected)


# -------------------------------------------------------------------------------- summary


def test_parameter_summary_counts_active_experts():
    module = tiny_module()
    total = sum(p.numel() for p in module.parameters())
    expert = 2 * 4 * 3 * 16 * 16  # layers x experts x (w1, w3, w2) x D x F
    active = total - expert + expert * 2 // 4
    text = parameter_summary(module)
    assert f"Parameters: {total / 1e3:.1f} K ({total / 1e3:.1f} K trainable)" in text
    assert f"hold {expert / 1e3:.1f} K" in text
    assert f"active per token {active / 1e3:.1f} K" in text and "k=2 of 4" in text
    sparse = tiny_module(gate="sparse_soft_topk")
    slots = total - expert + expert * 4 // 4  # max_active = min(E, 2k) = 4 slots
    assert f"up to {slots / 1e3:.1f} K" in parameter_summary(sparse)
