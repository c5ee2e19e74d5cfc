"""`rcg train-generator`: train the image generator on the shards (DESIGN.md step 3; REFERENCE.md 3.2).

One code path, three conditions (paper Table 9a, same architecture and budget):
- ``rep``: RCG. Each crop's representation conditions the generator; ``rep_drop_prob`` of them are
  swapped for the learned ``fake_latent`` inside the model so guidance works at sampling time.
- ``none``: the unconditional baseline the paper beats.
- ``label``: a class embedding where the representation would go (with a null class for guidance).

The representation comes from the same augmented crop the generator sees. With ``rep_source:
cache`` (the default) it is looked up in the encode stage's Parquet cache by (key, orig|flip): exact
when the only augmentation is the horizontal flip, since the cache holds both views of the same
decoded image; the first batch is checked against the encoder once. ``rep_source: encoder`` runs the
frozen encoder on every batch (random crops, ImageNet). benchmarks/bench_dit.py measures both.

AdamW, linear warm-up then constant lr, gradient clipping, EMA, bf16 autocast, a resumable checkpoint
every ``ckpt_every`` steps (raising ``steps`` continues a finished run), MLflow step metrics and a
sample grid every ``sample_every`` steps. Runs unchanged under torchrun (DDP).

Outputs: models/generator/<condition>/generator.{safetensors,json} (EMA weights) and samples.png
(a grid of EMA samples; for `rep` conditioned on real reps), checkpoints/train_generator/<condition>/
checkpoint-last.pt, metrics/generator_<condition>.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.config import Config, GeneratorConfig
from rcg.diffusion import Diffusion
from rcg.generators import build_generator, make_diffusion, save_generator
from rcg.generators.vae import Codec, codec_for
from rcg.io import PipelineError, file_digest, get_logger, write_json
from rcg.tracking import Tracker, stage_run
from rcg.training import (
    EMA,
    Checkpointer,
    DistInfo,
    autocast,
    cleanup_distributed,
    fingerprint,
    lr_factor,
    seed_everything,
    setup_distributed,
    unwrap,
    wrap_ddp,
)

log = get_logger(__name__)

# Settings that do not change what is learned: excluded from the checkpoint fingerprint, so a run
# can be extended (more steps) or re-logged without starting over.
_RUN_ONLY = ("steps", "ckpt_every", "log_every", "sample_every", "sample_steps", "sample_eta", "sampler", "sample_clip_x0",
             "grid_size", "threads", "checkpoint_dir", "metrics_dir", "out_dir",
             "verify_cache")


# --------------------------------------------------------------------------------------------------
# Representations of the training crops
# --------------------------------------------------------------------------------------------------


class RepCache:
    """The encode stage's reps indexed by (key, view): view 1 = the horizontally flipped image."""

    def __init__(self, path: str | Path) -> None:
        from rcg.features import read_features

        feats = read_features(path)
        self.index: dict[tuple[str, int], int] = {}
        for i, (k, v) in enumerate(zip(feats.keys, feats.views)):
            self.index[(k, 1 if v == "flip" else 0)] = i
        self.reps = feats.reps
        self.path = Path(path)

    def lookup(self, keys: list[str], flipped: Tensor) -> Tensor:
        try:
            rows = [self.index[(k, int(f))] for k, f in zip(keys, flipped.tolist())]
        except KeyError as e:
            raise PipelineError(f"{self.path}: no cached rep for sample {e.args[0]} (rerun `rcg encode`)") from None
        return self.reps[torch.as_tensor(rows)]


