"""Soft routing in a Hugging Face Mixtral, trained with Lightning, side by side with top-k.

Builds a tiny Mixtral-style ``MixtralForCausalLM`` from a config (byte vocabulary, nothing
downloaded), swaps its routers with ``replace_routers``, trains each gate for a few hundred
steps on the embedded corpus (the Python standard library's sources, as ``train.py``) on CPU,
and prints the validation loss and the load-balance table of every gate, plus one heatmap with
a panel per gate::

    python examples/hf_soft_routing.py                       # topk vs soft_topk, 300 steps
    python examples/hf_soft_routing.py --gates topk soft_topk sparse_soft_topk --steps 500

About 20 s of CPU per gate (one thread) at the defaults, after a one-time preprocessing of the
corpus into the ``datasets`` cache.

Every gate starts from the same initial weights (same seed). Writes ``<out>/load_balance.md``
and ``<out>/load_balance.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
# models/ (the byte corpus) lives in the repository, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import moe_router  # noqa: E402
from models.data import VOCAB_SIZE, ByteCorpusDataModule  # noqa: E402
from moe_router.integrations.transformers import (  # noqa: E402
    LoadBalanceMonitor,
    replace_routers,
    router_aux_loss,
)

# Router settings per gate, after configs/topk.yaml and configs/soft_topk.yaml; every gate gets
# the same balancing (expert bias at configs/topk.yaml's rate u = 0.01, which a run of a few
# hundred steps needs, and the z-loss). Mixtral's own scoring (softmax, renormalised top-2)
# comes from the model; any other gate runs with the router's defaults plus BALANCING.
BALANCING: dict[str, Any] = {"expert_bias": True, "bias_update_rate": 0.01, "z_loss_coef": 1e-3}
GATE_OPTIONS: dict[str, dict[str, Any]] = {
    "topk": {},
    "soft_topk": {"tau": 1.0, "tau_schedule": "anneal", "tau_final": 0.1},
}


def tiny_mixtral_config(seq_len: int) -> MixtralConfig:
    """A 2-layer, 8-expert, top-2 Mixtral with a byte vocabulary (about 0.3M parameters)."""
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=seq_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


class HFCausalLM(L.LightningModule):
    """Next-byte loss of a patched HF model plus its routers' aux losses.

    Args:
        model: A model patched by ``replace_routers``.
        lr: Peak AdamW learning rate (linear warmup over the first 5% of steps, then cosine to
            a tenth).
        max_steps: Length of the run, for the schedule.
    """

    def __init__(self, model: MixtralForCausalLM, lr: float, max_steps: int) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.max_steps = max_steps
        self.monitor: LoadBalanceMonitor | None = None
        self.val_loss_sum = torch.zeros(())
        self.val_batches = 0

    def _lm_loss(self, blocks_BL: Tensor) -> Tensor:
        inputs_BS, targets_BS = blocks_BL[:, :-1].long(), blocks_BL[:, 1:].long()
        logits_BSV = self.model(input_ids=inputs_BS).logits
        return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())

    def training_step(self, blocks_BL: Tensor, batch_idx: int) -> Tensor:
        lm_loss = self._lm_loss(blocks_BL)
        aux_loss = router_aux_loss(self.model)  # this forward's per-layer aux losses, summed
        self.log_dict({"train/lm_loss": lm_loss, "train/aux_loss": aux_loss}, prog_bar=True)
        return lm_loss + aux_loss

    def on_validation_epoch_start(self) -> None:
        self.monitor = LoadBalanceMonitor(self.model)
        self.val_loss_sum, self.val_batches = torch.zeros(()), 0

    def validation_step(self, blocks_BL: Tensor, batch_idx: int) -> None:
        self.val_loss_sum += self._lm_loss(blocks_BL).detach().cpu()
        self.val_batches += 1

    def on_validation_epoch_end(self) -> None:
        self.monitor.close()  # keeps the pass's metrics for the report
        self.log("val/loss", self.val_loss_sum / max(1, self.val_batches))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.1)
        # After every optimizer step: expert-bias update from the step's loads, tau schedule.
        moe_router.register_optimizer_hooks(optimizer, self.model)
        warmup = max(1, self.max_steps // 20)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, self.max_steps - warmup, self.lr / 10
                ),
            ],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_gate(gate: str, args: argparse.Namespace, data: ByteCorpusDataModule) -> HFCausalLM:
    """Build the tiny Mixtral (same init for every gate), patch it, train it, validate it."""
    L.seed_everything(args.seed, verbose=False)
    model = MixtralForCausalLM(tiny_mixtral_config(args.seq_len))
    options = {**BALANCING, **GATE_OPTIONS.get(gate, {})}
    if options.get("tau_schedule") == "anneal":
        options["anneal_steps"] = args.steps
    replace_routers(model, gate=gate, **options)
    module = HFCausalLM(model, lr=args.lr, max_steps=args.steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        val_check_interval=args.steps,  # one validation pass, at the end
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module


def main(argv: list[str] | None = None) -> dict[str, HFCausalLM]:
    """Train every gate and print the side-by-side comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gates", nargs="+", default=["topk", "soft_topk"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--files", nargs="+", default=None, help="text files / globs (default: the stdlib)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/hf_soft_routing"))
    # Intra-op threads cost more than they give on a model this small (10x slower with 2
    # threads on a busy 2-core host).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = ByteCorpusDataModule(
        files=args.files,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_val_blocks=256,
        seed=args.seed,
    )
    trained = {gate: train_gate(gate, args, data) for gate in args.gates}

    print("\nvalidation loss (nats/byte):")
    for gate, module in trained.items():
        print(f"  {gate:>18}: {float(module.trainer.callback_metrics['val/loss']):.4f}")
    rows = {
        f"{gate} / {layer}": values
        for gate, module in trained.items()
        for layer, values in module.monitor.compute().items()
    }
    table = moe_router.load_balance_table(rows, row_header="Gate / layer")
    heatmap = moe_router.plot_load_heatmaps(
        {gate: module.monitor.loads() for gate, module in trained.items()},
        args.out / "load_balance.png",
        layer_names=list(next(iter(trained.values())).monitor.metrics),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_balance.md").write_text(
        f"# Load balance on the validation blocks\n\n{table}\n![heatmap]({heatmap.name})\n"
    )
    print(f"\n{table}\nwrote {args.out / 'load_balance.md'} and {heatmap}")
    return trained


if __name__ == "__main__":
    main()
