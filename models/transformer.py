"""A small decoder-only transformer whose FFNs are ``moe_router.moe.MoELayer`` s.

Token embedding -> blocks of (RMSNorm, causal self-attention with rotary positions, RMSNorm,
FFN) -> RMSNorm -> LM head tied to the embedding. The FFN of block ``i`` is an MoE layer when
``config.is_moe_block(i)`` and a dense ``moe_router.moe.SwiGLU`` (the same module as the MoE
layer's shared expert) otherwise.

Shape legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocabulary,
F hidden width of a dense FFN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.config import ModelConfig
from moe_router.moe import MoELayer, SwiGLU


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables of rotary position embeddings (RoFormer, half-split layout).

    Args:
        seq_len: Number of positions S.
        head_dim: Head dimension Dh (even).
        base: Frequency base.

    Returns:
        ``(cos_SDh, sin_SDh)`` in fp32, each half of the last dim repeated.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_S_half = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles_SDh = torch.cat([angles_S_half, angles_S_half], dim=-1)
    return angles_SDh.cos(), angles_SDh.sin()


def apply_rotary(x_BHSDh: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
    """Rotates each (i, i + Dh/2) pair of ``x`` by its position's angle.

    Args:
        x_BHSDh: Queries or keys.
        cos_SDh: Cosine table for the first S positions.
        sin_SDh: Sine table for the first S positions.

    Returns:
        The rotated tensor, same shape and dtype as ``x_BHSDh``.
    """
    first, second = x_BHSDh.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x_BHSDh * cos_SDh + rotated_half * sin_SDh).to(x_BHSDh.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions (``scaled_dot_product_attention``).

    Args:
        config: Model sizes.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        cos_SDh, sin_SDh = rotary_tables(
            config.max_seq_len, config.d_model // config.n_heads, config.rope_base
        )
        # Recomputable from the config, so kept out of checkpoints.
        self.register_buffer("cos_SDh", cos_SDh, persistent=False)
        self.register_buffer("sin_SDh", sin_SDh, persistent=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        """Attends each position to itself and the positions before it.

        Args:
            x_BSD: Normalised hidden states.

        Returns:
            Attention output, same shape as ``x_BSD``.
        """
        seq_len = x_BSD.shape[1]
        q_BHSDh, k_BHSDh, v_BHSDh = rearrange(
            self.qkv(x_BSD), "b s (three h dh) -> three b h s dh", three=3, h=self.n_heads
        )
        cos_SDh, sin_SDh = self.cos_SDh[:seq_len], self.sin_SDh[:seq_len]
        q_BHSDh = apply_rotary(q_BHSDh, cos_SDh, sin_SDh)
        k_BHSDh = apply_rotary(k_BHSDh, cos_SDh, sin_SDh)
        y_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        return self.out(rearrange(y_BHSDh, "b h s dh -> b s (h dh)"))


class Block(nn.Module):
    """Pre-norm transformer block whose FFN is an MoE layer or a dense SwiGLU.

    Args:
        config: Model sizes and gate.
        index: Position of the block in the stack (decides MoE vs dense).
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model)
        self.is_moe = config.is_moe_block(index)
        if self.is_moe:
            self.ffn: nn.Module = MoELayer(config.moe_layer_config())
        else:
            self.ffn = SwiGLU(config.d_model, config.dense_width)

    def forward(self, x_BSD: Tensor) -> Tensor:
        """Runs attention and FFN with residual connections (an MoE FFN keeps its routing
        record on its router: ``moe_router.routings(model)``).

        Args:
            x_BSD: Residual stream.

        Returns:
            The updated residual stream.
        """
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class MoETransformer(nn.Module):
    """Decoder-only language model with MoE FFNs and a tied LM head.

    Args:
        config: Model sizes and gate.

    Example:
        >>> net = MoETransformer(ModelConfig(d_model=64, n_layers=2, n_heads=2))
        >>> logits_BSV = net(torch.randint(0, 256, (2, 16)))
        >>> records = moe_router.routings(net)  # one Routing per MoE layer, in block order
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        # GPT-2 / nanoGPT: shrink the projections that write into the residual stream so
        # its variance does not grow with depth.
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            for linear in (block.attn.qkv, block.attn.out):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            if not block.is_moe:
                # The MoE layer initialises its own experts and router.
                for weight in (block.ffn.w1_DF, block.ffn.w3_DF):
                    nn.init.normal_(weight, std=std)
                nn.init.normal_(block.ffn.w2_FD, std=residual_std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in block order."""
        return [block.ffn for block in self.blocks if block.is_moe]

    def forward(self, tokens_BS: Tensor) -> Tensor:
        """Computes next-token logits.

        Each MoE layer's routing record (aux losses, loads) is read afterwards with
        ``moe_router.routings(net)`` / ``moe_router.aux_loss(net)``.

        Args:
            tokens_BS: Token ids (any integer dtype), ``S <= config.max_seq_len``.

        Returns:
            ``logits_BSV`` in the compute dtype.

        Raises:
            ValueError: If the sequence is longer than ``config.max_seq_len``.
        """
        if tokens_BS.shape[-1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BS.shape[-1]} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        x_BSD = self.embed(tokens_BS.long())
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return F.linear(self.final_norm(x_BSD), self.embed.weight)
