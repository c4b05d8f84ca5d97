"""Training-step time of every router family of a frontier spec at each of its shapes, CPU.

For each panel of the spec (the grid's, then the scale step's with its families) and each
family run there, the model the frontier trains: the family's config with the point's
arguments and, where the spec's tuning is recorded, the family's winning settings. One step is
what a run does per optimizer step: forward, LM loss plus the routers' auxiliary losses,
backward, gradient clipping at the config's value, AdamW under the config's schedule, and the
routers' per-step state (the optimizer hook the Lightning module registers). Lightning's own
per-step overhead (logging, callbacks) is the same for every family and is left out.

Every model first trains ``--warmup`` steps on the training stream (so that ReMoE's L1
controller and the budget controllers reach the support they train at), then the steps of all
models are timed in interleaved rounds (``_timing.round_robin_ms``), so a change of the
machine's load hits every family alike; medians, at one thread on the process CPU clock by
default. The table gives each family's step time against the spec's baseline at the same
panel, and the experts computed per token during the timed steps.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_time.py --spec configs/frontier_decide.yaml
    python benchmarks/bench_step_time.py --spec configs/frontier_decide.yaml --smoke

Unknown arguments (``--trainer.max_steps 3``) are the frontier's extra arguments of every run:
give the ones the tuning was run with, so the families' winning settings are found.

Writes benchmarks/results/step_time.{md,json}, which ``train.py frontier`` reads for its
loss-vs-time row and ``--budget``. ``--smoke`` (a few seconds: 1 warmup and 2 timed steps on
random bytes, grid panels only) checks the script and writes only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import _timing as timing  # noqa: E402

from experiments.compare import TRAIN_SCRIPT, find_summary, fit_arguments  # noqa: E402
from experiments.frontier import Point, Spec, load_spec  # noqa: E402
from models.config import ModelConfig, OptimConfig  # noqa: E402
from models.lit_module import MoELanguageModel, warmup_cosine  # noqa: E402
from moe_router.stepping import register_optimizer_hooks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time"


def fit_settings(config: Path, overrides: list[str]) -> dict[str, Any]:
    """The config file with ``--a.b value`` / ``--a.b=value`` arguments applied (values read
    as YAML, as the CLI reads them). The frontier's arguments are plain values, so this is the
    config ``train.py fit`` would build, without starting LightningCLI for each family."""
    settings = copy.deepcopy(yaml.safe_load(config.read_text()) or {})
    pairs = []
    i = 0
    while i < len(overrides):
        argument = overrides[i]
        if "=" in argument:
            pairs.append(tuple(argument.split("=", 1)))
            i += 1
        else:
            pairs.append((argument, overrides[i + 1]))
            i += 2
    for flag, value in pairs:
        *parents, leaf = flag.removeprefix("--").split(".")
        node = settings
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return settings


class StepTimer:
    """One family's model at one panel, and its training step.

    Args:
        point: The frontier point (its family's config and arguments).
        extra: Further arguments of every run.
        batches: The training batches, cycled.
    """

    def __init__(self, point: Point, extra: list[str], batches: list[torch.Tensor]) -> None:
        settings = fit_settings(point.family.config, point.overrides(extra))
        model = settings.get("model") or {}
        self.model_config = ModelConfig(**(model.get("model") or {}))
        optim = dict(model.get("optim") or {})
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        self.optim_config = OptimConfig(**optim)
        moe = self.model_config.moe
        if moe.tau_schedule == "anneal" and moe.anneal_steps is None:
            # the CLI sets it to trainer.max_steps
            steps = (settings.get("trainer") or {}).get("max_steps", 1000)
            self.model_config.moe = dataclasses.replace(moe, anneal_steps=steps)
        torch.manual_seed(point.seed)
        self.module = MoELanguageModel(self.model_config, self.optim_config)
        self.module.train()
        decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim_config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim_config.lr,
            betas=self.optim_config.betas,
            eps=self.optim_config.eps,
        )
        total = int((settings.get("trainer") or {}).get("max_steps", 1000))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(
                step, self.optim_config.warmup_steps, total, self.optim_config.min_lr_ratio
            ),
        )
        self.hook = register_optimizer_hooks(self.optimizer, self.module.net)
        self.clip = (settings.get("trainer") or {}).get("gradient_clip_val")
        self.batches = batches
        self.steps = 0
        self.active: list[float] = []
        self.record_active = False

    def step(self) -> None:
        """One optimizer step on the next batch."""
        batch = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        lm_loss, routings = self.module._loss(batch)
        loss = lm_loss + sum(routing.aux_loss for routing in routings)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.record_active:
            self.active.append(
                statistics.fmean(float(r.valid_TK.sum(-1).float().mean()) for r in routings)
            )


def fit_step_ms(point: Point, steps: int, threads: int) -> float:
    """Milliseconds per training step of a short ``train.py fit`` of ``point`` (its
    throughput, validation excluded): the bare step plus the training loop's own work."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        overrides = point.overrides(
            ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
            + ["--data.max_val_blocks", "8"]
        )
        command = [sys.executable, str(TRAIN_SCRIPT)]
        command += fit_arguments(point.family.config, point.seed, run_dir, overrides)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, env=env, check=True, capture_output=True)
        summary = find_summary(run_dir)
        if summary is None or not summary.get("tokens_per_s"):
            raise RuntimeError(f"the calibration fit wrote no throughput: {json.dumps(summary)}")
        tokens = fit_settings(point.family.config, overrides).get("data") or {}
        per_step = int(tokens.get("batch_size", 16)) * int(tokens.get("seq_len", 128))
        return per_step / summary["tokens_per_s"] * 1e3


