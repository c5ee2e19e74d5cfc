"""Training a VQGAN tokenizer on the train shards, for a domain the official ImageNet one does not fit.

The objective is VQ-VAE's (van den Oord et al. 2017): a reconstruction term (L2 or L1 in pixel
space), the codebook term ||sg[z] - e||^2 that pulls each used code to the encoder outputs it
serves, and the commitment term beta ||z - sg[e]||^2; the decoder gets the codes through the
straight-through estimator. The adversarial and perceptual terms of VQGAN are left out: on a CPU
budget they cost more than the model itself, and the pipeline scores reconstructions with its own
feature distance instead (metrics/tokenizer.json).

A codebook trained this way tends to collapse onto a few codes. Two standard remedies keep it used:
- data initialisation: at the first step the codebook becomes k-means centroids of that batch's
  encoder outputs (as in Jukebox / vector-quantize-pytorch's `kmeans_init`), so every code starts
  where the data are;
- dead-code restarts: every `restart_every` steps, each code that served fewer than `restart_below`
  times the average code's share since the last check is moved onto a random encoder output of
  the current batch.

Both draw only from the generator handed to the shared loop, and the usage counts live in buffers
of the trained module, so the loop's checkpoint holds them and a resumed run is bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg.tokenizers.vqgan import VQGAN, build_vqgan

log = logging.getLogger(__name__)


def nearest(x: Tensor, centres: Tensor) -> Tensor:
    """Index of the nearest row of `centres` [K, D] for every row of `x` [N, D] (squared L2, fp32)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.t() + (centres * centres).sum(1)[None]
    return d.argmin(dim=1)


