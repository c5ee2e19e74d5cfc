"""The VQGAN tokenizer MAGE generates in (paper section 3.3; docs/paper.md#image-generators).

RCG's MAGE does not see pixels: a frozen VQGAN turns each image into a grid of codebook ids, MAGE
learns to generate the ids, and the VQGAN's decoder turns generated ids back into an image. The
official tokenizer is MaskGIT's VQGAN (Chang et al. 2022) ported from JAX (`vqgan_jax_strongaug.ckpt`,
`maskgit_f16` here): a 1024 x 256 codebook and a convolutional encoder / decoder of width 128 with
channel multipliers (1, 1, 2, 2, 4), i.e. four halvings and 16 x 16 ids for a 256 px image.

What the port has, and this module reproduces, so the official weights load unchanged:
- two residual blocks per level and none of taming's attention blocks; GroupNorm (eps 1e-6) and
  swish before every convolution; the residual blocks' convolutions and the encoder's first
  convolution carry no bias;
- average pooling to go down, nearest-neighbour upsampling plus a 3x3 convolution to go up;
- no `quant_conv` / `post_quant_conv`: the encoder's last 1x1 convolution already gives the code
  dimension, and the decoder starts from the looked-up codes;
- the JAX port's residual block: where a block changes the channel count, its 1x1 shortcut is
  applied to the block's output branch `h`, not to its input (the input is dropped there);
- images in and out in [0, 1], no normalisation.

Smaller sizes of the same network (`VQ_ARCHS`) serve CPU runs: `vq_tiny` for the tests and
`vq_fmnist` for Fashion-MNIST, both trained by rcg.tokenizers.train. A tokenizer folder holds
`tokenizer.safetensors` and `tokenizer.json` (size, token grid, provenance); `load_tokenizer` reads
it back frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg import layers
from rcg.io import PipelineError, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

NAME = "tokenizer"  # <dir>/tokenizer.safetensors + <dir>/tokenizer.json

# Named sizes: constructor kwargs of `VQGAN` (in_channels and image_size come from the data).
# `maskgit_f16` is the official tokenizer. The CPU sizes halve twice (28 px -> 7 x 7 ids,
# 32 px -> 8 x 8); docs/measurements.md#tokenizer-size has what `vq_fmnist` costs to train.
VQ_ARCHS: dict[str, dict[str, Any]] = {
    "maskgit_f16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                        codebook_size=1024, norm_groups=32),
    "vq_tiny": dict(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16, codebook_size=32, norm_groups=8),
    "vq_fmnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=256,
                      norm_groups=32),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> 3x3 conv, twice, plus a shortcut; convolutions without bias.

    The JAX port's quirk: when `c_in != c_out` the output is `nin_shortcut(h) + h`, the 1x1
    shortcut taken from the residual branch `h`, so the block's input reaches the output only
    through `h` (its weight is therefore `c_out x c_out`).
    """

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(h)) + h


class _Level(nn.Module):
    """One resolution of the encoder or decoder: `block[i]` (state-dict names of the official file)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks))


class _Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (with bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResBlock(channels, channels, groups)
    mid.block_2 = ResBlock(channels, channels, groups)
    return mid


class Encoder(nn.Module):
    """Image [B, C, H, W] in [0, 1] -> continuous codes [B, z, H / f, W / f], f = 2^(levels - 1)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, groups: int) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            _Level(([ch] + widths)[i], w, num_res_blocks, groups) for i, w in enumerate(widths)
        )
        self.mid = _middle(widths[-1], groups)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)  # the port goes down by average pooling, not a strided conv
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Codes [B, z, h, w] -> image [B, C, h * f, w * f] (unclamped; `VQGAN.decode` clamps)."""

    def __init__(self, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, groups: int) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = _middle(widths[-1], groups)
        # up[i] works at the resolution of down[i]; it is run from the last level to the first,
        # each level taking the width of the level below it.
        ins = widths[1:] + [widths[-1]]
        self.up = nn.ModuleList(_Level(ins[i], w, num_res_blocks, groups) for i, w in enumerate(widths))
        for i in range(1, len(widths)):
            self.up[i].upsample = _Upsample(widths[i])
        self.norm_out = _norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """The codebook (`embedding`, K x z): each code vector is replaced by its nearest entry."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, flat: Tensor) -> Tensor:
        """Ids [N] of the nearest codebook entries (squared Euclidean) to `flat` [N, z], in fp32."""
        with torch.autocast(flat.device.type, enabled=False):
            e = self.embedding.weight.float()
            f = flat.float()
            d = (f * f).sum(1, keepdim=True) - 2.0 * f @ e.t() + (e * e).sum(1)[None]  # (N, K)
            return d.argmin(dim=1)