def training_batches(spec: Spec, count: int, source: str, seed: int) -> list[torch.Tensor]:
    """``count`` training batches of the baseline's data settings: the real stream of seed
    ``seed`` (``corpus``) or uniform random bytes (``random``, for a smoke run)."""
    data = fit_settings(spec.baseline.config, []).get("data") or {}
    batch_size, seq_len = int(data.get("batch_size", 16)), int(data.get("seq_len", 128))
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return [
            torch.randint(0, 256, (batch_size, seq_len + 1), generator=generator)
            for _ in range(count)
        ]
    from models.data import BlockStream, ByteCorpusDataModule

    module = ByteCorpusDataModule(**{**data, "seed": seed})
    module.setup("fit")
    stream = iter(BlockStream(module.train_blocks_NL, batch_size, seed))
    return [torch.stack([next(stream) for _ in range(batch_size)]).long() for _ in range(count)]


def contenders(spec: Spec, smoke: bool) -> list[Point]:
    """One point per panel and family: the grid's panels, then the scale step's (not in a
    smoke run), seed 0."""
    points = [p for p in spec.all_points() if p.seed == spec.seeds_of(p.panel.name)[0]]
    if smoke and spec.scale is not None:
        points = [p for p in points if p.panel.name != spec.scale.panel.name]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("configs/frontier_decide.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=100, help="untimed training steps first")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each model")
    parser.add_argument(
        "--data", choices=("corpus", "random"), default=None, help="corpus (default) or random"
    )
    parser.add_argument(
        "--calibrate_steps",
        type=int,
        default=100,
        help="steps of one train.py fit of the first point, for the training loop's own cost "
        "per step (0: none)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds: a check only")
    parser.add_argument("--out", type=Path, default=None, help=f"results stem (default {RESULTS})")
    timing.add_clock_argument(parser)
    args, extra = parser.parse_known_args()
    if args.smoke:
        args.warmup, args.repeats, args.calibrate_steps = 1, 2, 0
    data = args.data or ("random" if args.smoke else "corpus")
    clock = args.clock or timing.default_clock(args.threads)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    tuned = "configured (no tuning section)"
    if spec.tuning is not None:
        from experiments.frontier_tune import apply_tuning

        spec, notes = apply_tuning(spec, extra, required=False)
        tuned = "; ".join(notes) or "configured (tuning not recorded yet)"
    points = contenders(spec, args.smoke)
    batches = training_batches(spec, args.warmup + args.repeats + 1, data, 0)
    load_before = timing.machine_load()
    timers = {(p.panel.name, p.family.name): StepTimer(p, extra, batches) for p in points}
    for timer in timers.values():
        for _ in range(args.warmup):
            timer.step()
        timer.record_active = True
    medians = timing.round_robin_ms(
        {f"{panel}/{family}": (t.step, args.repeats) for (panel, family), t in timers.items()},
        warmup=0,
        clock=clock,
    )
    load_after = timing.machine_load()
    first = points[0]
    overhead_ms = 0.0
    if args.calibrate_steps:
        fit_ms = fit_step_ms(first, args.calibrate_steps, args.threads)
        overhead_ms = max(0.0, fit_ms - medians[f"{first.panel.name}/{first.family.name}"])
    baseline = spec.baseline.name
    rows, table_rows = [], []
    for (panel, family), timer in timers.items():
        ms = medians[f"{panel}/{family}"]
        tokens = timer.batches[0][:, 1:].numel()
        base = medians.get(f"{panel}/{baseline}")
        active = statistics.fmean(timer.active) if timer.active else float("nan")
        run_ms = ms + overhead_ms
        rows.append(
            {
                "panel": panel,
                "family": family,
                "gate": timer.model_config.gate,
                "model_step_ms": ms,
                "step_ms": run_ms,
                "tokens_per_step": tokens,
                "tokens_per_s": tokens / (run_ms / 1e3),
                "vs_baseline": ms / base if base else None,
                "active_per_token": active,
            }
        )
        table_rows.append(
            [
                panel,
                family,
                timer.model_config.gate,
                f"{ms:.1f}",
                "—" if family == baseline or not base else f"{ms / base:.2f}",
                f"{run_ms:.1f}",
                f"{tokens / (run_ms / 1e3):.0f}",
                f"{active:.2f}",
            ]
        )
    header = [
        "panel", "family", "gate", "model step ms", f"x {baseline}", "run step ms",
        "run tokens/s", "active/token",
    ]  # fmt: skip
    calibration = (
        f"Run step = model step + {overhead_ms:.1f} ms, the training loop's own cost per step: "
        f"a {args.calibrate_steps}-step `train.py fit` of {first.key} measured "
        f"{fit_ms:.1f} ms per step (its tokens/s, validation excluded) against its model step "
        "here."
        if args.calibrate_steps
        else "Run step = model step (no calibration against a `train.py fit`)."
    )
    text = "\n".join(
        [
            "# Training-step time per router family"
            + (" (SMOKE: not for reading)" if args.smoke else ""),
            "",
            f"Spec `{args.spec}`; torch {torch.__version__}, {platform.machine()}, "
            f"{args.threads} thread(s), {clock} clock; {args.warmup} untimed training steps per "
            f"model, then {args.repeats} timed steps each, interleaved round-robin; medians. "
            f"Batches: {data} ({batches[0].shape[0]} x {batches[0].shape[1] - 1} tokens). "
            f"Settings: {tuned}.",
            "",
            f"Machine load before: `{load_before}`; after: `{load_after}`. "
            + timing.load_verdict(load_before),
            "",
            calibration,
            "",
            timing.markdown_table(header, table_rows),
        ]
    )
    print(text)
    payload = {
        "spec": str(args.spec),
        "smoke": args.smoke,
        "threads": args.threads,
        "clock": clock,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "data": data,
        "settings": tuned,
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": load_after,
        "loop_overhead_ms": overhead_ms,
        "rows": rows,
    }
    stem = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if stem is not None:
        timing.save_results(stem, text, payload)
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")


if __name__ == "__main__":
    main()
