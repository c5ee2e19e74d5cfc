"""DiT conditioned on a representation: the pixel/latent generator of RCG (docs/paper.md#image-generators).

Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero blocks. RCG's variant conditions every
block on ``c = t_emb + rep_embedder(rep)`` with ``rep_embedder = Linear(256 -> D)``; during training a
learned ``fake_latent`` replaces the representation for ``rep_drop_prob`` of the samples, and
``forward_with_cfg`` uses it as the negative for classifier-free guidance.

The same class also builds the paper's baselines (Table 9a) with the same budget: ``condition="none"``
(no conditioning, the unconditional baseline) and ``condition="label"`` (a class embedding in the
slot the representation would use, with a learned null class for guidance).

Differences from the reference, on purpose: no learned variance (the shared diffusion module trains
the mean only, MSE), pixel space for small images (latents through rcg.generators.vae for 256 px),
guidance applied to every channel (the reference's "first 3 of 4 latent channels" is a DiT quirk).
CPU-minded choices: fused scaled-dot-product attention, one GEMM for every block's adaLN
modulation, and shapes that let bf16 autocast do the heavy matmuls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg import layers
from rcg.generators.conditioning import Conditioner, Guided

# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head self-attention through fused scaled_dot_product_attention (flash/mem-efficient)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, d)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, d)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero gates; modulation comes in precomputed."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # (N, T, D)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (N, T, D)
        return x


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DiT(Guided, nn.Module):
    """DiT with adaLN-Zero conditioning on t_emb + Linear(rep) (or a label, or nothing).

    ``forward(x, t, rep=None, label=None, drop=None)``: x (N, C, H, W) in the generator's space,
    t (N,) timesteps; ``drop`` (N,) bool forces the null condition (fake_latent / null class) for
    guidance. In training mode ``rep_drop_prob`` of the samples are dropped at random as well.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        condition: str = "rep",
        rep_dim: int = 256,
        num_classes: int = 1000,
        rep_drop_prob: float = 0.1,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.depth = hidden_size, depth
        self.condition, self.rep_drop_prob = condition, rep_drop_prob
        self.grid = input_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Fixed sin-cos positions, computed in float64 as DiT's numpy code (rcg.layers).
        self.register_buffer("pos_embed", layers.sincos_pos_embed_2d(self.grid, hidden_size)[None], persistent=False)
        self.cond = Conditioner(hidden_size, condition, rep_dim, num_classes, rep_drop_prob)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        # Every block's adaLN modulation (6 vectors) plus the final layer's (2) in one Linear: one
        # GEMM per forward instead of depth + 1 small ones (same maths as per-block Linears).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 * depth + 2) * hidden_size))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears and patch projection, zero adaLN and output layer (adaLN-Zero).

        The Conditioner (t-MLP, rep / label embedders) ran its own `initialize_weights` when it was
        built, before the blocks drew their default inits; doing it here instead would reorder the
        random draws and so change every initial weight.
        """

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        for module in (*self.blocks, self.final_linear):
            module.apply(_basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        layers.zero_module(self.adaLN_modulation[-1])
        layers.zero_module(self.final_linear)

    # -- forward --------------------------------------------------------------------------------

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.view(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        rep: Tensor | None = None,
        label: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        n, d = x.shape[0], self.hidden_size
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.cond(t, rep, label, drop)  # (N, D)
        mods = self.adaLN_modulation(c).view(n, 6 * self.depth + 2, d)  # (N, 6*depth+2, D)
        for i, block in enumerate(self.blocks):
            h = block(h, mods[:, 6 * i : 6 * i + 6].reshape(n, 6 * d))  # (N, T, D)
        shift, scale = mods[:, -2], mods[:, -1]  # (N, D) each
        h = self.final_linear(modulate(self.norm_final(h), shift, scale))  # (N, T, p*p*C)
        return self.unpatchify(h)  # (N, C, H, W)


# --------------------------------------------------------------------------------------------------
# Sizes (DiT paper Table 1) and small presets for CPU
# --------------------------------------------------------------------------------------------------

# DiT paper Table 1: depth, width and heads of S/B/L/XL; each comes with patch 2, 4 and 8.
_TABLE1: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# Named sizes -> DiT kwargs: 'DiT-S/2' ... 'DiT-XL/8', then the small presets. `dit_tiny` makes the
# tests run in seconds; `dit_fmnist` is sized for Fashion-MNIST 28 px on CPU: patch 7 -> 16 tokens,
# 128 wide, 4 deep (1.3M parameters), much faster per step than patch 4 and as good at equal CPU
# time (docs/measurements.md#generator-choice). `dit_fmnist_p4` is the finer, slower alternative for
# longer budgets. The default preset now uses `unet_fmnist` (rcg/generators/unet.py): at equal CPU
# time its samples score better and are not blocky.
DIT_ARCHS: dict[str, dict[str, int]] = {
    **{f"DiT-{size}/{p}": dict(arch, patch_size=p) for size, arch in _TABLE1.items() for p in (2, 4, 8)},
    "dit_tiny": dict(depth=2, hidden_size=32, num_heads=2, patch_size=4),
    "dit_fmnist": dict(depth=4, hidden_size=128, num_heads=2, patch_size=7),
    "dit_fmnist_p4": dict(depth=4, hidden_size=128, num_heads=2, patch_size=4),
}


def build_dit(name: str, **kwargs: Any) -> DiT:
    """The DiT of named size `name` (`DIT_ARCHS`); `kwargs` (input_size, in_channels, condition,
    ...) complete or override its entry."""
    return DiT(**{**layers.lookup_arch(DIT_ARCHS, name, "DiT size"), **kwargs})
