"""Train and evaluate the small MoE transformer from YAML configs.

    python train.py fit --config configs/quickstart.yaml
    python train.py validate --config configs/quickstart.yaml --ckpt_path PATH.ckpt
    python train.py compare --configs configs/topk.yaml configs/soft_topk.yaml --seeds 3

``fit`` / ``validate`` are LightningCLI's (``models.cli.MoECLI``); ``compare`` (every config x
seed, then ``report.md`` + ``report.png``) is ``models.compare``, dispatched before LightningCLI
sees the command line since it drives several runs, not one Trainer. ``fit`` ends by printing
where its checkpoints, logs, run summary and load heatmap went; Ctrl-C or SIGTERM during
``fit`` saves ``last.ckpt`` after the current step (resume with ``--ckpt_path``).
"""

from models.cli import main

if __name__ == "__main__":
    main()
