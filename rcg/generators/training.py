"""Training the representation-conditioned image generator and its baselines (paper section 3.3).

One recipe, three conditions (Table 9a: same architecture and budget): `rep` (RCG: each crop's
representation conditions the generator, `rep_drop_prob` of them swapped for the learned
`fake_latent` so guidance works), `none` (the unconditional baseline) and `label` (a class embedding
in the representation's place). The representation comes from the same augmented crop the generator
sees: from the encode stage's cache (exact for flip-only augmentation, checked against the encoder
on the first batch), or from the frozen encoder on every batch (`rep_source: encoder`, for random
crops). AdamW (betas 0.9, 0.95), warm-up then constant lr, gradient clipping, EMA, bf16 autocast,
through the shared loop (rcg.training.fit).

A MAGE arch (paper section 3.3, the paper's main generator) trains through the same loop and the
same conditions on the ids of the frozen tokenizer in `train_generator.tokenizer`
(rcg.generators.tokens): its loss is MAGE's masked-token cross-entropy, and its recipe (cosine
lr, weight decay off biases and norms, no EMA) comes from the config (the imagenet256_mage_*
presets); without EMA the trained weights are the ones written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.config import DataConfig, GeneratorConfig
from rcg.data.loader import make_loader
from rcg.diffusion import Diffusion, diffusion_meta
from rcg.features import RepCache
from rcg.generators import arch_kind, build_generator, save_generator
from rcg.generators.tokens import TokenCodec, mage_kwargs, weight_decay_groups
from rcg.generators.vae import Codec, codec_for
from rcg.io import PipelineError
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


@dataclass
class Inputs:
    """Where a generator's training inputs are, besides the shards (data.shards_dir)."""

    features: str | Path  # the encode stage's train.parquet (the rep cache)
    encoder_dir: str | Path  # the frozen encoder (rep_source encoder, and the cache check)
    classes: list[str]  # class names of the shards (the label baseline's embedding table)
    rep_dim: int  # the encoder's representation size


class Conditions:
    """The condition of each training crop (see the module docstring), and of the sample grids."""

    def __init__(self, gcfg: GeneratorConfig, inputs: Inputs, condition: str, device: torch.device,
                 verify: bool) -> None:
        self.condition, self.device, self.amp = condition, device, gcfg.amp
        self.cache = self.encoder = None
        if condition == "rep" and gcfg.rep_source == "cache":
            self.cache = RepCache(inputs.features)
        if condition == "rep" and (gcfg.rep_source == "encoder" or verify):
            from rcg.encoders import load_encoder

            self.encoder = load_encoder(inputs.encoder_dir, device)
        self.verify = condition == "rep" and verify and self.cache is not None

    def __call__(self, batch: dict[str, Any], x: Tensor, flipped: Tensor) -> dict[str, Tensor]:
        if self.condition == "label":
            return {"label": batch["label"].to(self.device)}
        if self.condition != "rep":
            return {}
        if self.cache is not None:
            rep = self.cache.lookup(batch["key"], flipped).to(self.device)
            if self.verify:  # once, on the first batch
                err = self.cache.verify(rep, self.encoder, x)
                log.info("cached reps match the encoder on the first batch (max abs diff %.2g)", err)
                self.verify = False
            return {"rep": rep}
        with torch.no_grad(), autocast(self.device, self.amp):
            return {"rep": self.encoder(x).float()}


def _grid_conditions(data_cfg: DataConfig, conditions: Conditions, n: int) -> dict[str, Tensor]:
    """The first `n` train images' conditions (unflipped), so every grid of a run shows the same ones."""
    if conditions.condition == "none" or n == 0:
        return {}
    batch = next(iter(make_loader(data_cfg, "train", "once", n, num_workers=0)))
    x = batch["image"].to(conditions.device)
    keep_verify, conditions.verify = conditions.verify, False
    cond = conditions(batch, x, torch.zeros(len(x), dtype=torch.bool))
    conditions.verify = keep_verify
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
    kwargs = mage_kwargs(codec, condition, inputs.rep_dim, max(len(inputs.classes), 1), gcfg.rep_drop_prob)
    model = build_generator(gcfg.arch, **kwargs).to(device)
    opt = adamw(weight_decay_groups(model, gcfg.weight_decay), gcfg.lr, betas=(0.9, 0.95), device=device)
    return Setup(model, codec, None, None, kwargs, opt)


def setup(gcfg: GeneratorConfig, data_cfg: DataConfig, inputs: Inputs, condition: str, device: torch.device) -> Setup:
    """Build the generator of `gcfg.arch` for `condition` on `device` (weights drawn from torch's RNG)."""
    if arch_kind(gcfg.arch) == "tokens":
        return token_setup(gcfg, data_cfg, inputs, condition, device)
    codec = codec_for(gcfg.vae, gcfg.vae_scale or None).to(device)
    channels, size = codec.latent_shape(data_cfg.channels, data_cfg.image_size)
    kwargs = dict(input_size=size, in_channels=channels, condition=condition, rep_dim=inputs.rep_dim,
                  num_classes=max(len(inputs.classes), 1), rep_drop_prob=gcfg.rep_drop_prob)
    model = build_generator(gcfg.arch, **kwargs).to(device)
    schedule = diffusion_meta(gcfg.beta_schedule, gcfg.timesteps, parameterization=gcfg.parameterization)
    opt = adamw(model.parameters(), gcfg.lr, betas=(0.9, 0.95), weight_decay=gcfg.weight_decay, device=device)
    return Setup(model, codec, Diffusion.from_meta(schedule), schedule, kwargs, opt)


def _data(gcfg: GeneratorConfig, data_cfg: DataConfig, s: Setup, conditions: Conditions, device: torch.device) -> Any:
    """`data(start)` for the loop: horizontally flipped crops, their conditions, encoded by the codec."""

    def prepare(batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["image"].to(device, non_blocking=True)
        flipped = (torch.rand(x.shape[0]) < 0.5) if gcfg.hflip else torch.zeros(x.shape[0], dtype=torch.bool)
        x = torch.where(flipped.to(device)[:, None, None, None], x.flip(-1), x)  # the augmented crop
        cond = conditions(batch, x, flipped)
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

    trained = fit(spec, s.model, s.opt, loss, _data(gcfg, data_cfg, s, conditions, device), info, tracker, on_step=grid)
    if info.is_main:
        final = (trained.ema if trained.ema is not None else trained.model).eval()
        meta = {"arch": gcfg.arch, "kwargs": s.kwargs, "condition": condition, "codec": s.codec.meta(),
                "diffusion": s.schedule, "classes": inputs.classes, "params": n_params,
                "step": trained.summary["steps"], "sampling": sampling_settings(gcfg, s.codec),
                "data": {"image_size": data_cfg.image_size, "channels": data_cfg.channels}}
        if s.schedule is None:
            del meta["diffusion"]
        save_generator(out_dir, final, meta)
        _write_grid(final, s, grid_cond, gcfg, device, out_dir / "samples.png", tracker, trained.summary["steps"])
    return {"condition": condition, "arch": gcfg.arch, "params": n_params, **trained.summary}
