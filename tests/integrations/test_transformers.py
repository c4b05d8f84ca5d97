"""Hugging Face integration: topk reproduces the HF models, soft gates train, reports, saving.

Every model is a tiny random config built here (no download). Shape legend: B batch, S sequence,
T tokens, D model dim, E experts, K slots.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moe_router  # noqa: E402
from moe_router.integrations.transformers import (  # noqa: E402
    LoadBalanceMonitor,
    RoutedGate,
    from_pretrained,
    load_balance_report,
    replace_routers,
    router_aux_loss,
    routings,
)

VOCAB, HIDDEN, SEQ = 256, 32, 16
# The gates under test; a new gate is one more entry.
GATES_UNDER_TEST = ("topk", "soft_topk", "sparse_soft_topk", "balanced_soft_topk")
SOFT_GATES_UNDER_TEST = tuple(g for g in GATES_UNDER_TEST if g != "topk")


def _common(**overrides):
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # Large enough that routing visibly changes the logits (HF's default is 0.02).
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return settings


def _mixtral():
    config = transformers.MixtralConfig(**_common(), num_local_experts=8, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        **_common(),
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        norm_topk_prob=False,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        **_common(head_dim=8),
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _olmoe():
    config = transformers.OlmoeConfig(**_common(), num_experts=8, num_experts_per_tok=2)
    return transformers.OlmoeForCausalLM(config)


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        **_common(num_hidden_layers=3, num_key_value_heads=4),
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,  # layer 0 stays a dense MLP
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # a trained-looking correction bias, so that its mapping matters
        for layer in model.model.layers[1:]:
            bias_E = layer.mlp.gate.e_score_correction_bias
            bias_E.copy_(torch.randn(bias_E.shape, generator=torch.Generator().manual_seed(3)))
            bias_E.mul_(0.05)
    return model


BUILDERS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}
MODEL_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
ARCHS = [
    pytest.param(name, marks=pytest.mark.skipif(not hasattr(transformers, cls), reason=cls))
    for name, cls in MODEL_CLASSES.items()
]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: str, seed: int = 0):
    """The tiny model of ``arch`` in fp32 eval mode, same weights for the same seed."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().float().eval()


def input_ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def corpus_blocks():
    """32 blocks of SEQ + 1 bytes from the embedded (stdlib) corpus, the first 64 KiB of it."""
    from models.data import stdlib_source_files, to_blocks

    texts, size = [], 0
    for path in stdlib_source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= 1 << 16:
            break
    blocks_NL = torch.from_numpy(to_blocks(texts, SEQ + 1).copy()).long()
    keep = torch.linspace(0, len(blocks_NL) - 1, 32).round().long()
    return blocks_NL[keep]


# --------------------------------------------------------------------------------- packaging


def test_core_package_does_not_import_transformers():
    """Only the integration module may import transformers (torchmetrics may import it on its
    own where it is installed, so the check reads our sources rather than sys.modules)."""
    package = Path(moe_router.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path == package / "integrations" / "transformers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [
                f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "transformers"
            ]
    assert offenders == []


# ------------------------------------------------------------------------------ reproduction


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_reproduces_the_model(arch):
    reference, patched = build(arch), replace_routers(build(arch), gate="topk")
    ids_BS = input_ids()
    with torch.no_grad():
        expected = reference(ids_BS, output_router_logits=True)
        got = patched(ids_BS, output_router_logits=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    # HF callers still get the router logits, one per MoE layer.
    assert len(got.router_logits) == len(expected.router_logits) == len(routings(patched))
    for ours, theirs in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)

    # The same under generate (greedy, KV cache), step by step.
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True)
    settings["return_dict_in_generate"] = True
    with torch.no_grad():
        expected = reference.generate(ids_BS[:, :6], **settings)
        got = patched.generate(ids_BS[:, :6], **settings)
    torch.testing.assert_close(got.sequences, expected.sequences, rtol=0, atol=0)
    for ours, theirs in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_topk_with_other_scoring_does_not_reproduce(arch):
    """The reproduction test has teeth: the model's own scoring is what makes it pass."""
    override = {"mixtral": {"renormalize": False}, "deepseek_v3": {"expert_bias": False}}[arch]
    reference, patched = build(arch), replace_routers(build(arch), gate="topk", **override)
    with torch.no_grad():
        difference = (patched(input_ids()).logits - reference(input_ids()).logits).abs().max()
    assert difference > 1e-3
    # Without an expert bias the gate keeps the model's correction bias, unused, for saving.
    assert patched.state_dict().keys() == reference.state_dict().keys()
    if arch == "deepseek_v3":
        key = "model.layers.1.mlp.gate.e_score_correction_bias"
        torch.testing.assert_close(patched.state_dict()[key], reference.state_dict()[key])


