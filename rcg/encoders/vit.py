"""The frozen SSL encoder and the representation RCG conditions on (docs/paper.md#representation).

A MoCo v3 ViT is timm's `VisionTransformer` with a fixed 2-D sin-cos position embedding and its
`head` replaced by MoCo v3's 3-layer projector (DINO/iBOT: the DINO head without its last layer;
DeiT: the 1000-way classifier). Encoders pretrained here may swap the patch projection for a conv
stem (`conv_stem`). The representation of an image in [0, 1] is

    x  -> grayscale repeated to 3 channels if the encoder wants 3
       -> (x - mean) / std                      # normalise first ...
       -> bicubic resize to the encoder's size   # ... then resize, as the reference does
       -> CLS token after the final LayerNorm -> head (projector) -> 256-d
       -> per-sample standardisation (zero mean, unbiased unit std over the 256 dims)

`EncoderSpec` holds everything needed to rebuild the network; it is saved beside the weights as
`encoder.json`, so `load_encoder` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from rcg.io import PipelineError, atomic_path, write_json
from rcg.layers import lookup_arch, sincos_pos_embed_2d

if TYPE_CHECKING:
    from rcg.config import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)  # Fashion-MNIST train-set pixel mean/std, measured on the 60k images
FMNIST_STD = (0.3530,)

HeadKind = Literal["mocov3", "dino", "linear"]
SHORT_SEQUENCE = 65  # token count up to which attention runs unfused (see build_vit)


@dataclass
class EncoderSpec:
    """Architecture and preprocessing of an encoder: the content of `encoder.json`."""

    img_size: int = 224  # input side after the bicubic resize
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    head: HeadKind = "mocov3"  # mocov3: 3-layer BN projector; dino: DINO head MLP; linear: DeiT
    head_hidden_dim: int = 4096  # MoCo v3: 4096; DINO/iBOT: 2048
    rep_dim: int = 256  # projector output (DeiT: the 1000 classes)
    pos_embed: Literal["sincos", "learn"] = "sincos"  # MoCo v3 fixes a 2-D sin-cos embedding
    # How pixels become tokens: "patch" is ViT's linear patch projection (every official checkpoint);
    # "conv" a stack of 3x3 stride-2 convolutions onto the same token grid (see `conv_stem`).
    stem: Literal["patch", "conv"] = "patch"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PipelineError(f"encoder spec: unknown keys {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


# Size presets of the official checkpoints (docs/paper.md#representation): EncoderSpec fields by name.
# `rep_dim` is the caller's unless the entry fixes it (DeiT's representation is its 1000-way output).
_DINO = dict(head="dino", head_hidden_dim=2048, pos_embed="learn")  # DINO head, learned positions
ENCODER_ARCHS: dict[str, dict[str, Any]] = {
    "mocov3_vit_small": dict(embed_dim=384, depth=12, num_heads=12),  # MoCo v3 ViT-S: 12 heads
    "mocov3_vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "mocov3_vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "dino_vit_base": _DINO,
    "ibot_vit_base": _DINO,
    "deit_vit_base": dict(head="linear", rep_dim=1000, pos_embed="learn"),  # no projector
}


def encoder_spec(name: str, rep_dim: int = 256) -> EncoderSpec:
    """The EncoderSpec of the official size `name` (`ENCODER_ARCHS`) with a `rep_dim`-d representation."""
    return EncoderSpec(**{"rep_dim": rep_dim, **lookup_arch(ENCODER_ARCHS, name, "encoder arch")})


def build_mlp(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's projector/predictor: Linear(no bias)-BN-ReLU blocks, last BN without affine.

    Layer indices match the official checkpoints (head.0/1/3/4/6/7 for three layers).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))  # SimCLR-style BN, no gamma/beta
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection MLP without the weight-normalised last layer (keys head.mlp.0/2/4)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def conv_stem(in_chans: int, embed_dim: int, img_size: int, patch_size: int) -> nn.Sequential:
    """A convolutional stem in place of the patch projection (Xiao et al., "Early Convolutions Help
    Transformers See Better", NeurIPS 2021): ceil(log2(patch)) blocks of 3x3 stride-2 conv, BN and
    ReLU with widths doubling up to embed_dim / 2, then a 1x1 conv to embed_dim. Padding 1 rounds
    each side up, so 28 px with patch 7 gives the same 4x4 grid (28 -> 14 -> 7 -> 4).
    """
    n = max(1, math.ceil(math.log2(patch_size)))
    side = img_size
    layers: list[nn.Module] = []
    c_in = in_chans
    for i in range(n):
        c_out = max(1, embed_dim >> (n - i))  # 192 wide, patch 7: 24, 48, 96
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in, side = c_out, (side + 1) // 2
    if side != img_size // patch_size:
        raise ValueError(f"a conv stem maps {img_size} px to a {side}-token side, not the "
                         f"{img_size // patch_size} of patch {patch_size}; pick a patch size near a power of 2")
    layers.append(nn.Conv2d(c_in, embed_dim, 1))
    return nn.Sequential(*layers)


def build_vit(spec: EncoderSpec) -> VisionTransformer:
    """timm ViT with the spec's head; MoCo v3 initialisation for the MoCo projector variant."""
    num_classes = spec.rep_dim if spec.head == "linear" else 0
    vit = VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        weight_init="moco" if spec.head == "mocov3" else "",
    )  # timm's LayerNorm default eps is 1e-6, as in the reference
    if spec.stem == "conv":
        # timm's PatchEmbed only checks the input size, calls `proj` and flattens its output grid.
        vit.patch_embed.proj = conv_stem(spec.in_chans, spec.embed_dim, spec.img_size, spec.patch_size)
    if spec.head == "mocov3":
        vit.head = build_mlp(3, spec.embed_dim, spec.head_hidden_dim, spec.rep_dim)
    elif spec.head == "dino":
        vit.head = DINOHead(spec.embed_dim, spec.head_hidden_dim, spec.rep_dim)
    if (spec.img_size // spec.patch_size) ** 2 + 1 <= SHORT_SEQUENCE:
        # For a few dozen tokens the explicit softmax(QK^T)V is faster than the fused kernel
        # (docs/measurements.md#encoder-attention); same math.
        for blk in vit.blocks:
            blk.attn.fused_attn = False
    if spec.pos_embed == "sincos":
        grid = spec.img_size // spec.patch_size
        with torch.no_grad():  # zero for the CLS token; float32 sinusoids, as MoCo v3's torch code
            vit.pos_embed[0, 0].zero_()
            vit.pos_embed[0, 1:].copy_(sincos_pos_embed_2d(grid, spec.embed_dim, dtype=torch.float32))
        vit.pos_embed.requires_grad_(False)  # fixed, not learned (MoCo v3)
    return vit


def preprocess(images: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> the encoder's input: channels matched, normalised, then resized."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    c = images.shape[1]
    if c != spec.in_chans:
        if c == 1 and spec.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)  # grayscale -> 3 identical channels
        else:
            raise ValueError(f"encoder takes {spec.in_chans} channels, images have {c}")
    mean = torch.tensor(spec.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    x = (images - mean) / std  # normalise BEFORE resizing (docs/paper.md#representation)
    if x.shape[-2:] != (spec.img_size, spec.img_size):
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bicubic", align_corners=False)
    return x


def cls_token(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """CLS token after the final norm (timm >= 0.6 returns all tokens from forward_features)."""
    return vit.forward_features(x)[:, 0]  # (B, D)


def standardize(r: torch.Tensor) -> torch.Tensor:
    """Per-sample standardisation with the unbiased std, exactly as the reference (no epsilon)."""
    return (r - r.mean(dim=1, keepdim=True)) / r.std(dim=1, keepdim=True)


class RepEncoder(nn.Module):
    """The frozen encoder: images in [0, 1] -> standardised representation [B, rep_dim].

    Always in eval mode (BatchNorm uses running statistics) and without gradients; `train()` cannot
    switch it back, as in the reference's RDM.
    """

    def __init__(self, spec: EncoderSpec, vit: VisionTransformer | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.vit = vit if vit is not None else build_vit(spec)
        self.rep_dim = spec.rep_dim
        self.freeze()

    def freeze(self) -> RepEncoder:
        self.vit.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> RepEncoder:  # noqa: ARG002 - frozen by design
        return super().train(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS feature before the head [B, embed_dim] (for diagnostics such as kNN)."""
        return cls_token(self.vit, preprocess(images, self.spec))

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """The head output before standardisation [B, rep_dim]."""
        return self.vit.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return standardize(self.project(images))  # (B, rep_dim)


def save_encoder(encoder: RepEncoder | VisionTransformer, spec: EncoderSpec, model_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write `<model_dir>/encoder.safetensors` + `encoder.json` (spec and provenance), atomically."""
    vit = encoder.vit if isinstance(encoder, RepEncoder) else encoder
    model_dir = Path(model_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    with atomic_path(model_dir / "encoder.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(model_dir / "encoder.json", {"spec": spec.to_dict(), **(extra or {})})
    return model_dir


def read_spec(model_dir: str | Path) -> tuple[EncoderSpec, dict[str, Any]]:
    """The spec and metadata in `<model_dir>/encoder.json`."""
    path = Path(model_dir) / "encoder.json"
    if not path.exists():
        raise PipelineError(f"{path}: no encoder here (run `rcg encoder` first)")
    meta = json.loads(path.read_text())
    if "spec" not in meta:
        raise PipelineError(f"{path}: missing key 'spec'")
    return EncoderSpec.from_dict(meta["spec"]), meta


def load_encoder(model_dir: str | Path = "models/encoder", device: str | torch.device = "cpu") -> RepEncoder:
    """The frozen encoder saved in `model_dir` (strict: every weight must match the spec)."""
    from rcg.encoders.checkpoints import load_strict

    spec, _ = read_spec(model_dir)
    weights = Path(model_dir) / "encoder.safetensors"
    if not weights.exists():
        raise PipelineError(f"{weights}: encoder weights missing (run `rcg encoder` first)")
    enc = RepEncoder(spec)
    load_strict(enc.vit, load_file(str(weights)), source=str(weights))
    return enc.to(device).freeze()


def spec_from_config(ecfg: EncoderConfig, channels: int,
                     measured: tuple[list[float], list[float]] | None = None) -> EncoderSpec:
    """The encoder architecture the config describes (a named official size, or the size fields);
    `measured` is the (mean, std) normalisation to use when encoder.mean/std are empty."""
    if ecfg.arch:
        if ecfg.arch not in ENCODER_ARCHS:
            raise PipelineError(f"encoder.arch: unknown {ecfg.arch!r} (known: {', '.join(sorted(ENCODER_ARCHS))})")
        return encoder_spec(ecfg.arch, ecfg.rep_dim)
    mean, std = (ecfg.mean, ecfg.std) if ecfg.mean or ecfg.std or measured is None else measured
    if len(mean) != channels or len(std) != channels:
        raise PipelineError(
            f"encoder.mean/std: need {channels} values for data.channels={channels}, got {mean} / {std} "
            "(leave both empty to measure them on the train shards)"
        )
    if ecfg.img_size % ecfg.patch_size:
        raise PipelineError(f"encoder.img_size {ecfg.img_size} is not a multiple of patch_size {ecfg.patch_size}")
    return EncoderSpec(
        img_size=ecfg.img_size, patch_size=ecfg.patch_size, in_chans=channels,
        embed_dim=ecfg.embed_dim, depth=ecfg.depth, num_heads=ecfg.num_heads, mlp_ratio=ecfg.mlp_ratio,
        head="mocov3", head_hidden_dim=ecfg.proj_hidden_dim, rep_dim=ecfg.rep_dim, pos_embed="sincos",
        mean=tuple(mean), std=tuple(std),
        stem="patch" if ecfg.checkpoint else ecfg.stem,  # every official format has a patch projection
    )


def verify_encoder(encoder: RepEncoder, model_dir: str | Path) -> None:
    """Reload what `save_encoder` wrote to `model_dir` and check it reproduces the in-memory encoder
    (finite representations, equal to 1e-5 on a fixed probe)."""
    back = load_encoder(model_dir)
    spec = encoder.spec
    probe = torch.rand(4, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = encoder(probe), back(probe)
    if not torch.isfinite(a).all():
        raise PipelineError(f"{model_dir}: encoder produces non-finite representations")
    if not torch.allclose(a, b, atol=1e-5):
        raise PipelineError(f"{model_dir}: reloaded encoder does not reproduce the saved one")

__all__ = [
    "DINOHead", "ENCODER_ARCHS", "EncoderSpec", "RepEncoder", "build_mlp", "build_vit", "cls_token",
    "conv_stem", "encoder_spec", "load_encoder", "preprocess", "read_spec", "save_encoder", "spec_from_config",
    "standardize", "verify_encoder",
]
