"""A callback for the DDP test: each rank saves its router state and weights at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


class RouterStateProbe(L.Callback):
    """Writes ``rank<r>.pt`` (the module's state dict) into ``$MOE_PROBE_DIR`` on every rank."""

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["MOE_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        state = {
            name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()
        }
        torch.save(state, out / f"rank{trainer.global_rank}.pt")