class VQGAN(nn.Module):
    """Encoder, codebook and decoder; `encode` maps images to ids, `decode` ids to images.

    Fully convolutional: any side divisible by `downsample` works; `image_size` is the side it is
    used at (the pipeline's data.image_size, 256 for the official tokenizer) and fixes `token_grid`.
    """

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, codebook_size: int = 1024,
                 norm_groups: int = 32, image_size: int = 256) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        self.kwargs = dict(in_channels=in_channels, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           z_channels=z_channels, codebook_size=codebook_size, norm_groups=norm_groups,
                           image_size=image_size)
        self.downsample = 2 ** (len(ch_mult) - 1)
        if image_size % self.downsample:
            raise PipelineError(f"tokenizer: image side {image_size} is not a multiple of its downsampling "
                                f"factor {self.downsample}")
        self.in_channels, self.image_size, self.codebook_size = in_channels, image_size, codebook_size
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        self.decoder = Decoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        self.quantize = Quantizer(codebook_size, z_channels)
        self.meta: dict[str, Any] = {}  # the tokenizer.json it was loaded from (`load_tokenizer`)

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    def lookup(self, ids: Tensor) -> Tensor:
        """Ids [B, h, w] -> code vectors [B, z, h, w] (the reference's `get_codebook_entry`)."""
        return self.quantize.embedding(ids).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] -> ids [B, H / f, W / f] (int64)."""
        z = self.encoder(images)  # (B, z, h, w)
        b, d, h, w = z.shape
        ids = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))  # (B*h*w,)
        return ids.view(b, h, w)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """Ids [B, h, w] -> images [B, C, h * f, w * f] clamped to [0, 1]."""
        return self.decoder(self.lookup(ids)).float().clamp(0.0, 1.0)

    def freeze(self) -> VQGAN:
        """Eval mode, no gradients: the tokenizer is never trained with the generator."""
        return self.eval().requires_grad_(False)


def build_vqgan(name: str, in_channels: int = 3, image_size: int = 256, **kwargs: Any) -> VQGAN:
    """The tokenizer of named size `name` (`VQ_ARCHS`) for images of `in_channels` x `image_size`."""
    arch = layers.lookup_arch(VQ_ARCHS, name, "tokenizer size", key="tokenizer.arch")
    return VQGAN(**{**arch, "in_channels": in_channels, "image_size": image_size, **kwargs})


def save_tokenizer(model: VQGAN, out_dir: str | Path, arch: str, provenance: dict[str, Any]) -> Path:
    """Write `<out_dir>/tokenizer.safetensors` and `tokenizer.json` atomically; returns the weights path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights = out / f"{NAME}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_json(out / f"{NAME}.json", {
        "arch": arch, "kwargs": model.kwargs, "codebook_size": model.codebook_size,
        "token_grid": list(model.token_grid), "input_size": model.image_size, "channels": model.in_channels,
        "downsample": model.downsample, "input_range": [0.0, 1.0], "provenance": provenance,
    })
    return weights


def load_tokenizer(model_dir: str | Path, device: torch.device | str = "cpu") -> VQGAN:
    """The frozen tokenizer in `model_dir` (as `save_tokenizer` wrote it); `.meta` holds its JSON."""
    weights, meta_path = Path(model_dir) / f"{NAME}.safetensors", Path(model_dir) / f"{NAME}.json"
    if not weights.is_file():
        raise PipelineError(f"{weights}: no tokenizer (run `rcg tokenizer` first)")
    meta = read_json(meta_path)
    if not isinstance(meta.get("kwargs"), dict):
        raise PipelineError(f"{meta_path}: not a tokenizer description (no kwargs)")
    from safetensors.torch import load_file

    model = VQGAN(**meta["kwargs"])
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{weights}: weights do not match {meta_path}: {e}") from None
    model.meta = meta
    return model.to(device).freeze()


def verify_tokenizer(vq: VQGAN, model_dir: str | Path) -> None:
    """Reload what `save_tokenizer` wrote to `model_dir`; it must tokenize and decode a fixed probe
    exactly as the in-memory `vq` does."""
    back = load_tokenizer(model_dir)
    probe = torch.rand(2, vq.in_channels, vq.image_size, vq.image_size, generator=torch.Generator().manual_seed(0))
    a, b = vq.cpu().encode(probe), back.encode(probe)
    if not torch.equal(a, b) or not torch.equal(vq.decode(a), back.decode(b)):
        raise PipelineError(f"{model_dir}: the reloaded tokenizer does not reproduce the saved one")


__all__ = ["VQ_ARCHS", "VQGAN", "Decoder", "Encoder", "Quantizer", "ResBlock", "build_vqgan",
           "load_tokenizer", "save_tokenizer", "verify_tokenizer"]