def pick_rows(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct row indices out of n (with repetition only when k > n), drawn from `generator`."""
    if k <= n:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """k centres of the rows of `x` [N, D]: random rows, then `iters` Lloyd steps (an empty cluster
    keeps its centre)."""
    centres = x[pick_rows(len(x), k, generator).to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return centres


class VQTraining(nn.Module):
    """A VQGAN with what its training keeps besides the weights: usage counts since the last restart
    check, whether the codebook was initialised, how many codes were restarted (buffers, so the
    loop's checkpoints hold them). `forward(images, step)` returns the training loss."""

    def __init__(self, vq: VQGAN, generator: torch.Generator, *, beta: float = 0.25, recon_loss: str = "l2",
                 kmeans_iters: int = 10, restart_every: int = 100, restart_below: float = 0.03) -> None:
        super().__init__()
        self.vq, self.generator = vq, generator
        self.beta, self.recon_loss, self.kmeans_iters = beta, recon_loss, kmeans_iters
        self.restart_every, self.restart_below = restart_every, restart_below
        k = vq.codebook_size
        self.register_buffer("uses", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def maintain(self, flat: Tensor, step: int) -> None:
        """Initialise the codebook from `flat` [N, D] (first call), or restart its dead codes."""
        weight = self.vq.quantize.embedding.weight
        if not bool(self.initialised):
            weight.copy_(kmeans(flat, len(weight), self.kmeans_iters, self.generator))
            self.initialised.fill_(True)
            return
        if self.restart_every <= 0 or step % self.restart_every or float(self.uses.sum()) == 0:
            return
        dead = (self.uses < self.restart_below * self.uses.mean()).nonzero().flatten()
        if len(dead):
            weight[dead] = flat[pick_rows(len(flat), len(dead), self.generator).to(flat.device)]
            self.restarts += len(dead)
        self.uses.zero_()

    def forward(self, images: Tensor, step: int) -> Tensor:
        z = self.vq.encoder(images).float()  # (B, D, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
        if self.training:
            self.maintain(flat.detach(), step)
        ids = self.vq.quantize.nearest(flat.detach())  # (N,)
        codes = self.vq.quantize.embedding(ids).float()  # (N, D), gradient to the codebook
        if self.training:
            self.uses += torch.bincount(ids, minlength=len(self.uses)).double()
        vq_loss = F.mse_loss(codes, flat.detach()) + self.beta * F.mse_loss(flat, codes.detach())
        straight = flat + (codes - flat).detach()  # the decoder's gradient reaches the encoder
        recon = self.vq.decoder(straight.view(b, h, w, d).permute(0, 3, 1, 2)).float()
        rec_loss = F.l1_loss(recon, images) if self.recon_loss == "l1" else F.mse_loss(recon, images)
        return rec_loss + vq_loss


def train_tokenizer(tc: Any, data_cfg: Any, resume_id: str, info: Any,
                    tracker: Any = None) -> tuple[VQGAN, dict[str, Any]]:
    """Train the `tc.arch` tokenizer (`tc`: the tokenizer config block) on the train shards of
    `data_cfg` through the shared loop: AdamW, linear warm-up then a half cosine, resumable
    (`resume_id`: what a checkpoint must match). Returns the frozen tokenizer and the loop's summary."""
    from rcg.data.loader import make_loader
    from rcg.training import LoopSpec, adamw, fit, seed_everything

    seed_everything(tc.seed, info.rank)
    vq = build_vqgan(tc.arch, in_channels=data_cfg.channels, image_size=data_cfg.image_size)
    generator = torch.Generator().manual_seed(tc.seed)
    model = VQTraining(vq, generator, beta=tc.beta, recon_loss=tc.recon_loss, kmeans_iters=tc.kmeans_iters,
                       restart_every=tc.restart_every, restart_below=tc.restart_below).to(info.device)
    codebook = [vq.quantize.embedding.weight]
    rest = [p for n, p in vq.named_parameters() if not n.startswith("quantize.")]
    # No weight decay on the codebook: it would pull rarely used codes to 0, away from the data.
    opt = adamw([{"params": rest, "weight_decay": tc.weight_decay}, {"params": codebook, "weight_decay": 0.0}],
                tc.lr, betas=(0.9, 0.99), device=info.device)
    loop = LoopSpec(
        name="tokenizer", steps=tc.steps, lr=tc.lr, batch_size=tc.batch_size, decay="cosine",
        warmup_steps=min(tc.warmup_steps, tc.steps), amp=tc.amp, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
        config_key="tokenizer", checkpoint_dir=tc.checkpoint_dir, fingerprint=resume_id,
    )

    def data(start: int) -> Iterator[Tensor]:
        # iter() now: the DataLoader draws its base seed before `fit` restores the RNG streams
        batches = iter(make_loader(data_cfg, "train", "train", tc.batch_size, seed=tc.seed, skip_batches=start))
        return (b["image"].to(info.device, non_blocking=True) for b in batches)

    def loss(m: nn.Module, images: Tensor, step: int) -> Tensor:
        return m(images, step)

    def extras(step: int) -> dict[str, float]:
        return {"codes_restarted": float(model.restarts)}

    log.info("tokenizer: training %s (%d params, %d codes, %dx%d ids) for %d steps of %d images", tc.arch,
             sum(p.numel() for p in vq.parameters()), vq.codebook_size, *vq.token_grid, tc.steps, tc.batch_size)
    trained = fit(loop, model, opt, loss, data, info, tracker, generators={"tokenizer": generator}, extras=extras)
    out = trained.model
    return out.vq.cpu().freeze(), {**trained.summary, "codes_restarted": int(out.restarts)}


# Tokenizer settings that do not change what training computes (kept out of the resume fingerprint
# and the provenance).
NOT_TRAINING = {"checkpoint", "steps", "threads", "eval_images", "eval_batch_size", "ckpt_every", "log_every",
                "out_dir", "checkpoint_dir", "metrics_file", "details_file", "cache_ids"}


def training_block(tc: Any) -> dict[str, Any]:
    """The tokenizer settings (`tc`: the tokenizer config block) that change what training computes."""
    return {k: v for k, v in dataclasses.asdict(tc).items() if k not in NOT_TRAINING}


def trained_tokenizer(tc: Any, data_cfg: Any, tracker: Any = None) -> tuple[VQGAN, dict[str, Any], dict[str, Any]]:
    """Train (or resume) `tc.arch` on the train shards in one process: the codebook's initialisation
    and restarts are per-process state that DDP would not keep in step across ranks. Returns the
    tokenizer, its provenance (only what defines the weights, so a rerun that resumes at the end
    writes the same files) and the loop's summary."""
    from rcg.data.loader import shards_id
    from rcg.training import DistInfo, fingerprint

    shards = shards_id(data_cfg.shards_dir)
    resume_id = fingerprint(training_block(tc), data_cfg.image_size, data_cfg.channels, shards)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vq, summary = train_tokenizer(tc, data_cfg, resume_id, DistInfo(0, 1, 0, device), tracker)
    provenance = {"source": "trained", "training_config": training_block(tc), "steps": summary["steps"],
                  "shards": shards}
    return vq, provenance, summary


__all__ = ["NOT_TRAINING", "VQTraining", "kmeans", "nearest", "pick_rows", "trained_tokenizer", "train_tokenizer",
           "training_block"]
