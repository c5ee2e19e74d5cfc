"""`rcg train-generator`: the image generator (paper section 3.3) and its baselines (Table 9a).

One code path, three conditions, same architecture and budget:
- ``rep``: RCG. Each crop's representation conditions the generator; ``rep_drop_prob`` of them are
  swapped for the learned ``fake_latent`` inside the model, so guidance works at sampling time.
- ``none``: the unconditional baseline the paper beats.
- ``label``: a class embedding where the representation would go (with a null class for guidance).

The representation comes from the same augmented crop the generator sees: looked up in the encode
stage's cache (rcg.features.RepCache; exact for flip-only augmentation, checked against the encoder
on the first batch), or computed by the frozen encoder on every batch (``rep_source: encoder``, for
random crops). Training runs through the shared loop (rcg.training.fit).

Outputs: models/generator/<condition>/generator.{safetensors,json} (EMA weights) and samples.png,
checkpoints/train_generator/<condition>/checkpoint-last.pt, metrics/generator_<condition>.json.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.config import Config, GeneratorConfig
from rcg.data.loader import make_loader, read_manifest, shards_id
from rcg.diffusion import Diffusion, diffusion_meta
from rcg.features import RepCache
from rcg.generators import build_generator, save_generator
from rcg.generators.vae import Codec, codec_for
from rcg.io import PipelineError, file_digest, write_json
from rcg.sampling import sample_images, save_grid
from rcg.tracking import Tracker, stage_run
from rcg.training import DistInfo, LoopSpec, autocast, cleanup_distributed, fingerprint, fit, seed_everything, setup_distributed

log = logging.getLogger(__name__)

# Settings that do not change what is learned: kept out of the checkpoint fingerprint, so a run can
# be extended (more steps) or re-logged without starting over.
_RUN_ONLY = ("steps", "ckpt_every", "log_every", "sample_every", "sample_steps", "sample_eta", "sampler",
             "sample_clip_x0", "grid_size", "threads", "checkpoint_dir", "metrics_dir", "out_dir", "verify_cache")


def model_kwargs(cfg: Config, condition: str, codec: Codec, num_classes: int) -> dict[str, Any]:
    """Constructor kwargs of the generator (stored in generator.json to rebuild it)."""
    channels, size = codec.latent_shape(cfg.data.channels, cfg.data.image_size)
    return dict(input_size=size, in_channels=channels, condition=condition, rep_dim=cfg.encoder.rep_dim,
                num_classes=max(num_classes, 1), rep_drop_prob=cfg.train_generator.rep_drop_prob)


def resume_fingerprint(cfg: Config, condition: str) -> str:
    """What a checkpoint must match to be resumed: the settings that change what is learned, and the
    inputs (the shards; for `rep` also the encoder whose representations condition the model)."""
    run_cfg = dataclasses.replace(cfg.train_generator, **{k: getattr(GeneratorConfig(), k) for k in _RUN_ONLY})
    inputs = [shards_id(cfg.data.shards_dir)]
    if condition == "rep":
        inputs.append(file_digest(Path(cfg.encoder.out_dir) / "encoder.safetensors"))
    return fingerprint(run_cfg, cfg.data.image_size, cfg.data.channels, cfg.encoder.rep_dim, condition, inputs)


def sampling_settings(gcfg: GeneratorConfig, codec: Codec) -> dict[str, Any]:
    """How images are sampled from this generator (saved in generator.json; every later use reads it).
    The x0 clamp applies in pixel space only: VAE latents have no known range."""
    clip = float(gcfg.sample_clip_x0) if codec.meta()["type"] == "pixel" else 0.0
    return {"sampler": gcfg.sampler, "steps": gcfg.sample_steps, "eta": gcfg.sample_eta, "amp": gcfg.amp, "clip_x0": clip}


class Conditions:
    """The condition of each training crop (see the module docstring), and of the sample grids."""

    def __init__(self, cfg: Config, condition: str, device: torch.device, verify: bool) -> None:
        gcfg = cfg.train_generator
        self.condition, self.device, self.amp = condition, device, gcfg.amp
        self.cache = self.encoder = None
        if condition == "rep" and gcfg.rep_source == "cache":
            self.cache = RepCache(Path(cfg.encode.out_dir) / "train.parquet")
        if condition == "rep" and (gcfg.rep_source == "encoder" or verify):
            from rcg.encoders import load_encoder

            self.encoder = load_encoder(cfg.encoder.out_dir, device)
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


def _grid_conditions(cfg: Config, conditions: Conditions, n: int) -> dict[str, Tensor]:
    """The first `n` train images' conditions (unflipped), so every grid of a run shows the same ones."""
    if conditions.condition == "none" or n == 0:
        return {}
    batch = next(iter(make_loader(cfg.data, "train", "once", n, num_workers=0)))
    x = batch["image"].to(conditions.device)
    keep_verify, conditions.verify = conditions.verify, False
    cond = conditions(batch, x, torch.zeros(len(x), dtype=torch.bool))
    conditions.verify = keep_verify
    return cond


def _write_grid(model: nn.Module, diffusion: Diffusion, codec: Codec, cond: dict[str, Tensor], gcfg: GeneratorConfig,
                shape: tuple[int, int, int], device: torch.device, path: Path, tracker: Tracker, step: int) -> None:
    """A grid of EMA samples with fixed noise (for `rep`: real reps, i.e. oracle conditioning)."""
    n = gcfg.grid_size if not cond else min(gcfg.grid_size, next(iter(cond.values())).shape[0])
    settings = sampling_settings(gcfg, codec)
    images = sample_images(model, diffusion, codec, n, cond, shape=shape, steps=settings["steps"],
                           sampler=settings["sampler"], eta=settings["eta"], seed=gcfg.seed, amp=gcfg.amp,
                           device=device, batch_size=n, progress=False, clip_x0=settings["clip_x0"])
    save_grid(images, path)
    tracker.log_artifact(path, f"samples/step_{step:07d}")


