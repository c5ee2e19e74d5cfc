"""Training the representation-conditioned image generator and its baselines (paper section 3.3).

One recipe, five conditions (Table 9a: same architecture and budget): `rep` (RCG: each crop's
representation conditions the generator, `rep_drop_prob` of them swapped for the learned
`fake_latent` so guidance works), `none` (the unconditional baseline), `label` (a class embedding
in the representation's place), `cluster` (the label network on k-means cluster ids of the train
representations, rcg.clusters: Table 9a's fourth row) and `contrastive` (the rep network, each image
conditioned on a hypersphere sample drawn by the contrastive posterior of rcg.priors, which
`train_generator.rep_posterior: contrastive` also applies to `rep`). The representation comes from the same augmented crop the generator
sees: from the encode stage's cache (exact for flip-only augmentation, checked against the encoder
on the first batch), or from the frozen encoder on every batch (`rep_source: encoder`, for random
crops). AdamW (betas 0.9, 0.95), warm-up then constant lr, gradient clipping, EMA, bf16 autocast,
through the shared loop (rcg.training.fit).

A MAGE arch (paper section 3.3, the paper's main generator) trains through the same loop and the
same conditions on the ids of the frozen tokenizer in `train_generator.tokenizer`
(rcg.generators.tokens): its loss is MAGE's masked-token cross-entropy, and its recipe (cosine
lr, weight decay off biases and norms, no EMA) comes from the config (the imagenet256_mage_*
presets); without EMA the trained weights are the ones written. Its ids come, like the
representations, from a cache when the crops are fixed per image: the tokenizer stage's ids of both
views (`TokenIds`, checked against the tokenizer on the first batch), else from the tokenizer on
every batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.clusters import Clusters, save_clusters
from rcg.config import DataConfig, GeneratorConfig
from rcg.data.loader import make_loader
from rcg.diffusion import Diffusion, diffusion_meta
from rcg.features import RepCache
from rcg.generators import arch_kind, build_generator, save_generator
from rcg.generators.tokens import IDS_FILE, TokenCache, TokenCodec, fixed_crop_reason, mage_kwargs, weight_decay_groups
from rcg.generators.vae import Codec, codec_for
from rcg.io import PipelineError
from rcg.priors import contrastive_posterior, hypersphere
from rcg.sampling import sample_images, sample_tokens, save_grid
from rcg.training import DistInfo, LoopSpec, adamw, autocast, fit, seed_everything, unwrap

log = logging.getLogger(__name__)


def sampling_settings(gcfg: GeneratorConfig, codec: Codec) -> dict[str, Any]:
    """How images are sampled from this generator (saved in generator.json; every later use reads it).
    The x0 clamp applies in pixel space only: VAE latents have no known range. A MAGE decodes
    `sample_steps` iterations with its re-masking temperature."""
    if codec.meta()["type"] == "tokens":
        return {"sampler": "mage", "steps": gcfg.sample_steps, "choice_temperature": gcfg.choice_temperature,
                "amp": gcfg.amp}
    clip = float(gcfg.sample_clip_x0) if codec.meta()["type"] == "pixel" else 0.0
    return {"sampler": gcfg.sampler, "steps": gcfg.sample_steps, "eta": gcfg.sample_eta, "amp": gcfg.amp, "clip_x0": clip}


# What each training condition feeds the network (rcg.generators.conditioning): the network of a
# `cluster` generator is a label network over the k clusters, a `contrastive` one a rep network.
MODEL_CONDITION = {"rep": "rep", "none": "none", "label": "label", "cluster": "label", "contrastive": "rep"}


@dataclass
class Inputs:
    """Where a generator's training inputs are, besides the shards (data.shards_dir)."""

    features: str | Path  # the encode stage's train.parquet (the rep cache)
    encoder_dir: str | Path  # the frozen encoder (rep_source encoder, and the cache check)
    classes: list[str]  # class names of the shards (the label baseline's embedding table)
    rep_dim: int  # the encoder's representation size
    clusters: Clusters | None = None  # condition `cluster`: the k-means of the train reps

    def num_classes(self, condition: str) -> int:
        """Rows of the class table: the clusters for `cluster`, else the classes (at least 1)."""
        if condition == "cluster":
            if self.clusters is None:
                raise PipelineError("condition cluster needs the k-means of the train reps (rcg.clusters)")
            return self.clusters.k
        return max(len(self.classes), 1)