def verify_cache(cache_reps: Tensor, encoder: nn.Module, images: Tensor, path: Path) -> float:
    """Max |cached - encoder(crop)| on one batch; a stale or inexact cache is an error."""
    with torch.no_grad():
        fresh = encoder(images).float()
    err = float((fresh - cache_reps.to(fresh.device)).abs().max())
    # Reps are standardised (unit std); 0.05 allows for bf16 autocast in the encode stage.
    if err > 0.05:
        raise PipelineError(
            f"{path}: cached representations differ from the encoder's by up to {err:.3f}; the cache is "
            "stale or the augmentation is not flip-only. Rerun `rcg encode` or set train_generator.rep_source=encoder"
        )
    return err


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def model_kwargs(cfg: Config, condition: str, codec: Codec, num_classes: int) -> dict[str, Any]:
    """Constructor kwargs of the generator (stored in generator.json to rebuild it)."""
    channels, size = codec.latent_shape(cfg.data.channels, cfg.data.image_size)
    return dict(
        input_size=size,
        in_channels=channels,
        condition=condition,
        rep_dim=cfg.encoder.rep_dim,
        num_classes=max(num_classes, 1),
        rep_drop_prob=cfg.train_generator.rep_drop_prob,
    )


def train_step(
    model: nn.Module,
    diffusion: Diffusion,
    opt: torch.optim.Optimizer,
    z: Tensor,
    cond: dict[str, Tensor],
    gcfg: GeneratorConfig,
    device: torch.device,
) -> float:
    """One optimiser step of the diffusion loss; returns the loss."""
    with autocast(device, gcfg.amp):
        loss = diffusion.training_loss(model, z, cond)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if gcfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), gcfg.grad_clip)
    opt.step()
    return float(loss.detach())


def clip_x0(gcfg: GeneratorConfig, codec: Codec) -> float:
    """The x0 clamp used at sampling time: train_generator.sample_clip_x0 in pixel space, else 0 (off)."""
    return float(gcfg.sample_clip_x0) if codec.meta()["type"] == "pixel" else 0.0


@torch.no_grad()
def sample_grid(
    model: nn.Module, diffusion: Diffusion, codec: Codec, cond: dict[str, Tensor], n: int,
    gcfg: GeneratorConfig, shape: tuple[int, int, int], device: torch.device,
) -> Tensor:
    """n images in [0, 1] from `model` with fixed noise (seed), for progress grids."""
    from rcg.sampling import sample_images

    return sample_images(model, diffusion, codec, n, cond, shape=shape, steps=gcfg.sample_steps,
                         sampler=gcfg.sampler, eta=gcfg.sample_eta, seed=gcfg.seed, amp=gcfg.amp,
                         device=device, batch_size=n, progress=False, clip_x0=clip_x0(gcfg, codec))


def run(cfg: Config, condition: str = "rep", **options: Any) -> None:
    """Stage entry point (`rcg train-generator --condition rep|none|label`)."""
    if options:
        log.debug("ignoring options %s", options)
    info = setup_distributed()
    try:
        train(cfg, condition, info)
    finally:
        cleanup_distributed()


def resume_fingerprint(cfg: Config, condition: str) -> str:
    """What a checkpoint must match to be resumed: the settings that change what is learned, and the
    inputs (the shards; for `rep` also the encoder whose representations condition the model), so a
    run never continues on re-sharded data or on an old encoder's representations."""
    from rcg.data.loader import shards_id

    run_cfg = dataclasses.replace(cfg.train_generator, **{k: getattr(GeneratorConfig(), k) for k in _RUN_ONLY})
    inputs = [shards_id(cfg.data.shards_dir)]
    if condition == "rep":
        inputs.append(file_digest(Path(cfg.encoder.out_dir) / "encoder.safetensors"))
    return fingerprint(run_cfg, cfg.data.image_size, cfg.data.channels, cfg.encoder.rep_dim, condition, inputs)


