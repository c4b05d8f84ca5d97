"""LightningModule: schedule, bias update after the optimizer step, exact resume, DDP state."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from models_testing import tiny_config, tiny_datamodule, tiny_module, tiny_trainer

from models.lit_module import warmup_cosine

REPO = Path(__file__).resolve().parents[2]

# Every piece of router state that must survive a resume: expert bias, tau schedule.
STATEFUL_MOE = {
    "expert_bias": True,
    "bias_update_rate": 0.05,
    "tau_schedule": "anneal",
    "tau_final": 0.3,
    "anneal_steps": 6,
    "z_loss_coef": 1e-3,
}


def test_warmup_cosine_reference():
    values = [warmup_cosine(step, 4, 14, 0.1) for step in range(16)]
    assert values[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))


def test_bias_update_gets_the_loads_of_every_micro_batch(corpus_dir, tmp_path):
    L.seed_everything(0)
    module = tiny_module(moe=STATEFUL_MOE)
    recorded_loads = {i: [] for i in range(2)}
    updates = {i: [] for i in range(2)}
    for index, layer in enumerate(module.net.moe_layers):
        router = layer.router

        def record_forward(mod, args, routing, index=index):
            if mod.training:
                recorded_loads[index].append(routing.tokens_per_expert_E.detach().clone())

        router.register_forward_hook(record_forward)
        original_update = router.expert_bias.update

        def record_update(loads_E, index=index, router=router, original=original_update):
            updates[index].append((loads_E.clone(), router.expert_bias.bias_E.clone()))
            original(loads_E)

        router.expert_bias.update = record_update
    trainer = tiny_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path))

    tokens_per_micro_batch = 4 * 16 * 2  # B * S * K
    for index, layer in enumerate(module.net.moe_layers):
        loads = recorded_loads[index]
        assert len(loads) == 6 and len(updates[index]) == 3
        bias_E = torch.zeros(4)
        for step, (passed_E, bias_before_E) in enumerate(updates[index]):
            expected_E = loads[2 * step] + loads[2 * step + 1]
            torch.testing.assert_close(passed_E, expected_E)
            assert passed_E.sum() == 2 * tokens_per_micro_batch
            # Slow reference of the DeepSeek-V3 update, replayed from the recorded loads.
            torch.testing.assert_close(bias_before_E, bias_E)
            bias_E = bias_E + 0.05 * torch.sign(expected_E.mean() - expected_E)
            bias_E = bias_E - bias_E.mean()
        torch.testing.assert_close(layer.router.expert_bias.bias_E, bias_E)
        assert bias_E.abs().sum() > 0
        assert int(layer.router.schedule_step) == 3  # one schedule step per optimizer step
    # The routers' own load accumulators are empty after the last step.
    assert not any(layer.router.expert_bias.pending_load_E.any() for layer in module.net.moe_layers)


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _run(
    corpus_dir, tmp_path, root: Path, *, gate="soft_topk", moe=None, stop_at=None, ckpt_path=None
):
    L.seed_everything(0)
    module = tiny_module(gate, moe=STATEFUL_MOE if moe is None else moe)
    callbacks = [
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)
    ]
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    trainer = tiny_trainer(
        root, max_steps=6, callbacks=callbacks, enable_checkpointing=True, gradient_clip_val=1.0
    )
    trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path), ckpt_path=ckpt_path)
    return module, trainer


# Every option with router state that a checkpoint must carry: (gate, moe options, the state-dict
# keys of that state, which must have moved by the checkpoint's step).
RESUME_CASES = {
    "expert_bias_and_anneal": ("soft_topk", STATEFUL_MOE, ("expert_bias.bias_E", "schedule_step")),
    "expert_bias": (
        "soft_topk",
        {"expert_bias": True, "bias_update_rate": 0.05},
        ("expert_bias.bias_E",),
    ),
    "tau_anneal": (
        "soft_topk",
        {"tau_schedule": "anneal", "tau_final": 0.3, "anneal_steps": 6},
        ("anneal.schedule_step",),
    ),
    "sparse_target_active": (
        "sparse_soft_topk",
        {"target_active": 1.5, "budget_update_rate": 0.2},
        ("budget_controller.budget",),
    ),
    "balanced_load": (
        "balanced_soft_topk",
        {"balance_target": "load"},
        ("balance.mu_E", "balance.warm_mu_E"),
    ),
    "balanced_mass": (
        "balanced_soft_topk",
        {"balance_target": "mass"},
        ("balance.mu_E", "balance.warm_mu_E"),
    ),
    "balanced_window": (
        "balanced_soft_topk",
        {"balance_window": 80},  # 3 steps x 64 tokens leave the ring's position at 32
        ("balance.mu_E", "balance.warm_mu_E", "balance.window_logits_WE", "balance.window_pos"),
    ),
    # (the tiny router's supports span every expert here, so its loads balance at mu = 0)
    "balanced_sparse_target_active": (
        "balanced_soft_topk",
        {"method": "sparse", "target_active": 1.5, "budget_update_rate": 0.2},
        ("budget_controller.budget",),
    ),
    "relu_l1": ("relu", {}, ("l1_coef",)),
    "default_moe": ("topk", {"default_moe_beta": 0.9}, ("default_ED",)),
    # the input jitter draws from the router's checkpointed counter, not torch's generator
    "jitter": ("topk", {"jitter_eps": 0.1, "expert_bias": True}, ("jitter_step",)),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_a_mid_run_checkpoint_is_exact(corpus_dir, tmp_path, case):
    """A 6-step fit resumed from its step-3 checkpoint ends bitwise where the uninterrupted
    6-step fit ends: weights, router state and the final validation."""
    gate, moe, state_keys = RESUME_CASES[case]
    run = {"gate": gate, "moe": moe}
    full, _ = _run(corpus_dir, tmp_path, tmp_path / "full", **run)
    stopped, stopped_trainer = _run(corpus_dir, tmp_path, tmp_path / "part", stop_at=3, **run)
    assert stopped_trainer.global_step == 3
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    resumed, resumed_trainer = _run(
        corpus_dir, tmp_path, tmp_path / "resumed", ckpt_path=last, **run
    )
    assert resumed_trainer.global_step == 6

    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    initial_state = tiny_module(gate, moe=moe).state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in state_keys:
        names = [name for name in full_state if name.endswith(key)]
        assert len(names) == 2, key  # one per MoE layer
        for name in names:  # the state really moved by step 3, so the check is not vacuous
            assert not torch.equal(stopped.state_dict()[name], initial_state[name]), name
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=0, msg=name)
    # The half-way weights really differ, so the equality above is not vacuous.
    assert not torch.equal(stopped.state_dict()["net.embed.weight"], full_state["net.embed.weight"])
    assert resumed.last_val["step"] == full.last_val["step"] == 6
    assert resumed.last_val["loss"] == full.last_val["loss"]
    for name, values in full.last_val["layers"].items():
        for key, value in values.items():
            assert torch.equal(resumed.last_val["layers"][name][key], value), (name, key)


def test_a_checkpoint_without_its_config_is_refused_not_resumed_unchecked(corpus_dir, tmp_path):
    """Without `hyper_parameters` the config guard has nothing to compare: refuse the checkpoint
    rather than resume it with a changed setting (here tau)."""
    _run(corpus_dir, tmp_path, tmp_path / "part", stop_at=3)
    saved = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", weights_only=True)
    del saved["hyper_parameters"]
    stripped = tmp_path / "stripped.ckpt"
    torch.save(saved, stripped)
    module = tiny_module(moe={**STATEFUL_MOE, "tau": 0.5})
    trainer = tiny_trainer(tmp_path / "resumed", max_steps=6)
    with pytest.raises(ValueError, match=r"stripped.ckpt' lacks 'hyper_parameters' \(the model"):
        trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path), ckpt_path=stripped)
    assert trainer.global_step == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_keep_identical_router_state(corpus_dir, tmp_path):
    config = tiny_config(tmp_path, corpus_dir, moe=STATEFUL_MOE, max_steps=4)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "ddp_probe.RouterStateProbe"})
    config.write_text(yaml.safe_dump(settings))
    env = {
        **os.environ,
        "MOE_PROBE_DIR": str(tmp_path / "probe"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "fit",
            "--config",
            str(config),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "probe" / "rank0.pt")
    rank1 = torch.load(tmp_path / "probe" / "rank1.pt")
    bias_names = [name for name in rank0 if name.endswith("expert_bias.bias_E")]
    assert len(bias_names) == 2
    for name in bias_names:
        assert rank0[name].abs().sum() > 0  # the bias did move
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name
    assert "validation loss" in result.stdout
    # Epoch-level logs are synced (the metrics already are): no per-key sync_dist warning.
    assert "sync_dist" not in result.stdout + result.stderr


def test_final_table_reports_the_training_batches_since_the_previous_validation(
    corpus_dir, tmp_path
):
    from models.summary import format_table

    module = tiny_module("balanced_soft_topk")
    trainer = tiny_trainer(tmp_path, max_steps=7)  # validations after steps 3 and 6
    trainer.fit(module, datamodule=tiny_datamodule(corpus_dir, tmp_path))
    train_layers = module.last_val["train_layers"]
    assert list(train_layers) == module.moe_layer_names
    for values in train_layers.values():
        assert values["batches"] == 3  # steps 4-6: the interval restarts at each validation
        # balanced_soft_topk solves every training batch's thresholds for an equal load
        assert float(values["max_vio_batch_mean"]) <= 0.05
        assert float(values["active_experts_per_token"]) == 2.0
    table = format_table({"gate": "balanced_soft_topk", "final_val": module.last_val})
    assert "Training batches since the previous validation" in table
    assert "layer0: 3 batches, MaxVio (batch mean)" in table