def uses_posterior(gcfg: GeneratorConfig, condition: str) -> bool:
    """Whether `condition` trains on contrastive-posterior samples instead of its own reps."""
    return condition == "contrastive" or (condition == "rep" and gcfg.rep_posterior == "contrastive")


class Posterior:
    """The contrastive posterior of training (rcg.priors): a fresh bank of hypersphere samples per
    batch, from torch's global RNG (saved and restored by the loop's checkpoints), and the running mean
    of the information bound since it was last read (the curve's `info_bound` column)."""

    def __init__(self, temperature: float, bank: int) -> None:
        self.temperature, self.bank = temperature, bank
        self.reset()

    def reset(self) -> None:
        """Forget every bound so far (the draws for the sample grids are not training)."""
        self.total, self.count, self.run_total, self.run_count = 0.0, 0, 0.0, 0

    @property
    def run_mean(self) -> float | None:
        """The mean bound over every batch of this run that a log line reported."""
        return self.run_total / self.run_count if self.run_count else None

    def __call__(self, rep: Tensor) -> Tensor:
        bank = hypersphere(self.bank, rep.shape[1])
        drawn, bound = contrastive_posterior(rep, bank, self.temperature)
        self.total, self.count = self.total + float(bound.sum()), self.count + len(bound)
        return drawn.to(rep.device)

    def take_mean(self, step: int = 0) -> dict[str, float]:
        """{"info_bound": mean nats since the last call} (empty when no batch came); the loop's
        `extras(step)`."""
        if not self.count:
            return {}
        mean = self.total / self.count
        self.run_total, self.run_count = self.run_total + self.total, self.run_count + self.count
        self.total, self.count = 0.0, 0
        return {"info_bound": mean}


class Conditions:
    """The condition of each training crop (see the module docstring), and of the sample grids."""

    def __init__(self, gcfg: GeneratorConfig, inputs: Inputs, condition: str, device: torch.device,
                 verify: bool) -> None:
        self.condition, self.device, self.amp = condition, device, gcfg.amp
        self.cache = self.encoder = None
        self.clusters = inputs.clusters if condition == "cluster" else None
        uses_rep = MODEL_CONDITION[condition] == "rep"
        self.posterior = Posterior(gcfg.posterior_temperature, gcfg.posterior_bank) \
            if uses_posterior(gcfg, condition) else None
        if uses_rep and gcfg.rep_source == "cache":
            self.cache = RepCache(inputs.features)
        if uses_rep and (gcfg.rep_source == "encoder" or verify):
            from rcg.encoders import load_encoder

            self.encoder = load_encoder(inputs.encoder_dir, device)
        self.verify = uses_rep and verify and self.cache is not None

    def __call__(self, batch: dict[str, Any], x: Tensor, flipped: Tensor) -> dict[str, Tensor]:
        if self.condition == "label":
            return {"label": batch["label"].to(self.device)}
        if self.clusters is not None:  # the image's cluster, whichever view it is
            return {"label": self.clusters.ids(batch["key"]).to(self.device)}
        if MODEL_CONDITION[self.condition] != "rep":
            return {}
        rep = self.rep(batch, x, flipped)
        return {"rep": rep if self.posterior is None else self.posterior(rep)}

    def rep(self, batch: dict[str, Any], x: Tensor, flipped: Tensor) -> Tensor:
        """The crop's own representation: from the cache (checked once) or the encoder."""
        if self.cache is not None:
            rep = self.cache.lookup(batch["key"], flipped).to(self.device)
            if self.verify:  # once, on the first batch
                err = self.cache.verify(rep, self.encoder, x)
                log.info("cached reps match the encoder on the first batch (max abs diff %.2g)", err)
                self.verify = False
            return rep
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.encoder(x).float()


