"""Helpers of the models tests: a tiny text corpus and a tiny training config."""

from __future__ import annotations

import random
import struct
import zipfile
from pathlib import Path

import lightning as L
import torch
import yaml

_WORDS = (
    "router expert token gate soft hard top load balance layer loss value weight bias "
    "temperature sparse dense tensor batch sequence model data train valid"
).split()


def write_corpus(folder: Path, num_files: int = 12, lines_per_file: int = 40, seed: int = 0):
    """Deterministic pseudo-English files ``doc00.txt`` ... under ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_files):
        lines = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(lines_per_file)]
        path = folder / f"doc{i:02d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def tiny_config(
    tmp_path: Path,
    corpus: Path,
    *,
    gate: str = "soft_topk",
    moe: dict | None = None,
    max_steps: int = 6,
    val_check_interval: int = 3,
    checkpoint_every: int = 3,
    name: str = "tiny.yaml",
) -> Path:
    """A runnable YAML config for a 2-layer, 4-expert model on ``corpus`` (seconds on CPU)."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "val_check_interval": val_check_interval,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "save_last": True,
                        "every_n_train_steps": checkpoint_every,
                        "save_top_k": -1,
                    },
                }
            ],
        },
        "model": {
            "model": {
                "d_model": 16,
                "n_layers": 2,
                "n_heads": 2,
                "num_experts": 4,
                "k": 2,
                "expert_d_ff": 16,
                "gate": gate,
                "moe": moe if moe is not None else {"z_loss_coef": 0.001},
            },
            "optim": {"lr": 0.01, "warmup_steps": 2},
        },
        "data": {
            "files": [str(corpus / "*.txt")],
            "seq_len": 16,
            "batch_size": 4,
            "max_val_blocks": 8,
            "cache_dir": str(tmp_path / "hf_cache"),
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_module(gate: str = "soft_topk", moe: dict | None = None):
    """A 2-layer, 4-expert ``MoELanguageModel`` for 16-token sequences."""
    from models.config import ModelConfig, OptimConfig
    from models.lit_module import MoELanguageModel

    config = ModelConfig(
        d_model=16,
        n_layers=2,
        n_heads=2,
        num_experts=4,
        k=2,
        expert_d_ff=16,
        max_seq_len=16,
        gate=gate,
        moe=dict(moe if moe is not None else {"z_loss_coef": 1e-3}),
    )
    return MoELanguageModel(config, OptimConfig(lr=0.01, warmup_steps=2))


def tiny_datamodule(corpus: Path, tmp_path: Path):
    """The byte corpus of ``corpus/*.txt`` in 17-byte blocks, batches of 4."""
    from models.data import ByteCorpusDataModule

    return ByteCorpusDataModule(
        files=[str(corpus / "*.txt")],
        seq_len=16,
        batch_size=4,
        max_val_blocks=8,
        cache_dir=str(tmp_path / "hf"),
    )


def tiny_trainer(root: Path, max_steps: int, callbacks=(), **kwargs):
    """A CPU trainer without logger, progress bar or checkpoints (unless ``kwargs`` say so)."""
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "val_check_interval": 3,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "enable_checkpointing": False,
        **kwargs,
    }
    return L.Trainer(callbacks=list(callbacks), **settings)


def weights(module) -> dict:
    """A detached copy of the module's floating-point state."""
    return {
        name: value.detach().clone()
        for name, value in module.state_dict().items()
        if value.is_floating_point()
    }


def nan_loss_at(module, step: int, where: str = "loss") -> None:
    """Makes optimizer step ``step`` (1-based) non-finite: its training loss is NaN
    (``where="loss"``), or its embedding gradient is (``where="grad"``, the loss stays finite)."""

    def at_step() -> bool:
        return module.training and module.trainer.global_step + 1 == step

    if where == "grad":
        module.net.embed.weight.register_hook(
            lambda grad: torch.full_like(grad, float("nan")) if at_step() else grad
        )
        return
    original = module._loss

    def loss(blocks_BL):
        lm_loss, routings = original(blocks_BL)
        return (lm_loss * float("nan") if at_step() else lm_loss), routings

    module._loss = loss


class NaNFinalValidation(L.Callback):
    """NaN weights for the validation pass at ``max_steps``, so the run's final validation
    loss is NaN (``--trainer.callbacks+=models_testing.NaNFinalValidation``)."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.global_step == trainer.max_steps:
            with torch.no_grad():
                pl_module.net.final_norm.weight.fill_(float("nan"))


def tamper_checkpoint(source: Path, target: Path) -> str:
    """Copies the checkpoint ``source`` to ``target`` with 4 bytes flipped in the middle of its
    largest tensor's data (the zip's CRC no longer matches; ``torch.load`` does not check it).

    Returns:
        The name of the tampered archive member.
    """
    with zipfile.ZipFile(source) as archive:
        member = max(
            (info for info in archive.infolist() if "/data/" in info.filename),
            key=lambda info: info.file_size,
        )
    assert member.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    raw = bytearray(source.read_bytes())
    # A local file header: 30 fixed bytes, then the name and the extra field.
    name_len, extra_len = struct.unpack(
        "<HH", raw[member.header_offset + 26 : member.header_offset + 30]
    )
    middle = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    for offset in range(middle, middle + 4):
        raw[offset] ^= 0xFF
    target.write_bytes(bytes(raw))
    return member.filename