def test_router_takes_the_gate_weight_and_deepseek_settings():
    model = build("deepseek_v3")
    hf_gate = model.model.layers[1].mlp.gate
    weight, bias_E = hf_gate.weight, hf_gate.e_score_correction_bias.clone()
    replace_routers(model, gate="soft_topk", tau=0.5)
    routed = model.model.layers[1].mlp.gate
    assert isinstance(routed, RoutedGate) and isinstance(routed, type(hf_gate))
    assert routed.router.weight_ED is weight  # the same Parameter
    config = routed.router.config
    assert (config.renormalize, config.score_scale) == (True, 2.5)
    # sigmoid scoring is a topk option: a soft gate does not read it, so it is left unset
    assert config.score_func == "softmax"
    assert (config.num_groups, config.topk_groups, config.k, config.tau) == (4, 2, 2, 0.5)
    torch.testing.assert_close(routed.router.expert_bias.bias_E, bias_E)
    assert not isinstance(model.model.layers[0].mlp.gate_proj, RoutedGate)  # dense layer 0
    assert model.config.moe_router == {"gate": "soft_topk", "tau": 0.5}


def test_deepseek_group_rule_matches_a_loop_reference():
    """Group score = sum of the two largest biased sigmoid scores, per token, by brute force."""
    model = replace_routers(build("deepseek_v3"), gate="topk")
    router = model.model.layers[1].mlp.gate.router
    logits_TE = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    masked_TE = router.group_mask(logits_TE)
    bias_E = router.expert_bias.bias_E
    for t in range(20):
        scores = [logits_TE[t, e].sigmoid().item() + bias_E[e].item() for e in range(8)]
        group_scores = [sum(sorted(scores[2 * g : 2 * g + 2])[-2:]) for g in range(4)]
        keep = sorted(range(4), key=lambda g: -group_scores[g])[:2]
        for e in range(8):
            expected = logits_TE[t, e].item() if e // 2 in keep else float("-inf")
            assert masked_TE[t, e].item() == expected


# ----------------------------------------------------------------- blocks against a reference


