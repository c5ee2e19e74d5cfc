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
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from rcg.config import DataConfig, EncoderConfig
from rcg.data.loader import make_loader, shards_id
from rcg.encoders.augment import augment, two_view_recipes
from rcg.encoders.vit import EncoderSpec, RepEncoder, build_mlp, build_vit, cls_token, preprocess
from rcg.training import DistInfo, LoopSpec, adamw, fingerprint, fit, seed_everything

log = logging.getLogger(__name__)


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


def momentum_at(step: int, total: int, m0: float) -> float:
    """Momentum increased from m0 to 1 with a half cosine (MoCo v3, following BYOL)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total)))) * (1.0 - m0)


# Encoder-block fields that do not change what pretraining computes (kept out of the resume fingerprint).
NOT_TRAINING = {"checkpoint", "checkpoint_format", "knn_k", "knn_max_train", "ckpt_every",
                 "log_every", "out_dir", "checkpoint_dir", "metrics_file", "details_file", "curves_file"}


def training_block(ecfg: EncoderConfig) -> dict[str, Any]:
    """The encoder settings that change what MoCo pretraining computes."""
    return {k: v for k, v in asdict(ecfg).items() if k not in NOT_TRAINING}


def training_fingerprint(ecfg: EncoderConfig, data_cfg: DataConfig) -> str:
    """Hash of everything that changes MoCo pretraining (settings and shards): what a resume
    checkpoint must match."""
    return fingerprint(training_block(ecfg), data_cfg.image_size, data_cfg.channels, shards_id(data_cfg.shards_dir))


def pretrain(data_cfg: DataConfig, ecfg: EncoderConfig, spec: EncoderSpec, n_train: int, resume_id: str,
             info: DistInfo, tracker: Any = None) -> tuple[RepEncoder, dict[str, Any]]:
    """MoCo v3 pretraining of `spec` on the train shards through the shared loop (resumable; AdamW,
    warm-up then half cosine, momentum cosine-increased to 1); returns the base encoder (as in the
    official checkpoints, not the momentum encoder) and the loop's summary. `resume_id` is what a
    checkpoint must match to be resumed (settings and data)."""
    per_rank = ecfg.batch_size // info.world_size
    total = max(1, round(ecfg.epochs * n_train / ecfg.batch_size))
    seed_everything(ecfg.seed, info.rank)
    vit = build_vit(spec)
    init_patch_embed(vit, freeze=ecfg.freeze_patch_embed)
    model = MoCoV3(vit, spec.rep_dim, ecfg.pred_hidden_dim, ecfg.temperature).to(info.device)
    if info.distributed and info.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # MoCo v3 syncs BN (GPU only)
    base_lr = ecfg.lr * ecfg.batch_size / 256  # MoCo v3's linear scaling rule
    opt = adamw([p for p in model.parameters() if p.requires_grad], base_lr, weight_decay=ecfg.weight_decay,
                device=info.device)
    loop = LoopSpec(
        name="encoder (MoCo v3)", steps=total, lr=base_lr, batch_size=ecfg.batch_size, decay="cosine",
        warmup_steps=min(total, round(ecfg.warmup_epochs * n_train / ecfg.batch_size)), amp=ecfg.amp,
        log_every=ecfg.log_every, ckpt_every=ecfg.ckpt_every, config_key="encoder",
        checkpoint_dir=ecfg.checkpoint_dir, fingerprint=resume_id,
    )
    view1, view2 = two_view_recipes(ecfg.crop_min_scale, ecfg.blur_prob, ecfg.solarize_prob, ecfg.jitter,
                                    blur_sigma=tuple(ecfg.blur_sigma))

    def views(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(info.device, non_blocking=True)
        return preprocess(augment(x, spec.img_size, view1), spec), preprocess(augment(x, spec.img_size, view2), spec)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # iter() now: the DataLoader draws its base seed before `fit` restores the RNG streams
        batches = iter(make_loader(data_cfg, "train", "train", per_rank, seed=ecfg.seed, skip_batches=start))
        return (views(b) for b in batches)

    def loss(moco: torch.nn.Module, pair: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return moco(*pair, momentum_at(step, total, ecfg.momentum))

    log.info("MoCo v3 pretraining: %d steps of %d images (%.1f epochs of %d), lr %.2e",
             total, ecfg.batch_size, ecfg.epochs, n_train, base_lr)
    trained = fit(loop, model, opt, loss, data, info, tracker,
                  extras=lambda step: {"momentum": momentum_at(step, total, ecfg.momentum)})
    return RepEncoder(spec, trained.model.base_encoder.cpu()), {**trained.summary, "epochs": ecfg.epochs}


__all__ = ["NOT_TRAINING", "MoCoV3", "concat_all_gather", "init_patch_embed", "momentum_at", "pretrain",
           "training_block", "training_fingerprint"]
