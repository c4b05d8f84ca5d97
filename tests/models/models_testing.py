"""Helpers of the models tests: a tiny text corpus and a tiny training config."""

from __future__ import annotations

import random
from pathlib import Path

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