class TokenIds:
    """The ids a MAGE trains on for a batch of crops: looked up in the tokenizer stage's ids file
    (exact when the crops are fixed per image; the first batch checked against the tokenizer when
    `verify`), or, without a usable file, the tokenizer run on the crops (the log says why)."""

    def __init__(self, codec: TokenCodec, rep_source: str, hflip: bool, verify: bool) -> None:
        self.codec = codec
        self.cache, why = token_cache(codec, rep_source, hflip)
        self.verify = verify and self.cache is not None
        if self.cache is None:
            log.info("token ids: the tokenizer runs on every batch (%s)", why)
        else:
            log.info("token ids: read from %s (%d rows; views %s)", self.cache.path, len(self.cache),
                     "+".join(self.cache.views))

    @property
    def source(self) -> str:
        return "tokenizer" if self.cache is None else "cache"

    def __call__(self, batch: dict[str, Any], x: Tensor, flipped: Tensor) -> Tensor:
        if self.cache is None:
            return self.codec.encode(x)
        ids = self.cache.lookup(batch["key"], flipped).to(x.device)
        if self.verify:  # once, on the first batch
            diff = self.cache.verify(ids, self.codec, x)
            (log.warning if diff else log.info)("cached token ids match the tokenizer on the first batch "
                                                "(%d of %d differ)", diff, ids.numel())
            self.verify = False
        return ids


def token_cache(codec: TokenCodec, rep_source: str, hflip: bool) -> tuple[TokenCache | None, str]:
    """The ids file beside `codec`'s tokenizer when it can stand in for the tokenizer, else None; and why.
    A file of another tokenizer is an error (TokenCache), not a reason to fall back."""
    path = codec.path / IDS_FILE
    why = fixed_crop_reason(rep_source)
    if why is not None:
        return None, why
    if not path.is_file():
        return None, f"no {path}: tokenizer.cache_ids was off, or the tokenizer stage predates the cache"
    cache = TokenCache(path, codec.digest)
    if hflip and "flip" not in cache.views:
        return None, f"{path} holds no flipped views (written with train_generator.hflip off), and hflip is on"
    return cache, f"{path}"


def _grid_conditions(data_cfg: DataConfig, conditions: Conditions, n: int) -> dict[str, Tensor]:
    """The first `n` train images' conditions (unflipped), so every grid of a run shows the same ones."""
    if conditions.condition == "none" or n == 0:
        return {}
    batch = next(iter(make_loader(data_cfg, "train", "once", n, num_workers=0)))
    x = batch["image"].to(conditions.device)
    keep_verify, conditions.verify = conditions.verify, False
    cond = conditions(batch, x, torch.zeros(len(x), dtype=torch.bool))
    conditions.verify = keep_verify
    if conditions.posterior is not None:
        conditions.posterior.reset()
    return cond


@dataclass
class Setup:
    """A generator ready to train: network, its codec (pixels, VAE latents or tokenizer ids), its
    diffusion (None for MAGE), optimiser."""

    model: nn.Module
    codec: Codec
    diffusion: Diffusion | None
    schedule: dict[str, Any] | None  # the diffusion as generator.json records it
    kwargs: dict[str, Any]  # the constructor arguments generator.json records
    opt: torch.optim.Optimizer


def _write_grid(model: nn.Module, s: Setup, cond: dict[str, Tensor], gcfg: GeneratorConfig, device: torch.device,
                path: Path, tracker: Any, step: int) -> None:
    """A grid of samples (EMA weights where there are) with fixed noise (for `rep`: real reps, i.e.
    oracle conditioning); the model samples in eval mode and is handed back in the mode it came in."""
    n = gcfg.grid_size if not cond else min(gcfg.grid_size, next(iter(cond.values())).shape[0])
    settings, training = sampling_settings(gcfg, s.codec), model.training
    model.eval()
    if s.diffusion is None:
        images = sample_tokens(model, s.codec, n, cond, steps=settings["steps"], seed=gcfg.seed, amp=gcfg.amp,
                               choice_temperature=settings["choice_temperature"], device=device, batch_size=n,
                               progress=False)
    else:
        shape = (s.kwargs["in_channels"], s.kwargs["input_size"], s.kwargs["input_size"])
        images = sample_images(model, s.diffusion, s.codec, n, cond, shape=shape, steps=settings["steps"],
                               sampler=settings["sampler"], eta=settings["eta"], seed=gcfg.seed, amp=gcfg.amp,
                               device=device, batch_size=n, progress=False, clip_x0=settings["clip_x0"])
    model.train(training)
    save_grid(images, path)
    if tracker is not None:  # the run's image view shows the grids over training, one per step
        tracker.log_image(path, "samples", step)