def train(cfg: Config, condition: str, info: DistInfo) -> Path:
    """Train one generator; returns its model directory."""
    from rcg.data.loader import make_loader, read_manifest

    gcfg = cfg.train_generator
    if condition not in ("rep", "none", "label"):
        raise PipelineError(f"--condition must be rep, none or label, got {condition!r}")
    if gcfg.threads > 0:
        torch.set_num_threads(gcfg.threads)
    seed_everything(gcfg.seed, info.rank)
    device = info.device
    classes = list(read_manifest(cfg.data.shards_dir).get("classes", []))
    if condition == "label" and not classes:
        raise PipelineError(f"{cfg.data.shards_dir}/manifest.json: no classes, so the label baseline cannot train")

    codec = codec_for(gcfg.vae, gcfg.vae_scale or None).to(device)
    kwargs = model_kwargs(cfg, condition, codec, len(classes))
    model = build_generator(gcfg.arch, **kwargs).to(device)
    diffusion_meta = {"timesteps": gcfg.timesteps, "beta_schedule": gcfg.beta_schedule,
                      "parameterization": gcfg.parameterization}
    diffusion = make_diffusion(diffusion_meta)
    ema = EMA(model, gcfg.ema_decay, warmup=True)  # warm-up: short CPU runs would keep the init otherwise
    opt = torch.optim.AdamW(model.parameters(), lr=gcfg.lr, betas=(0.9, 0.95), weight_decay=gcfg.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("generator %s (%s, %.2fM params) on %s, condition=%s", gcfg.arch, codec.meta()["type"],
             n_params / 1e6, device, condition)

    ckpt = Checkpointer(Path(gcfg.checkpoint_dir) / condition, resume_fingerprint(cfg, condition))
    step, resumed_from, last_loss = 0, None, None
    state = ckpt.load()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = resumed_from = int(state["step"])
        last_loss = state.get("last_loss")  # None in checkpoints written before it was saved
    ddp = wrap_ddp(model, info)

    cache = encoder = None
    if condition == "rep":
        if gcfg.rep_source == "cache":
            cache = RepCache(Path(cfg.encode.out_dir) / "train.parquet")
        if gcfg.rep_source == "encoder" or (gcfg.verify_cache and step == 0 and info.is_main):
            from rcg.encoders import load_encoder

            encoder = load_encoder(cfg.encoder.out_dir, device)

    shape = (kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    out_dir = Path(gcfg.out_dir) / condition
    plot_path = out_dir / "samples.png"
    grid_cond: dict[str, Tensor] = {}
    loader = iter(make_loader(cfg.data, "train", "train", gcfg.batch_size, info=info, seed=gcfg.seed + step))

    with stage_run(cfg, "train_generator", rank=info.rank) as tracker:
        tracker.set_tags({"condition": condition, "arch": gcfg.arch})
        losses: list[float] = []
        images_seen, cpu_start = 0, time.process_time()
        ckpt.start_clock(training=step < gcfg.steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=gcfg.steps, initial=step, desc=f"train generator ({condition})", disable=not info.is_main)
        # A run resumed at its last step still draws one batch: the final grid needs its conditions.
        while step < gcfg.steps or (info.is_main and condition != "none" and not grid_cond):
            batch = next(loader)
            x = batch["image"].to(device, non_blocking=True)
            flipped = (torch.rand(x.shape[0]) < 0.5) if gcfg.hflip else torch.zeros(x.shape[0], dtype=torch.bool)
            x = torch.where(flipped.to(device)[:, None, None, None], x.flip(-1), x)  # the augmented crop
            cond: dict[str, Tensor] = {}
            if condition == "rep":
                if cache is not None:
                    cond["rep"] = cache.lookup(batch["key"], flipped).to(device)
                    if encoder is not None and gcfg.rep_source == "cache":
                        err = verify_cache(cond["rep"], encoder, x, cache.path)
                        log.info("cached reps match the encoder on the first batch (max abs diff %.2g)", err)
                        encoder = None  # checked once; free it
                else:
                    with torch.no_grad(), autocast(device, gcfg.amp):
                        cond["rep"] = encoder(x).float()
            elif condition == "label":
                cond["label"] = batch["label"].to(device)
            if not grid_cond and condition != "none":
                grid_cond = {k: v[: gcfg.grid_size].clone() for k, v in cond.items()}
                if step >= gcfg.steps:
                    break
            with torch.no_grad():
                z = codec.encode(x)
            for group in opt.param_groups:
                group["lr"] = gcfg.lr * lr_factor(step, gcfg.steps, warmup_steps=gcfg.warmup_steps)
            loss = train_step(ddp, diffusion, opt, z, cond, gcfg, device)
            if not math.isfinite(loss):
                raise PipelineError(f"train_generator ({condition}): loss became {loss} at step {step}; lower train_generator.lr")
            ema.update(model)
            step += 1
            losses.append(loss)
            images_seen += x.shape[0] * info.world_size
            bar.update(1)
            last_loss = sum(losses[-gcfg.log_every:]) / len(losses[-gcfg.log_every:])
            if step % gcfg.log_every == 0 or step == gcfg.steps:
                rate = images_seen / max(ckpt.seconds_this_run, 1e-9)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.0f}")
                tracker.log_metrics({"loss": last_loss, "images_per_s": rate, "lr": opt.param_groups[0]["lr"]},
                                    step=step)
            if info.is_main and (step % gcfg.ckpt_every == 0 or step == gcfg.steps):
                # last_loss: so that a run resumed at the end still reports the final loss
                ckpt.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                           "step": step, "last_loss": last_loss}, final=step == gcfg.steps)
            if info.is_main and gcfg.sample_every > 0 and step % gcfg.sample_every == 0 and step < gcfg.steps:
                _write_grid(ema.model, diffusion, codec, grid_cond, gcfg, shape, device, plot_path, tracker, step)
        bar.close()
        train_seconds = ckpt.stop_clock()
        # CPU seconds of this process (all its threads; loader workers excluded): the budget that
        # compares runs on a shared machine, where wall time depends on the neighbours.
        train_cpu_seconds = time.process_time() - cpu_start
        if info.is_main:
            meta = {
                "arch": gcfg.arch,
                "kwargs": kwargs,
                "condition": condition,
                "codec": codec.meta(),
                "diffusion": diffusion_meta,
                "data": {"image_size": cfg.data.image_size, "channels": cfg.data.channels},
                "classes": classes,
                "sampling": {"sampler": gcfg.sampler, "steps": gcfg.sample_steps, "eta": gcfg.sample_eta,
                             "amp": gcfg.amp, "clip_x0": clip_x0(gcfg, codec)},
                "params": n_params,
                "step": step,
            }
            save_generator(out_dir, ema.model, meta)
            _write_grid(ema.model, diffusion, codec, grid_cond, gcfg, shape, device, plot_path, tracker, step)
            metrics = {
                "condition": condition,
                "arch": gcfg.arch,
                "params": n_params,
                "steps": step,
                "resumed_from": resumed_from,
                "final_loss": last_loss,  # mean of the last log_every steps; from the checkpoint if none ran
                "train_seconds_this_run": round(train_seconds, 1),
                "train_seconds_total": round(ckpt.train_seconds, 1),
                "train_cpu_seconds_this_run": round(train_cpu_seconds, 1),
                "images_per_s": round(images_seen / train_seconds, 1) if images_seen else None,
            }
            write_json(Path(gcfg.metrics_dir) / f"generator_{condition}.json", metrics)
            tracker.log_metrics({"train_seconds_total": metrics["train_seconds_total"]}, step=step)
            tracker.log_artifact(out_dir / "generator.json", "model")
            log.info("generator (%s) -> %s; %d steps in %.0fs (%s img/s); grid in %s", condition, out_dir,
                     step, train_seconds, metrics["images_per_s"], plot_path)
    return out_dir


def _write_grid(model: nn.Module, diffusion: Diffusion, codec: Codec, cond: dict[str, Tensor], gcfg: GeneratorConfig,
                shape: tuple[int, int, int], device: torch.device, path: Path, tracker: Tracker, step: int) -> None:
    """A grid of EMA samples (for `rep`: the first batch's real reps, i.e. oracle conditioning)."""
    from rcg.sampling import save_grid

    n = gcfg.grid_size if not cond else min(gcfg.grid_size, next(iter(cond.values())).shape[0])
    images = sample_grid(model, diffusion, codec, cond, n, gcfg, shape, device)
    save_grid(images, path)
    tracker.log_artifact(path, f"samples/step_{step:07d}")
