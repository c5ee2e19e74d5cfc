"""`rcg encoder`: the frozen SSL encoder in models/encoder/ (REFERENCE.md section 1; issue 3).

With `encoder.checkpoint` set, an official MoCo v3 / DINO / iBOT / DeiT file is converted strictly
and verified. Without one, MoCo v3 pretrains the configured ViT on the train shards: resumable from
checkpoints/encoder/, and runnable under torchrun unchanged (DDP through rcg.training).

Either way the stage writes metrics/encoder.json with the kNN check of issue 3: weighted cosine
kNN (k = encoder.knn_k) of val representations against train representations, for the encoder,
for a randomly initialised encoder of the same architecture, and for raw pixels. Labels are used
only for that check.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rcg.config import Config, EncoderConfig
from rcg.data.loader import make_loader, read_manifest, shards_id
from rcg.encoders.augment import augment, two_view_recipes
from rcg.encoders.checkpoints import load_checkpoint
from rcg.encoders.knn import knn_top1
from rcg.encoders.moco import MoCoV3, init_patch_embed, lr_at, momentum_at
from rcg.encoders.vit import (
    ARCHS,
    EncoderSpec,
    RepEncoder,
    build_vit,
    load_encoder,
    preprocess,
    save_encoder,
    standardize,
)
from rcg.io import PipelineError, get_logger, write_json
from rcg.tracking import Tracker, stage_run
from rcg.training import (
    Checkpointer,
    DistInfo,
    autocast,
    cleanup_distributed,
    fingerprint,
    seed_everything,
    setup_distributed,
    unwrap,
    wrap_ddp,
)

log = get_logger(__name__)

# Encoder-block fields that do not change what pretraining computes (kept out of the resume fingerprint).
_NOT_TRAINING = {"checkpoint", "checkpoint_format", "knn_k", "knn_max_train", "ckpt_every",
                 "log_every", "out_dir", "checkpoint_dir", "metrics_file"}


def spec_from_config(ecfg: EncoderConfig, channels: int) -> EncoderSpec:
    """The encoder architecture the config describes (a named official size, or the size fields)."""
    if ecfg.arch:
        if ecfg.arch not in ARCHS:
            raise PipelineError(f"encoder.arch: unknown {ecfg.arch!r} (known: {', '.join(sorted(ARCHS))})")
        spec = ARCHS[ecfg.arch](ecfg.rep_dim)
        return spec
    if len(ecfg.mean) != channels or len(ecfg.std) != channels:
        raise PipelineError(
            f"encoder.mean/std: need {channels} values for data.channels={channels}, "
            f"got {ecfg.mean} / {ecfg.std}"
        )
    if ecfg.img_size % ecfg.patch_size:
        raise PipelineError(f"encoder.img_size {ecfg.img_size} is not a multiple of patch_size {ecfg.patch_size}")
    return EncoderSpec(
        img_size=ecfg.img_size, patch_size=ecfg.patch_size, in_chans=channels,
        embed_dim=ecfg.embed_dim, depth=ecfg.depth, num_heads=ecfg.num_heads, mlp_ratio=ecfg.mlp_ratio,
        head="mocov3", head_hidden_dim=ecfg.proj_hidden_dim, rep_dim=ecfg.rep_dim, pos_embed="sincos",
        mean=tuple(ecfg.mean), std=tuple(ecfg.std),
        stem="patch" if ecfg.checkpoint else ecfg.stem,  # every official format has a patch projection
    )


def training_block(ecfg: EncoderConfig) -> dict[str, Any]:
    """The encoder settings that change what MoCo pretraining computes."""
    return {k: v for k, v in asdict(ecfg).items() if k not in _NOT_TRAINING}


def training_fingerprint(cfg: Config) -> str:
    """Hash of everything that changes MoCo pretraining (settings and shards), so a stale checkpoint
    is never resumed."""
    return fingerprint(training_block(cfg.encoder), cfg.data.image_size, cfg.data.channels,
                       shards_id(cfg.data.shards_dir))


def pretrain(cfg: Config, info: DistInfo, tracker: Tracker) -> tuple[RepEncoder, dict[str, Any]]:
    """MoCo v3 on the train shards (resumable); returns the base encoder and training facts."""
    ecfg = cfg.encoder
    manifest = read_manifest(cfg.data.shards_dir)
    n_train = int(manifest["splits"]["train"]["written"])
    if ecfg.batch_size % info.world_size:
        raise PipelineError(f"encoder.batch_size {ecfg.batch_size} is not divisible by {info.world_size} ranks")
    sig = ecfg.blur_sigma
    if len(sig) != 2 or not 0 < sig[0] <= sig[1]:
        raise PipelineError(f"encoder.blur_sigma: expected [min, max] pixels with 0 < min <= max, got {sig}")
    per_rank = ecfg.batch_size // info.world_size
    total = max(1, round(ecfg.epochs * n_train / ecfg.batch_size))
    warmup = min(total, round(ecfg.warmup_epochs * n_train / ecfg.batch_size))
    base_lr = ecfg.lr * ecfg.batch_size / 256  # MoCo v3's linear scaling rule

    spec = spec_from_config(ecfg, cfg.data.channels)
    seed_everything(ecfg.seed, info.rank)
    vit = build_vit(spec)
    init_patch_embed(vit, freeze=ecfg.freeze_patch_embed)
    model = MoCoV3(vit, spec.rep_dim, ecfg.pred_hidden_dim, ecfg.temperature).to(info.device)
    if info.distributed and info.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # MoCo v3 syncs BN (GPU only)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=base_lr,
                            weight_decay=ecfg.weight_decay)
    ckpt = Checkpointer(ecfg.checkpoint_dir, training_fingerprint(cfg))
    step, loss_val = 0, float("nan")
    state = ckpt.load(map_location=info.device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, loss_val = int(state["step"]), float(state.get("last_loss", "nan"))
    ddp = wrap_ddp(model, info)
    log.info("MoCo v3 pretraining: %d steps of %d images (%.1f epochs of %d), lr %.2e, from step %d",
             total, ecfg.batch_size, ecfg.epochs, n_train, base_lr, step)

    view1, view2 = two_view_recipes(ecfg.crop_min_scale, ecfg.blur_prob, ecfg.solarize_prob, ecfg.jitter,
                                    blur_sigma=tuple(ecfg.blur_sigma))
    cpu0, start_step = time.process_time(), step
    ckpt.start_clock(training=step < total)
    if step < total:
        batches = iter(make_loader(cfg.data, "train", "train", per_rank, info=info, seed=ecfg.seed + step))
        ddp.train()
        bar = tqdm(total=total, initial=step, desc="moco v3", disable=not info.is_main, dynamic_ncols=True)
        while step < total:
            x = next(batches)["image"].to(info.device, non_blocking=True)
            v1 = preprocess(augment(x, spec.img_size, view1), spec)  # (B, C, S, S), normalised
            v2 = preprocess(augment(x, spec.img_size, view2), spec)
            lr, m = lr_at(step, total, warmup, base_lr), momentum_at(step, total, ecfg.momentum)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(info.device, ecfg.amp):
                loss = ddp(v1, v2, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % ecfg.log_every == 0 or step == total:
                loss_val = float(loss.detach())
                speed = (step - start_step) * ecfg.batch_size / ckpt.seconds_this_run
                bar.set_postfix(loss=f"{loss_val:.3f}", img_s=f"{speed:.0f}")
                tracker.log_metrics({"loss": loss_val, "lr": lr, "momentum": m, "images_per_s": speed}, step)
            if info.is_main and (step % ecfg.ckpt_every == 0 or step == total):
                ckpt.save({"model": unwrap(ddp).state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "last_loss": loss_val}, final=step == total)  # last logged loss, as train_rdm
        bar.close()
        del batches  # stop the loader workers before the evaluation
    seconds = ckpt.stop_clock()
    facts = {
        "steps": total,
        "epochs": ecfg.epochs,
        # Wall time of every run that trained this checkpoint (a resumed run counts the earlier ones).
        "train_seconds_total": round(ckpt.train_seconds, 2),
        "train_seconds_this_run": round(seconds, 2),
        # CPU seconds of this run's training process (all its threads, not the loader workers): on
        # a shared machine this, not the wall time, shows what the run costs.
        "train_cpu_seconds_this_run": round(time.process_time() - cpu0, 1),
        "images_per_s": round((step - start_step) * ecfg.batch_size / seconds, 1) if step > start_step else None,
        "final_loss": loss_val if loss_val == loss_val else None,
        "resumed_from_step": start_step,
    }
    # The base encoder, as in the official checkpoints. (DINO keeps its EMA teacher instead; here the
    # momentum encoder's rep kNN was 0.849 against the base encoder's 0.852 on the default run.)
    return RepEncoder(spec, unwrap(ddp).base_encoder.cpu()), facts


def _load_images(cfg: Config, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All images (uint8, exact for 8-bit sources) and labels of a split, or None if unusable."""
    try:
        # A capped sample comes from the shuffled stream (shards may be in class order); all
        # samples are read exactly once otherwise.
        loader = make_loader(cfg.data, split, "train" if limit else "once", batch_size=512)
        images, labels, n = [], [], 0
        for batch in loader:
            images.append((batch["image"] * 255).round().to(torch.uint8))
            labels.append(batch["label"])
            n += len(batch["label"])
            if limit and n >= limit:
                break
    except PipelineError as e:
        log.warning("kNN check skipped: %s", e)
        return None
    if not images:
        return None
    x, y = torch.cat(images), torch.cat(labels)
    if limit:
        x, y = x[:limit], y[:limit]
    if (y < 0).any():
        log.warning("kNN check skipped: the %s split has unlabelled samples", split)
        return None
    return x, y