def run(cfg: Config, condition: str = "rep", **options: Any) -> None:
    """Stage entry point (`rcg train-generator --condition rep|none|label`)."""
    info = setup_distributed()
    try:
        train(cfg, condition, info)
    finally:
        cleanup_distributed()


def train(cfg: Config, condition: str, info: DistInfo) -> Path:
    """Train one generator through the shared loop; returns its model directory."""
    gcfg, device = cfg.train_generator, info.device
    if condition not in ("rep", "none", "label"):
        raise PipelineError(f"--condition must be rep, none or label, got {condition!r}")
    if gcfg.threads > 0:
        torch.set_num_threads(gcfg.threads)
    seed_everything(gcfg.seed, info.rank)
    classes = list(read_manifest(cfg.data.shards_dir).get("classes", []))
    if condition == "label" and not classes:
        raise PipelineError(f"{cfg.data.shards_dir}/manifest.json: no classes, so the label baseline cannot train")
    codec = codec_for(gcfg.vae, gcfg.vae_scale or None).to(device)
    kwargs = model_kwargs(cfg, condition, codec, len(classes))
    model = build_generator(gcfg.arch, **kwargs).to(device)
    schedule = diffusion_meta(gcfg.beta_schedule, gcfg.timesteps, parameterization=gcfg.parameterization)
    diffusion = Diffusion.from_meta(schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=gcfg.lr, betas=(0.9, 0.95), weight_decay=gcfg.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("generator %s (%s, %.2fM params) on %s, condition=%s", gcfg.arch, codec.meta()["type"],
             n_params / 1e6, device, condition)
    conditions = Conditions(cfg, condition, device, verify=gcfg.verify_cache and info.is_main)
    spec = LoopSpec(
        name=f"train_generator ({condition})", steps=gcfg.steps, lr=gcfg.lr, warmup_steps=gcfg.warmup_steps,
        batch_size=gcfg.batch_size * info.world_size, grad_clip=gcfg.grad_clip, amp=gcfg.amp,
        ema_decay=gcfg.ema_decay, log_every=gcfg.log_every, ckpt_every=gcfg.ckpt_every,
        config_key="train_generator", checkpoint_dir=Path(gcfg.checkpoint_dir) / condition,
        fingerprint=resume_fingerprint(cfg, condition),
    )

    def prepare(batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["image"].to(device, non_blocking=True)
        flipped = (torch.rand(x.shape[0]) < 0.5) if gcfg.hflip else torch.zeros(x.shape[0], dtype=torch.bool)
        x = torch.where(flipped.to(device)[:, None, None, None], x.flip(-1), x)  # the augmented crop
        cond = conditions(batch, x, flipped)
        with torch.no_grad():
            return codec.encode(x), cond

    def data(start: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        # iter() now: the DataLoader draws its base seed before `fit` restores the RNG streams
        batches = iter(make_loader(cfg.data, "train", "train", gcfg.batch_size, seed=gcfg.seed, skip_batches=start))
        return (prepare(b) for b in batches)

    def loss(net: nn.Module, b: tuple[Tensor, dict[str, Tensor]], step: int) -> Tensor:
        return diffusion.training_loss(net, b[0], b[1])

    out_dir = Path(gcfg.out_dir) / condition
    shape = (kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    grid_cond = _grid_conditions(cfg, conditions, gcfg.grid_size) if info.is_main else {}
    with stage_run(cfg, "train_generator", rank=info.rank) as tracker:
        tracker.set_tags({"condition": condition, "arch": gcfg.arch})

        def grid(step: int, ema: nn.Module | None) -> None:
            if gcfg.sample_every > 0 and step % gcfg.sample_every == 0 and step < gcfg.steps:
                _write_grid(ema, diffusion, codec, grid_cond, gcfg, shape, device, out_dir / "samples.png", tracker, step)

        trained = fit(spec, model, opt, loss, data, info, tracker, on_step=grid)
        if info.is_main:
            meta = {"arch": gcfg.arch, "kwargs": kwargs, "condition": condition, "codec": codec.meta(),
                    "diffusion": schedule, "classes": classes, "params": n_params, "step": trained.summary["steps"],
                    "data": {"image_size": cfg.data.image_size, "channels": cfg.data.channels},
                    "sampling": sampling_settings(gcfg, codec)}
            save_generator(out_dir, trained.ema, meta)
            _write_grid(trained.ema, diffusion, codec, grid_cond, gcfg, shape, device, out_dir / "samples.png",
                        tracker, trained.summary["steps"])
            metrics = {"condition": condition, "arch": gcfg.arch, "params": n_params, **trained.summary}
            write_json(Path(gcfg.metrics_dir) / f"generator_{condition}.json", metrics)
            tracker.log_metrics({"train_seconds_total": metrics["train_seconds_total"]}, step=metrics["steps"])
            tracker.log_artifact(out_dir / "generator.json", "model")
            log.info("generator (%s) -> %s; %d steps in %.0fs (%s img/s)", condition, out_dir, metrics["steps"],
                     metrics["train_seconds_this_run"], metrics["images_per_s"])
    return out_dir
