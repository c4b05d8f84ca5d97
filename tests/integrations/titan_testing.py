"""Helpers of the torchtitan integration tests: tiny torchtitan models that run on the CPU, and
the workers of the 2-rank expert-parallel test.

The models are torchtitan's own debug flavors cut to one or two layers. Two CPU-only changes:
the flex attention of the language models becomes torchtitan's causal SDPA attention (flex
attention has no CPU backward in torch 2.13), and ``ParallelDims`` builds its meshes on "cpu"
(torchtitan picks "cuda" when no accelerator is present).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.common.moe import GroupedExperts, MoE

from moe_router.integrations.torchtitan import register_step_hook, replace_routers

WORLD_SIZE = 2
VOCAB = 2048  # the debug flavors' vocabulary
SEQ = 16


def model_spec(family: str, flavor: str, num_layers: int | None = None):
    """torchtitan's ``ModelSpec`` of ``family``/``flavor``, cut to its first ``num_layers``
    layers, with causal SDPA attention instead of flex attention."""
    module = importlib.import_module(f"torchtitan.models.{family}")
    spec = module.model_registry(flavor)
    if num_layers is not None:
        spec.model.layers = spec.model.layers[:num_layers]
    for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
        if isinstance(attr, int):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return spec


def build(model_config, seed: int = 0) -> nn.Module:
    """Build and initialise a model from its config as torchtitan's trainer does (meta device,
    ``to_empty``, ``init_states``), the same weights for the same seed."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model


def randomize_expert_bias(model: nn.Module, seed: int = 3) -> None:
    """Give torchtitan's expert biases distinct non-zero values (a fresh model has zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoE) and module.expert_bias_E is not None:
                module.expert_bias_E.copy_(
                    0.02 * torch.randn(module.expert_bias_E.shape, generator=gen)
                )


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def forward(model: nn.Module, tokens_BL: torch.Tensor) -> torch.Tensor:
    """The model's logits (SDPA attention: no attention masks)."""
    positions_BL = torch.arange(tokens_BL.shape[1]).expand_as(tokens_BL)
    return model(tokens_BL, positions_BL, None)


def loss_of(logits_BLV: torch.Tensor) -> torch.Tensor:
    """A sum (not a mean) over tokens, so that the losses of several ranks add up."""
    return logits_BLV.float().logsumexp(-1).sum()


# ---------------------------------------------------------------------- expert parallelism


class FP32GroupedExperts(GroupedExperts):
    """torchtitan's ``GroupedExperts`` computed in fp32, one expert at a time.

    torchtitan's runs its grouped matmuls in bf16 whatever the parameter dtype, so the expert
    weight gradients, summed over tokens, carry bf16 rounding that depends on how the tokens
    are grouped (4e-3 relative between EP and one rank). In fp32 the comparison sees what the
    dispatch and the routers do.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1_EFD, w2_EDF, w3_EFD = (
            w.to_local() if isinstance(w, DTensor) else w
            for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD)
        )
        counts = num_tokens_per_expert_E.tolist()
        outputs = []
        for expert, x_rD in enumerate(x_RD[: sum(counts)].split(counts)):
            h_rF = F.silu(x_rD @ w1_EFD[expert].T) * (x_rD @ w3_EFD[expert].T)
            outputs.append(h_rF @ w2_EDF[expert].T)
        padding_D = x_RD.new_zeros(x_RD.shape[0] - sum(counts), x_RD.shape[1])
        return torch.cat([*outputs, padding_D])


def fp32_experts(model_config) -> None:
    """Swap every ``GroupedExperts.Config`` of ``model_config`` for :class:`FP32GroupedExperts`."""
    for _, config, parent, attr in list(model_config.traverse(GroupedExperts.Config)):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        setattr(parent, attr, FP32GroupedExperts.Config(**fields))


# One gate per MoE layer of the 4-layer deepseek_v3 debug model (layer 0 is dense).
EP_GATES = {
    1: {"gate": "soft_topk", "expert_bias": True, "bias_update_rate": 0.01},
    2: {"gate": "balanced_soft_topk"},
    3: {"gate": "sparse_soft_topk", "target_active": 2.5},
}
EP_STEPS = 3
EP_LR = 1e-3


def ep_spec():
    """deepseek_v3's debug model (4 layers, 8 experts, K 3, fp32 experts) with a different
    moe_router gate in each MoE layer."""
    spec = model_spec("deepseek_v3", "debugmodel", num_layers=4)
    fp32_experts(spec.model)
    for layer, options in EP_GATES.items():
        options = dict(options)
        replace_routers(spec.model.layers[layer], options.pop("gate"), **options)
    spec.post_optimizer_build_fn = register_step_hook
    return spec


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent router buffer (bias, budget, thresholds), by state-dict key."""
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if ".moe_router." in key
    }


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one full tensor (DTensors gathered)."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = None if grad is None else grad.detach().clone()
    return grads