def _expert_reference(experts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert of a fused HF experts module, written out."""
    gate_up = experts.gate_up_proj[e] @ x_D
    gate, up = gate_up.chunk(2)
    return experts.down_proj[e] @ (F.silu(gate) * up)


def _block_reference(block, x_BSD: torch.Tensor) -> torch.Tensor:
    """The patched block by a per-token loop: sum_k w_k expert_{e_k}(x) + shared experts."""
    routing = block.gate.router(x_BSD)
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for k in range(routing.expert_ids_TK.shape[1]):
            if routing.valid_TK[t, k]:
                expert = int(routing.expert_ids_TK[t, k])
                y_D = y_D + routing.weights_TK[t, k] * _expert_reference(
                    block.experts, expert, x_TD[t]
                )
        rows.append(y_D)
    y_TD = torch.stack(rows)
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: a sigmoid-gated shared expert
        y_TD = y_TD + torch.sigmoid(block.shared_expert_gate(x_TD)) * block.shared_expert(x_TD)
    if hasattr(block, "shared_experts"):  # DeepSeek-V3
        y_TD = y_TD + block.shared_experts(x_TD)
    return y_TD.view_as(x_BSD)


@pytest.mark.parametrize("gate", GATES_UNDER_TEST)
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_block_matches_reference_with_gradients(arch, gate):
    model = replace_routers(build(arch), gate=gate)
    block = next(m for m in model.modules() if isinstance(getattr(m, "gate", None), RoutedGate))
    x_BSD = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    x_BSD.requires_grad_(True)
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, x_BSD]
    upstream_BSD = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(4))

    y_BSD = block(x_BSD)
    grads = torch.autograd.grad(y_BSD, params, upstream_BSD)
    y_ref_BSD = _block_reference(block, x_BSD)
    grads_ref = torch.autograd.grad(y_ref_BSD, params, upstream_BSD)
    torch.testing.assert_close(y_BSD, y_ref_BSD, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- soft training


def _lm_loss(model, blocks_BL):
    logits_BSV = model(blocks_BL[:, :-1]).logits
    return F.cross_entropy(logits_BSV.flatten(0, 1), blocks_BL[:, 1:].flatten())


def _sgd_steps(model, corpus_blocks, steps: int) -> None:
    """``steps`` SGD steps on batches of 4 blocks, the routers stepped after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = _lm_loss(model, corpus_blocks[step * 4 : step * 4 + 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moe_router.step_routers(model)


@pytest.mark.parametrize("gate", SOFT_GATES_UNDER_TEST)
@pytest.mark.parametrize("arch", ARCHS)
def test_soft_gate_trains_and_every_weighted_logit_gets_gradient(arch, gate, corpus_blocks):
    model = replace_routers(build(arch), gate=gate, aux_loss_coef=1e-2, z_loss_coef=1e-3)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    held_out_BL, train_BL = corpus_blocks[:8], corpus_blocks[8:]
    with torch.no_grad():
        loss_before = _lm_loss(model, held_out_BL).item()

    for step in range(20):
        batch_BL = train_BL[(step % 3) * 8 : (step % 3) * 8 + 8]
        loss = _lm_loss(model, batch_BL) + router_aux_loss(model)
        records = routings(model)
        for routing in records.values():
            routing.logits_TE.retain_grad()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert set(router_aux_loss(model).shape) == set()
            for name, routing in records.items():
                assert set(routing.aux_losses) == {"load_balance", "z_loss"}, name
                # The gate gives mass p > 0 to these experts (all of them for soft_topk except
                # those outside a token's groups; the support for sparse_soft_topk): each
                # logit among them must get a gradient.
                weighted_TE = routing.scores_TE.detach() > 0
                grad_TE = routing.logits_TE.grad
                assert torch.isfinite(grad_TE).all(), name
                assert (grad_TE[weighted_TE] != 0).all(), name
                if gate == "soft_topk" and arch != "deepseek_v3":
                    assert weighted_TE.all(), name
        optimizer.step()
        moe_router.step_routers(model)

    with torch.no_grad():
        loss_after = _lm_loss(model, held_out_BL).item()
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)


def test_step_routers_advances_bias_and_tau_of_a_patched_model(corpus_blocks):
    model = replace_routers(
        build("mixtral"),
        gate="soft_topk",
        expert_bias=True,
        bias_update_rate=0.01,
        tau=1.0,
        tau_schedule="anneal",
        tau_final=0.1,
        anneal_steps=10,
    )
    model.train()
    router = model.model.layers[0].mlp.gate.router
    model(corpus_blocks[:8, :-1])
    load_E = routings(model)["layer0"].tokens_per_expert_E
    moe_router.step_routers(model)
    expected_E = 0.01 * torch.sign(load_E.mean() - load_E)
    torch.testing.assert_close(router.expert_bias.bias_E, expected_E - expected_E.mean())
    assert int(router.schedule_step) == 1
    assert float(router.tau) < 1.0


# ------------------------------------------------------------------------------- aux losses


def test_hf_aux_loss_is_refused_where_it_does_not_describe_the_gate():
    ids_BS = input_ids()
    soft = replace_routers(build("mixtral"), gate="soft_topk")
    with pytest.raises(ValueError, match="output_router_logits"):
        soft(ids_BS, labels=ids_BS, output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits"):  # labels by position
        soft(ids_BS, None, None, None, None, ids_BS, output_router_logits=True)
    soft(ids_BS, labels=ids_BS)  # HF's term is off by default
    soft(ids_BS, output_router_logits=True)  # router_logits alone are fine

    # With topk and the model's scoring it is HF's own loss, unchanged.
    reference, topk = build("mixtral"), replace_routers(build("mixtral"), gate="topk")
    expected = reference(ids_BS, labels=ids_BS, output_router_logits=True)
    got = topk(ids_BS, labels=ids_BS, output_router_logits=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)


def test_router_aux_loss_sums_the_layers():
    model = replace_routers(build("olmoe"), gate="soft_topk", aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="run a forward"):
        router_aux_loss(model)
    model(input_ids())
    records = routings(model)
    assert list(records) == ["layer0", "layer1"]
    expected = sum(r.aux_losses["load_balance"] for r in records.values())
    torch.testing.assert_close(router_aux_loss(model), expected)
    assert float(router_aux_loss(model).detach()) > 0


# --------------------------------------------------------------------------- load balance


def _hf_counts(router_logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Assignments per expert of an unpatched softmax model, from its router logits."""
    ids_TK = router_logits_TE.softmax(-1).topk(k, dim=-1).indices
    return torch.bincount(ids_TK.flatten(), minlength=router_logits_TE.shape[-1]).float()


def test_load_balance_of_unpatched_and_patched_models(tmp_path):
    batches = [input_ids(seed=s) for s in range(3)]
    unpatched = build("mixtral")
    with LoadBalanceMonitor(unpatched) as monitor, torch.no_grad():
        expected_LE = torch.zeros(2, 8)
        for batch in batches:
            out = unpatched(batch, output_router_logits=True)
            expected_LE += torch.stack([_hf_counts(logits, 2) for logits in out.router_logits])
    torch.testing.assert_close(monitor.loads(), expected_LE)
    table = monitor.table()
    assert table.splitlines()[0].startswith("| Layer | MaxVio")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["layer0", "layer1"]

    # topk reproduces the model, so the patched model's report is the same.
    patched = replace_routers(build("mixtral"), gate="topk")
    report = load_balance_report(patched, batches, tmp_path / "topk", title="topk")
    assert report.table == table
    assert report.markdown_path.exists() and report.heatmap_path.exists()
    assert report.json_path.exists()

    soft = replace_routers(build("mixtral"), gate="sparse_soft_topk")
    report = load_balance_report(soft, iter(batches), tmp_path / "soft")
    assert report.table != table
    with LoadBalanceMonitor(soft) as monitor:
        soft(batches[0])
    counts_E = routings(soft)["layer1"].tokens_per_expert_E
    torch.testing.assert_close(monitor.loads()[1], counts_E)


# -------------------------------------------------------------------------------- saving


ANNEAL_AND_BIAS = dict(
    expert_bias=True, bias_update_rate=0.01, tau_schedule="anneal", anneal_steps=5
)


@pytest.mark.parametrize(
    ("arch", "gate", "options"),
    [
        ("mixtral", "soft_topk", ANNEAL_AND_BIAS),  # Mixtral renames its blocks on save
        ("deepseek_v3", "soft_topk", ANNEAL_AND_BIAS),  # expert bias = correction bias
        ("olmoe", "sparse_soft_topk", dict(target_active=2.5, budget_update_rate=0.2)),
        ("qwen3_moe", "balanced_soft_topk", {}),
    ],
)
def test_save_pretrained_and_from_pretrained_restore_the_routers(
    arch, gate, options, tmp_path, corpus_blocks
):
    model = replace_routers(build(arch), gate=gate, **options)
    fresh_state = replace_routers(build(arch), gate=gate, **options).state_dict()
    model.train()
    _sgd_steps(model, corpus_blocks, 3)
    model.eval()
    model.save_pretrained(tmp_path)

    loaded = from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert loaded.config.moe_router == {"gate": gate, **options}
    expected_state, got_state = model.state_dict(), loaded.state_dict()
    assert set(got_state) == set(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=0, msg=key)
    # The state beyond HF's keys (schedule, bias, budget, thresholds) moved, so it is tested.
    moved = [
        key
        for key in expected_state
        if ".router." in key and not torch.equal(expected_state[key], fresh_state[key])
    ]
    assert moved
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, model(input_ids()).logits)

    # A plain HF load gets the trained router weight (and DeepSeek-V3's bias) under HF's names.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, routed in ((n, m) for n, m in model.named_modules() if isinstance(m, RoutedGate)):
        hf_gate = plain.get_submodule(name)
        torch.testing.assert_close(hf_gate.weight, routed.weight, rtol=0, atol=0)
        if arch == "deepseek_v3":
            torch.testing.assert_close(
                hf_gate.e_score_correction_bias, routed.router.expert_bias.bias_E, rtol=0, atol=0
            )


def test_patched_model_deepcopies_and_pickles():
    model = replace_routers(build("qwen2_moe"), gate="soft_topk", tau=0.7)
    with torch.no_grad():
        expected_BSV = model(input_ids()).logits
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        copied_gates = [m for m in copied.modules() if isinstance(m, RoutedGate)]
        assert copied._moe_router_gates == copied_gates  # its own gates, not the original's
        with torch.no_grad():
            torch.testing.assert_close(copied(input_ids()).logits, expected_BSV, rtol=0, atol=0)
        assert list(routings(copied)) == ["layer0", "layer1"]
        copied(input_ids(batch=1))  # the copy's forward clears the copy's records only
        assert routings(copied)["layer0"].logits_TE.shape[0] == SEQ
        assert routings(model)["layer0"].logits_TE.shape[0] == 2 * SEQ

    # A fresh process builds the patched gate class on first use.
    code = (
        "import pickle, sys; model = pickle.load(open(sys.argv[1], 'rb')); "
        "print(type(model.model.layers[0].mlp.gate).__name__)"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pkl"
        path.write_bytes(pickle.dumps(model))
        result = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert result.stdout.strip() == "RoutedQwen2MoeTopKRouter"


def test_from_pretrained_returns_the_loading_info(tmp_path):
    model = replace_routers(build("mixtral"), gate="soft_topk", **ANNEAL_AND_BIAS)
    model.save_pretrained(tmp_path)
    loaded, info = from_pretrained(
        transformers.AutoModelForCausalLM, tmp_path, output_loading_info=True
    )
    assert any(isinstance(m, RoutedGate) for m in loaded.modules())
    # The router state read after HF's load is not reported as unexpected.
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()


# ------------------------------------------------------- HF's loading and initialisation


def routed_class(arch: str, gate: str = "topk", **options):
    """The HF model class of ``arch``, patched as it is built, so that HF's ``from_pretrained``
    loads the weights into routers (the class keeps its name: HF looks its loading rules up
    by name)."""
    base = getattr(transformers, MODEL_CLASSES[arch])

    def __init__(self, config):
        base.__init__(self, config)
        replace_routers(self, gate=gate, **options)

    return type(base.__name__, (base,), {"__init__": __init__})


def _saved(model, folder):
    """Save ``model`` to ``folder``; returns the folder."""
    model.save_pretrained(folder)
    return folder


def _gates(model):
    return [m for m in model.modules() if isinstance(m, RoutedGate)]


# Settings that give a router every kind of state (bias, schedule, budget, thresholds, tau).
STATEFUL_OPTIONS = {
    "bias_anneal": dict(gate="soft_topk", **ANNEAL_AND_BIAS, tau=1.0, tau_final=0.1),
    "budget": dict(gate="sparse_soft_topk", target_active=2.5),
    "running_thresholds": dict(gate="balanced_soft_topk"),
    "window_thresholds": dict(gate="balanced_soft_topk", balance_window=32),
    "learned_tau": dict(gate="soft_topk", tau=0.7, tau_schedule="learned"),
}


def _check_start_state(router, expected_router, arch):
    """Every buffer (and a learned tau) of ``router`` as a new router's, and finite."""
    config = router.config
    expected = dict(expected_router.named_buffers())
    got = dict(router.named_buffers())
    if config.tau_schedule == "learned":
        expected["log_tau"], got["log_tau"] = expected_router.log_tau, router.log_tau
    if arch == "deepseek_v3" and router.expert_bias is not None:
        # HF initialises DeepSeek-V3's correction bias to zeros (the built model's is random).
        expected["expert_bias.bias_E"] = torch.zeros(config.num_experts)
    assert set(got) == set(expected)
    for name, value in got.items():
        assert value.device.type == "cpu", name
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    if router.anneal is not None:
        assert int(router.schedule_step) == 0
        assert float(router.tau) == config.tau  # the schedule's start, not tau_final
    if router.budget_controller is not None:
        assert float(router.budget) == config.k


@pytest.mark.parametrize("options", STATEFUL_OPTIONS.values(), ids=STATEFUL_OPTIONS.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_meta_built_model_initialised_by_hf_has_the_router_start_state(arch, options):
    """HF's path for large models: build on the meta device, ``to_empty``, ``init_weights``
    (HF's ``_init_weights`` does not know the router's buffers)."""
    expected = replace_routers(build(arch), **options)

    def initialised_on_meta(patch: bool):
        with torch.device("meta"):
            model = type(expected)(copy.deepcopy(expected.config))
            if patch:
                replace_routers(model, **options)
        model.to_empty(device="cpu")  # a DeepSeek-V3 expert bias once failed to leave meta here
        torch.manual_seed(0)
        model.init_weights()
        return model

    model = initialised_on_meta(patch=True)
    for gate, expected_gate in zip(_gates(model), _gates(expected), strict=True):
        _check_start_state(gate.router, expected_gate.router, arch)
        assert gate.weight is gate.router.weight_ED
    # HF's init draws the weights it draws for the unpatched model (gate weight included): the
    # routers' start values take nothing from the random generator.
    patched = dict(model.named_parameters())
    for name, value in initialised_on_meta(patch=False).named_parameters():
        torch.testing.assert_close(patched[name], value, rtol=0, atol=0, msg=name)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids()).logits).all()


def _shares_the_router_tensors(gate) -> bool:
    router = gate.router
    return (
        gate.weight is router.weight_ED
        and gate.e_score_correction_bias is router.expert_bias.bias_E
        and dict(gate.named_parameters())["weight"] is router.weight_ED
    )


def test_gate_names_the_router_tensors_as_hf_does():
    """``weight`` / ``e_score_correction_bias`` of a gate are the router's tensors, through
    assignment (HF's loader assigns them), conversion and ``load_state_dict``."""
    model = replace_routers(build("deepseek_v3"), gate="soft_topk")
    gate = model.model.layers[1].mlp.gate
    assert _shares_the_router_tensors(gate)
    gate.weight = torch.nn.Parameter(torch.randn(8, HIDDEN))
    gate.e_score_correction_bias = torch.randn(8).bfloat16()
    assert _shares_the_router_tensors(gate)
    assert gate.router.expert_bias.bias_E.dtype == torch.float32
    model.to(torch.bfloat16)
    assert _shares_the_router_tensors(gate) and gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32  # the expert bias stays fp32

    state = model.state_dict()  # each shared tensor once, under HF's name
    assert "model.layers.1.mlp.gate.weight" in state
    assert not any(key.endswith(("router.weight_ED", "router.expert_bias.bias_E")) for key in state)
    other = replace_routers(build("deepseek_v3", seed=1), gate="soft_topk").to(torch.bfloat16)
    other.load_state_dict(state)
    other_gate = other.model.layers[1].mlp.gate
    torch.testing.assert_close(other_gate.router.weight_ED, gate.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        other_gate.router.expert_bias.bias_E, gate.e_score_correction_bias, rtol=0, atol=0
    )
    other.load_state_dict(state, assign=True)  # new tensors, still shared
    assert _shares_the_router_tensors(other_gate)


def test_patched_class_loads_an_hf_checkpoint(tmp_path):
    """``from_pretrained`` into a class patched before loading: the HF weights land in the
    routers (topk reproduces the model), and the router state the checkpoint lacks starts
    from a new router's values."""
    reference = build("deepseek_v3")
    reference.save_pretrained(tmp_path)
    loaded, info = routed_class("deepseek_v3").from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids()).logits, reference(input_ids()).logits, rtol=0, atol=1e-5
        )
    gate = loaded.model.layers[1].mlp.gate
    hf_gate = reference.model.layers[1].mlp.gate
    assert gate.router.weight_ED is gate.weight
    torch.testing.assert_close(gate.weight, hf_gate.weight, rtol=0, atol=0)
    assert gate.router.expert_bias.bias_E is gate.e_score_correction_bias
    torch.testing.assert_close(gate.e_score_correction_bias, hf_gate.e_score_correction_bias)

    options = STATEFUL_OPTIONS["bias_anneal"]
    loaded, info = routed_class("mixtral", **options).from_pretrained(
        _saved(build("mixtral"), tmp_path / "mixtral"), output_loading_info=True
    )
    expected = replace_routers(build("mixtral"), **options)
    assert info["missing_keys"] == {k for k in expected.state_dict() if ".gate.router." in k}
    for gate, expected_gate in zip(_gates(loaded), _gates(expected), strict=True):
        _check_start_state(gate.router, expected_gate.router, "mixtral")


@pytest.mark.parametrize(
    ("arch", "state"),
    [
        ("mixtral", "bias_anneal"),  # Mixtral renames its blocks on save
        ("deepseek_v3", "bias_anneal"),  # expert bias = correction bias
        ("olmoe", "budget"),
        ("qwen3_moe", "window_thresholds"),
        ("qwen2_moe", "learned_tau"),
    ],
)
def test_hf_save_and_reload_keeps_every_router_key(arch, state, tmp_path, corpus_blocks):
    """HF's own ``save_pretrained`` -> ``from_pretrained`` (into a patched class) round trip."""
    options = STATEFUL_OPTIONS[state]
    model = replace_routers(build(arch), **options)
    # The state dict names the parameters and persistent buffers (HF's loader and its save /
    # reload checks go by those names).
    names = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    non_persistent = {name for name, _ in model.named_non_persistent_buffers()}
    assert set(model.state_dict()) == names - non_persistent
    fresh_state = replace_routers(build(arch), **options).state_dict()

    model.train()
    _sgd_steps(model, corpus_blocks, 2)
    model.eval().save_pretrained(tmp_path / "trained")
    loaded, info = routed_class(arch, **options).from_pretrained(
        tmp_path / "trained", output_loading_info=True
    )
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    expected_state, got_state = model.state_dict(), loaded.state_dict()
    assert set(got_state) == set(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=0, msg=key)
    # Trained values, so a key HF reports loaded but that did not reach the router would show.
    gate_keys = [key for key in expected_state if ".gate." in key]
    moved = [key for key in gate_keys if not torch.equal(expected_state[key], fresh_state[key])]
    assert {key for key in gate_keys if key.endswith(".gate.weight")} < set(moved)

    # Loading nothing reports every key of the state dict as missing, no more, no fewer.
    safetensors.torch.save_file(
        {"tensor": torch.tensor([1, 2])},
        tmp_path / "trained" / "model.safetensors",
        metadata={"format": "pt"},
    )
    _, info = routed_class(arch, **options).from_pretrained(
        tmp_path / "trained", output_loading_info=True
    )
    assert info["missing_keys"] == set(expected_state)


def test_from_pretrained_refuses_an_unpatched_checkpoint(tmp_path):
    build("olmoe").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="moe_router"):
        from_pretrained(transformers.AutoModelForCausalLM, tmp_path)