@torch.inference_mode()
def _reps(encoder: RepEncoder, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised representations and CLS features of uint8 images, in one pass."""
    reps, cls = [], []
    for i in range(0, len(images), batch):
        h = encoder.features(images[i : i + batch].float() / 255)  # (B, D) CLS after the final norm
        cls.append(h)
        reps.append(standardize(encoder.vit.head(h)))  # (B, rep_dim), as RepEncoder.forward
    return torch.cat(reps), torch.cat(cls)


def knn_report(cfg: Config, encoder: RepEncoder) -> dict[str, Any]:
    """kNN top-1 of the encoder's representation, of a random init of it, and of raw pixels."""
    ecfg = cfg.encoder
    train = _load_images(cfg, "train", ecfg.knn_max_train)
    val = _load_images(cfg, "val", 0) if train is not None else None
    if train is None or val is None:
        return {"knn_top1": None, "knn_top1_random_init": None, "knn_top1_pixels": None}
    (xt, yt), (xv, yv) = train, val
    k = ecfg.knn_k
    log.info("kNN check (k=%d) on %d train / %d val images", k, len(xt), len(xv))
    out: dict[str, Any] = {"knn_k": k, "knn_train_samples": len(xt), "knn_val_samples": len(xv)}
    (rt, ct), (rv, cv) = _reps(encoder, xt), _reps(encoder, xv)
    out["knn_top1"] = knn_top1(rt, yt, rv, yv, k=k)
    out["knn_top1_cls"] = knn_top1(ct, yt, cv, yv, k=k)  # the backbone feature, before the projector
    torch.manual_seed(ecfg.seed)
    random_init = build_vit(encoder.spec)
    if encoder.spec.head == "mocov3":
        init_patch_embed(random_init, freeze=False)
    rnd = RepEncoder(encoder.spec, random_init)
    out["knn_top1_random_init"] = knn_top1(_reps(rnd, xt)[0], yt, _reps(rnd, xv)[0], yv, k=k)
    out["knn_top1_pixels"] = knn_top1(xt.float() / 255, yt, xv.float() / 255, yv, k=k)
    log.info("kNN top-1: encoder %.4f (CLS %.4f), random init %.4f, pixels %.4f", out["knn_top1"],
             out["knn_top1_cls"], out["knn_top1_random_init"], out["knn_top1_pixels"])
    return out


def _verify(encoder: RepEncoder, model_dir: str) -> None:
    """Reload what was written and check it reproduces the in-memory encoder."""
    back = load_encoder(model_dir)
    spec = encoder.spec
    probe = torch.rand(4, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = encoder(probe), back(probe)
    if not torch.isfinite(a).all():
        raise PipelineError(f"{model_dir}: encoder produces non-finite representations")
    if not torch.allclose(a, b, atol=1e-5):
        raise PipelineError(f"{model_dir}: reloaded encoder does not reproduce the saved one")


def run(cfg: Config, **options: Any) -> None:
    """Convert or pretrain the encoder, save it, verify it, and write the kNN metrics."""
    del options
    t0 = time.perf_counter()
    info = setup_distributed()
    ecfg = cfg.encoder
    with stage_run(cfg, "encoder", rank=info.rank) as tracker:
        try:
            if ecfg.checkpoint:
                spec = spec_from_config(ecfg, 3)
                encoder = load_checkpoint(ecfg.checkpoint, ecfg.checkpoint_format, spec)
                meta: dict[str, Any] = {"source": ecfg.checkpoint, "format": ecfg.checkpoint_format}
                facts: dict[str, Any] = {}
            else:
                encoder, facts = pretrain(cfg, info, tracker)
                # Only what defines the weights: timings and the kNN settings live in the metrics, so
                # a rerun that resumes at the end writes the same files and leaves `encode` current.
                meta = {"source": "mocov3-pretrain", "training_config": training_block(ecfg),
                        "steps": facts["steps"]}
        finally:
            # The kNN check runs on rank 0 alone, over all the data: leave the process group first.
            cleanup_distributed()
        if not info.is_main:
            return
        save_encoder(encoder, encoder.spec, ecfg.out_dir, extra=meta)
        _verify(encoder, ecfg.out_dir)
        log.info("encoder written to %s (%s)", ecfg.out_dir, meta["source"])
        metrics = knn_report(cfg, encoder)
        metrics.update(facts)
        metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)
        write_json(ecfg.metrics_file, metrics)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(Path(ecfg.out_dir) / "encoder.json")
        log.info("metrics written to %s", ecfg.metrics_file)