def token_setup(gcfg: GeneratorConfig, data_cfg: DataConfig, inputs: Inputs, condition: str,
                device: torch.device) -> Setup:
    """A MAGE of `gcfg.arch` on the ids of the tokenizer folder `gcfg.tokenizer`, with the reference
    MAGE's AdamW (betas 0.9, 0.95; weight decay off biases and 1-D parameters)."""
    if gcfg.vae:
        raise PipelineError(f"train_generator.vae: {gcfg.arch} generates the ids of train_generator.tokenizer, "
                            "not VAE latents; leave vae empty")
    codec = TokenCodec(gcfg.tokenizer).to(device)
    codec.latent_shape(data_cfg.channels, data_cfg.image_size)  # the tokenizer must fit the data
    kwargs = mage_kwargs(codec, MODEL_CONDITION[condition], inputs.rep_dim, inputs.num_classes(condition),
                         gcfg.rep_drop_prob)
    model = build_generator(gcfg.arch, **kwargs).to(device)
    opt = adamw(weight_decay_groups(model, gcfg.weight_decay), gcfg.lr, betas=(0.9, 0.95), device=device)
    return Setup(model, codec, None, None, kwargs, opt)


def setup(gcfg: GeneratorConfig, data_cfg: DataConfig, inputs: Inputs, condition: str, device: torch.device) -> Setup:
    """Build the generator of `gcfg.arch` for `condition` on `device` (weights drawn from torch's RNG)."""
    if arch_kind(gcfg.arch) == "tokens":
        return token_setup(gcfg, data_cfg, inputs, condition, device)
    codec = codec_for(gcfg.vae, gcfg.vae_scale or None).to(device)
    channels, size = codec.latent_shape(data_cfg.channels, data_cfg.image_size)
    kwargs = dict(input_size=size, in_channels=channels, condition=MODEL_CONDITION[condition], rep_dim=inputs.rep_dim,
                  num_classes=inputs.num_classes(condition), rep_drop_prob=gcfg.rep_drop_prob)
    model = build_generator(gcfg.arch, **kwargs).to(device)
    schedule = diffusion_meta(gcfg.beta_schedule, gcfg.timesteps, parameterization=gcfg.parameterization)
    opt = adamw(model.parameters(), gcfg.lr, betas=(0.9, 0.95), weight_decay=gcfg.weight_decay, device=device)
    return Setup(model, codec, Diffusion.from_meta(schedule), schedule, kwargs, opt)


