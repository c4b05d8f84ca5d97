"""Train and evaluate the small MoE transformer from YAML configs.

    python train.py compare --configs configs/main/topk.yaml configs/main/balanced.yaml --seeds 1
    python train.py fit --config configs/quickstart.yaml
    python train.py validate --config configs/quickstart.yaml --ckpt_path PATH.ckpt
    python train.py frontier --spec configs/frontier.yaml --jobs 2

``fit`` / ``validate`` are LightningCLI's (``models.cli.MoECLI``). ``compare`` (every config x
seed, then one table, ``report.md`` + ``report.png``) and ``frontier`` (loss against active-expert
compute) are the ``experiments`` package's drivers, dispatched before LightningCLI sees the
command line since they drive several runs (each a ``train.py fit`` process), not one Trainer.
``fit`` ends by printing where its checkpoints, logs, run summary and load heatmap went; Ctrl-C
or SIGTERM during ``fit`` saves ``last.ckpt`` after the current step (resume with
``--ckpt_path``).
"""

from experiments.compare import compare_main
from experiments.frontier import frontier_main
from models.cli import main

COMMANDS = {
    "compare": (
        "Run every config for every seed (one fit each), then print one comparison table and "
        "write report.md and report.png (see train.py compare --help).",
        compare_main,
    ),
    "frontier": (
        "Run every point of a loss-vs-compute frontier spec, then write its report "
        "(see train.py frontier --help).",
        frontier_main,
    ),
}

if __name__ == "__main__":
    main(COMMANDS)