# --------------------------------------------------------------------------------- errors


def test_replace_routers_rejects_bad_input():
    with pytest.raises(ValueError, match="d_model"):
        replace_routers(build("mixtral"), d_model=16)
    with pytest.raises(ValueError, match="gate="):
        replace_routers(build("mixtral"), gate="nope")
    model = replace_routers(build("mixtral"))
    with pytest.raises(ValueError, match="already"):
        replace_routers(model)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        replace_routers(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no moe_router router"):
        routings(torch.nn.Linear(4, 4))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = torch.nn.Linear(4, 2), torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="'Linear'.*not supported"):
        replace_routers(torch.nn.Sequential(Block()))

    # A setting the router rejects leaves the model untouched.
    model = build("qwen3_moe")
    with pytest.raises(ValueError, match="k="):
        replace_routers(model, gate="soft_topk", k=8)
    assert not any(isinstance(m, RoutedGate) for m in model.modules())


# ----------------------------------------------------------------------------------- example


def test_example_runs(tmp_path):
    """examples/hf_soft_routing.py end to end, a few steps on a tiny corpus."""
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "hf_soft_routing", root / "examples" / "hf_soft_routing.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(400)))
    argv = ["--steps", "3", "--seq-len", "32", "--batch-size", "4", "--files", str(corpus)]
    trained = example.main([*argv, "--gates", "topk", "soft_topk", "--out", str(tmp_path / "out")])
    assert list(trained) == ["topk", "soft_topk"]
    for module in trained.values():
        assert torch.isfinite(module.trainer.callback_metrics["val/loss"])
    # The optimizer hook stepped the routers after each of the 3 steps.
    soft_router = trained["soft_topk"].model.model.layers[0].mlp.gate.router
    assert int(soft_router.schedule_step) == 3
    assert trained["topk"].model.model.layers[0].mlp.gate.router.expert_bias.bias_E.abs().sum() > 0
    table = (tmp_path / "out" / "load_balance.md").read_text()
    assert "| soft_topk / layer1 |" in table and (tmp_path / "out" / "load_balance.png").exists()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_the_generic_record_readers_work_on_a_patched_model(arch):
    """moe_router.routings / aux_loss read a patched HF model as they read our own models."""
    model = replace_routers(build(arch), gate="soft_topk", aux_loss_coef=0.01, z_loss_coef=1e-3)
    model.train()
    model(input_ids())
    records = moe_router.routings(model)
    assert len(records) == len(routings(model)) > 0
    torch.testing.assert_close(moe_router.aux_loss(model), router_aux_loss(model))