def _data(gcfg: GeneratorConfig, data_cfg: DataConfig, s: Setup, conditions: Conditions, device: torch.device,
          ids: TokenIds | None = None) -> Any:
    """`data(start)` for the loop: horizontally flipped crops, their conditions, encoded by the codec
    (a MAGE's: the crops' token ids from `ids`)."""

    def prepare(batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["image"].to(device, non_blocking=True)
        flipped = (torch.rand(x.shape[0]) < 0.5) if gcfg.hflip else torch.zeros(x.shape[0], dtype=torch.bool)
        x = torch.where(flipped.to(device)[:, None, None, None], x.flip(-1), x)  # the augmented crop
        cond = conditions(batch, x, flipped)
        if ids is not None:
            return ids(batch, x, flipped), cond
        with torch.no_grad():
            return s.codec.encode(x), cond

    def data(start: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        # iter() now: the DataLoader draws its base seed before `fit` restores the RNG streams
        batches = iter(make_loader(data_cfg, "train", "train", gcfg.batch_size, seed=gcfg.seed, skip_batches=start))
        return (prepare(b) for b in batches)

    return data


def train_generator(gcfg: GeneratorConfig, data_cfg: DataConfig, inputs: Inputs, condition: str, resume_id: str,
                    info: DistInfo, tracker: Any = None) -> dict[str, Any]:
    """Train one generator (module docstring) and, on rank 0, write gcfg.out_dir/<condition>/ (EMA
    weights, generator.json with the sampler settings every later use reads, samples.png); returns
    what the metrics file reports. `resume_id` is what a checkpoint must match to be resumed."""
    device = info.device
    seed_everything(gcfg.seed, info.rank)
    s = setup(gcfg, data_cfg, inputs, condition, device)
    n_params = sum(p.numel() for p in s.model.parameters())
    log.info("generator %s (%s, %.2fM params) on %s, condition=%s", gcfg.arch, s.codec.meta()["type"],
             n_params / 1e6, device, condition)
    conditions = Conditions(gcfg, inputs, condition, device, verify=gcfg.verify_cache and info.is_main)
    ids = TokenIds(s.codec, gcfg.rep_source, gcfg.hflip, gcfg.verify_cache and info.is_main) \
        if isinstance(s.codec, TokenCodec) else None
    spec = LoopSpec(
        name=f"train_generator ({condition})", steps=gcfg.steps, lr=gcfg.lr, warmup_steps=gcfg.warmup_steps,
        decay=gcfg.lr_schedule, batch_size=gcfg.batch_size * info.world_size * gcfg.accum_steps,
        accum_steps=gcfg.accum_steps, grad_clip=gcfg.grad_clip, amp=gcfg.amp,
        ema_decay=gcfg.ema_decay, log_every=gcfg.log_every, ckpt_every=gcfg.ckpt_every,
        config_key="train_generator", checkpoint_dir=Path(gcfg.checkpoint_dir) / condition, fingerprint=resume_id,
    )
    out_dir = Path(gcfg.out_dir) / condition
    grid_cond = _grid_conditions(data_cfg, conditions, gcfg.grid_size) if info.is_main else {}

    def grid(step: int, ema: nn.Module | None) -> None:
        if gcfg.sample_every > 0 and step % gcfg.sample_every == 0 and step < gcfg.steps:
            _write_grid(s.model if ema is None else ema, s, grid_cond, gcfg, device, out_dir / "samples.png",
                        tracker, step)

    def loss(net: nn.Module, b: tuple[Tensor, dict[str, Tensor]], step: int) -> Tensor:
        if s.diffusion is None:  # MAGE: masked-token cross-entropy, the logits through `net` (DDP)
            return unwrap(net).loss(b[0], **b[1], forward=net)
        return s.diffusion.training_loss(net, b[0], b[1])

    extras = conditions.posterior.take_mean if conditions.posterior is not None else None
    trained = fit(spec, s.model, s.opt, loss, _data(gcfg, data_cfg, s, conditions, device, ids), info, tracker,
                  on_step=grid, extras=extras)
    record = condition_record(conditions)
    if info.is_main:
        final = (trained.ema if trained.ema is not None else trained.model).eval()
        meta = {"arch": gcfg.arch, "kwargs": s.kwargs, "condition": condition, "codec": s.codec.meta(),
                "diffusion": s.schedule, "classes": inputs.classes, "params": n_params,
                "step": trained.summary["steps"], "sampling": sampling_settings(gcfg, s.codec),
                "data": {"image_size": data_cfg.image_size, "channels": data_cfg.channels}, **record}
        if s.schedule is None:
            del meta["diffusion"]
        save_generator(out_dir, final, meta)
        if conditions.clusters is not None:  # what evaluate draws cluster ids from
            save_clusters(conditions.clusters, out_dir)
        _write_grid(final, s, grid_cond, gcfg, device, out_dir / "samples.png", tracker, trained.summary["steps"])
    source = {"token_ids": ids.source} if ids is not None else {}  # cache or tokenizer (TokenIds)
    return {"condition": condition, "arch": gcfg.arch, "params": n_params, **record, **source, **trained.summary}


def condition_record(conditions: Conditions) -> dict[str, Any]:
    """What generator.json and the metrics record say about a cluster or posterior condition: the
    clustering's k and purity; the posterior's settings and its mean information bound (nats, over
    the logged batches of this run; at most log(bank))."""
    out: dict[str, Any] = {}
    if conditions.clusters is not None:
        meta = conditions.clusters.meta
        out["clusters"] = {k: meta.get(k) for k in ("k", "k_rule", "iters", "purity", "mean_sq_distance")}
    post = conditions.posterior
    if post is not None:
        out["posterior"] = {"kind": "contrastive", "prior": "hypersphere", "temperature": post.temperature,
                            "bank": post.bank, "info_bound_max": math.log(post.bank), "info_bound": post.run_mean}
    return out