def ep_worker(rank: int, out_dir: str) -> None:
    """torchtitan's deepseek_v3 parallelize path on 2 CPU ranks: FSDP over both, experts
    sharded over EP = 2, all-to-all dispatch over gloo. Saves this rank's logits and the
    gradients of the first step, the router state after each step, and a DCP round trip."""
    torch.set_num_threads(1)
    _ep_run(rank, out_dir)


def parallelize(spec, model_config=None) -> tuple[nn.Module, object]:
    """Build ``spec``'s model and parallelize it with torchtitan's own ``parallelize_fn``
    (EP 2 borrowed from FSDP 2, the ``partial_dtensor`` backend), on the CPU."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed.utils import set_spmd_backend

    parallel_dims_module.device_type = "cpu"  # torchtitan falls back to "cuda" without one
    backend = "partial_dtensor"
    set_spmd_backend(backend)
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=WORLD_SIZE,
        expert_parallel_degree=WORLD_SIZE,
        spmd_backend=backend,
    )
    model_config = model_config or spec.model
    model_config.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    degrees = dict(dp_replicate=1, dp_shard=WORLD_SIZE, cp=1, tp=1, pp=1, ep=WORLD_SIZE)
    parallel_dims = parallel_dims_module.ParallelDims(
        **degrees, world_size=WORLD_SIZE, spmd_backend=backend
    )
    parallel_dims.build_mesh()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_config.build()
    model = spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=TrainingConfig(mixed_precision_param="float32"),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="",
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # gloo has no PREMUL_SUM; a sum then a division is the same average.
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model, parallel_dims


def _ep_run(rank: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torchtitan.components.checkpointer.base import ModelWrapper

    spec = ep_spec()
    model, parallel_dims = parallelize(spec)
    # The single-rank reference's weights (a sharded init draws other numbers on the CPU).
    reference = build(ep_spec().model, seed=0)
    set_model_state_dict(
        model, reference.state_dict(), options=StateDictOptions(full_state_dict=True)
    )
    del reference
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=EP_LR)
    spec.post_optimizer_build_fn(optimizer, [model], parallel_dims)
    result = {"states": []}
    for step in range(EP_STEPS):
        tokens_BL = tokens(seed=100 * step + rank)
        logits = forward(model, tokens_BL)
        loss_of(logits).backward()
        if step == 0:
            result["logits"] = logits.detach().clone()
            result["grads"] = full_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        result["states"].append(router_state(model))
    # torchtitan's checkpointing: DCP on ModelWrapper's state dict, into a fresh model.
    dcp.save(ModelWrapper([model]).state_dict(), checkpoint_id=f"{out_dir}/dcp")
    restored, _ = parallelize(ep_spec())
    wrapper = ModelWrapper([restored])
    state = wrapper.state_dict()
    dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
    wrapper.load_state_dict(state)
    result["restored_state"] = router_state(restored)
    model.eval()
    restored.eval()
    with torch.no_grad():
        eval_tokens = tokens(seed=7 + rank)
        result["eval_logits"] = forward(model, eval_tokens)
        result["restored_eval_logits"] = forward(restored, eval_tokens)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
