"""MoCo v3 pretraining (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021), for domains without an official checkpoint.

Two augmented views of each image go through the base encoder (ViT + projector) and a predictor,
and through a momentum encoder (an EMA of the base encoder, no gradient). The loss is the
symmetrised InfoNCE between each query and the other view's key, with all keys of the global batch
as negatives (gathered across DDP ranks), scaled by 2*tau as in the paper's pseudo-code. The
momentum follows a cosine schedule from `m0` to 1; the learning rate warms up linearly, then
follows a half cosine. As in the paper, the random patch projection may be frozen for stability.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from rcg.encoders.vit import build_mlp, cls_token


class MoCoV3(nn.Module):
    """Base encoder + predictor (trained) and momentum encoder (EMA) with the symmetric InfoNCE loss."""

    def __init__(
        self, base_encoder: VisionTransformer, rep_dim: int, pred_hidden_dim: int, temperature: float
    ) -> None:
        super().__init__()
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder).requires_grad_(False)
        # MoCo v3's 2-layer predictor; its output has no BN (last_bn=False).
        self.predictor = build_mlp(2, rep_dim, pred_hidden_dim, rep_dim, last_bn=False)
        self.temperature = temperature

    @staticmethod
    def embed(encoder: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        """Projector output of the CLS token (what RCG's representation is made of)."""
        return encoder.head(cls_token(encoder, x))  # (B, rep_dim)

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """k <- m * k + (1 - m) * q, parameters only (BN statistics are the momentum encoder's own)."""
        for q, k in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries against all keys of the global batch; the positive is the same image."""
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        k_all = concat_all_gather(k)  # negatives from every rank (no gradient through keys)
        logits = q @ k_all.t() / self.temperature  # (B, world * B)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.embed(self.base_encoder, x1))  # (B, rep_dim)
        q2 = self.predictor(self.embed(self.base_encoder, x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.embed(self.momentum_encoder, x1)
            k2 = self.embed(self.momentum_encoder, x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 (identity outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def init_patch_embed(vit: VisionTransformer, freeze: bool) -> None:
    """MoCo v3's patch projection: Xavier-uniform over the flattened patch, optionally frozen.

    The paper finds a fixed random patch projection removes the loss spikes of ViT training. A conv
    stem keeps PyTorch's initialisation and trains: early convolutions are Xiao et al.'s own answer
    to that instability, and freezing random convolutions would throw their benefit away.
    """
    proj = vit.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        return  # a conv stem (rcg.encoders.vit.conv_stem)
    fan = proj.weight[0].numel() + proj.weight.shape[0]  # C*p*p inputs + embed_dim outputs
    val = math.sqrt(6.0 / fan)
    with torch.no_grad():
        nn.init.uniform_(proj.weight, -val, val)
        nn.init.zeros_(proj.bias)
    if freeze:
        proj.requires_grad_(False)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up then half-cosine decay to 0 (MoCo v3's schedule, per step)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def momentum_at(step: int, total: int, m0: float) -> float:
    """Momentum increased from m0 to 1 with a half cosine (MoCo v3, following BYOL)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total)))) * (1.0 - m0)


__all__ = ["MoCoV3", "concat_all_gather", "init_patch_embed", "lr_at", "momentum_at"]
