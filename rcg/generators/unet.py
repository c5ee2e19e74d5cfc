"""A small ADM-style U-Net conditioned like the DiT (docs/paper.md#image-generators; Dhariwal & Nichol 2021).

The paper also runs RCG on ADM's U-Net: ``emb = time_embed(t) + rep_proj(rep)`` drives scale-shift
GroupNorm in every residual block. Here the conditioning is the same ``Conditioner`` as the DiT's
(t_emb + Linear(rep), learned ``fake_latent`` dropped in for ``rep_drop_prob`` of the samples, so
guidance works too; the reference ADM has no dropout and no CFG), so the DiT and the U-Net are
interchangeable in the pipeline. Convolutions carry a locality prior a tiny transformer has to
learn, which pays on a CPU budget of a few thousand steps; the DiT stays the 256 px generator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg.generators.conditioning import Conditioner, Guided
from rcg.layers import lookup_arch, zero_module


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if ch % 32 == 0 else 8, ch, eps=1e-6)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> scale-shift GN(emb) -> SiLU -> conv (zero-initialised), plus a skip (ADM)."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout))
        self.out_norm = _norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (N, Co, H, W)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # (N, Co, 1, 1) each
        h = self.out_norm(h) * (1 + scale) + shift  # use_scale_shift_norm
        return self.skip(x) + self.out_layers(h)  # (N, Co, H, W)


class AttnBlock(nn.Module):
    """Spatial self-attention (fused SDPA); UNet zero-initialises the output projection."""

    def __init__(self, ch: int, head_channels: int = 32) -> None:
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).view(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        y = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (N, heads, HW, d)
        return x + self.proj(y.transpose(-1, -2).reshape(n, c, h, w))


class UNet(Guided, nn.Module):
    """ADM-style U-Net with the generator conditioning interface forward(x, t, rep, label, drop)."""

    def __init__(
        self,
        input_size: int = 28,
        in_channels: int = 1,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (2,),
        dropout: float = 0.0,
        condition: str = "rep",
        rep_dim: int = 256,
        num_classes: int = 1000,
        rep_drop_prob: float = 0.1,
    ) -> None:
        super().__init__()
        if input_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"input_size {input_size} cannot be halved {len(channel_mult) - 1} times")
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, in_channels
        self.condition = condition
        emb = 4 * model_channels
        self.cond = Conditioner(emb, condition, rep_dim, num_classes, rep_drop_prob)
        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        self.down = nn.ModuleList()
        chans, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, model_channels * mult, emb, dropout)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(AttnBlock(ch))
                self.down.append(nn.ModuleList(layers))
                chans.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb, dropout), AttnBlock(ch), ResBlock(ch, ch, emb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), model_channels * mult, emb, dropout)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(AttnBlock(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(_Upsample(ch))
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """ADM's init: the last conv of every residual block, every attention output projection and
        the output conv are zero, so each block starts as its skip and the untrained U-Net predicts
        0; the rest keeps PyTorch's default init. (The Conditioner initialised itself when built.)"""
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_module(m.out_layers[-1])
            elif isinstance(m, AttnBlock):
                zero_module(m.proj)
        zero_module(self.out[-1])

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, (ResBlock, AttnBlock)) else layer(h)
        return h

    def forward(
        self, x: Tensor, t: Tensor, rep: Tensor | None = None, label: Tensor | None = None, drop: Tensor | None = None
    ) -> Tensor:
        emb = self.cond(t, rep, label, drop)  # (N, E)
        h = self.input_conv(x)  # (N, C0, H, W)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)  # (N, Cmax, H/2^L, W/2^L)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (N, C, H, W)


class _Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# Named sizes -> UNet kwargs. `unet_fmnist`: 1.25M parameters, the default preset's generator:
# slower per training step than dit_fmnist, yet with v-prediction its RCG samples score better at
# the same CPU time (docs/measurements.md#generator-choice).
UNET_ARCHS: dict[str, dict[str, Any]] = {
    "unet_tiny": dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
    "unet_fmnist": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,)),
}


def build_unet(name: str, **kwargs: Any) -> UNet:
    """The U-Net of named size `name` (`UNET_ARCHS`); `kwargs` (input_size, in_channels, condition,
    ...) complete or override its entry."""
    merged = {**lookup_arch(UNET_ARCHS, name, "U-Net size"), **kwargs}
    for k in ("channel_mult", "attention_levels"):
        merged[k] = tuple(merged[k])  # JSON round-trips tuples as lists
    return UNet(**merged)
