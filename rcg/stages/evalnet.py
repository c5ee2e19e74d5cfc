"""`rcg evalnet`: train the domain classifier that the evaluate stage uses as a feature extractor.

Reads the labelled train shards, trains `rcg.metrics.evalnet.EvalNet` with AdamW and a cosine
schedule (resumable; runs under torchrun unchanged), measures its accuracy on the val split, and
writes models/evalnet/ and metrics/evalnet.json (`test_accuracy`, per-class accuracy, wall time).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from rcg.config import Config
from rcg.data.loader import make_loader, read_manifest, shards_id
from rcg.io import PipelineError, get_logger, write_json
from rcg.metrics.evalnet import EvalNet, class_accuracy, save_evalnet
from rcg.tracking import stage_run
from rcg.training import (
    Checkpointer,
    cleanup_distributed,
    fingerprint,
    seed_everything,
    setup_distributed,
    unwrap,
    wrap_ddp,
)

log = get_logger(__name__)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then half-cosine to zero (per optimiser step)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate_accuracy(
    model: EvalNet, cfg: Config, classes: list[str], device: torch.device
) -> dict[str, float | dict[str, float]]:
    """Top-1 accuracy on every val sample (split across ranks, counts summed)."""
    model.eval()
    preds, targets = [], []
    for batch in make_loader(cfg.data, "val", "once", batch_size=500):
        keep = batch["label"] >= 0
        if keep.any():
            preds.append(model(batch["image"][keep].to(device)).argmax(1).cpu())
            targets.append(batch["label"][keep])
    p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if dist.is_initialized():  # gather per-class hit/total counts from every rank
        n = len(classes)
        counts = torch.zeros(2, n, dtype=torch.float64)
        counts[0].index_add_(0, t, (p == t).double())
        counts[1].index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        dist.all_reduce(counts)
        per_class = {c: float(counts[0, i] / counts[1, i]) for i, c in enumerate(classes) if counts[1, i]}
        return {"overall": float(counts[0].sum() / counts[1].sum()), "per_class": per_class}
    if len(t) == 0:
        raise PipelineError(f"{cfg.data.shards_dir}/val: no labelled val samples to test the classifier on")
    return class_accuracy(p, t, classes)


def run(cfg: Config, **options: object) -> None:
    """Train the evaluation classifier and write models/evalnet/ + metrics/evalnet.json."""
    ec = cfg.evalnet
    info = setup_distributed()
    manifest = read_manifest(cfg.data.shards_dir)
    classes = list(manifest.get("classes") or [])
    if not classes:
        raise PipelineError(
            f"{cfg.data.shards_dir}/manifest.json: the shards have no class labels, so no evaluation "
            "classifier can be trained; set evaluate.extractor: inception (with Inception weights)"
        )
    n_train = int(manifest["splits"]["train"]["written"])
    total = max(1, math.ceil(ec.epochs * n_train / (ec.batch_size * info.world_size)))
    warmup = min(100, total // 10)
    seed_everything(ec.seed, info.rank)
    model = EvalNet(
        in_channels=cfg.data.channels,
        image_size=cfg.data.image_size,
        num_classes=len(classes),
        width=ec.width,
        feature_dim=ec.feature_dim,
    ).to(info.device)
    ddp = wrap_ddp(model, info)
    opt = torch.optim.AdamW(model.parameters(), lr=ec.lr, weight_decay=ec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
    # The shards too, so a checkpoint is never resumed on re-sharded data.
    ckpt = Checkpointer(ec.checkpoint_dir, fingerprint(ec, cfg.data, len(classes), shards_id(cfg.data.shards_dir)))
    step = 0
    state = ckpt.load(info.device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
    n_params = sum(p.numel() for p in model.parameters())
    log.info("evalnet: %d params, %d steps of %d (%.2f epochs of %d images)",
             n_params, total, ec.batch_size, ec.epochs, n_train)

    ckpt.start_clock(training=step < total)
    with stage_run(cfg, "evalnet", info.rank) as tracker:
        loader = make_loader(cfg.data, "train", "train", ec.batch_size, info=info, seed=ec.seed + step)
        bar = tqdm(total=total, initial=step, desc="evalnet", disable=not info.is_main or step >= total)
        ddp.train()
        for batch in loader:
            if step >= total:
                break
            keep = batch["label"] >= 0  # unlabelled samples cannot teach a classifier
            x, y = batch["image"][keep].to(info.device), batch["label"][keep].to(info.device)
            loss = F.cross_entropy(ddp(x), y, label_smoothing=ec.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 50 == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                tracker.log_metrics({"train_loss": loss.item(), "lr": sched.get_last_lr()[0]}, step=step)
            if info.is_main and (step % ec.ckpt_every == 0 or step == total):
                ckpt.save({"model": unwrap(ddp).state_dict(), "opt": opt.state_dict(),
                           "sched": sched.state_dict(), "step": step}, final=step == total)
        bar.close()
        ckpt.stop_clock()
        train_seconds = ckpt.train_seconds  # every run that trained this checkpoint, as the other stages

        acc = evaluate_accuracy(unwrap(ddp), cfg, classes, info.device)
        if info.is_main:
            result = {
                "test_accuracy": acc["overall"],
                "per_class_accuracy": acc["per_class"],
                "train_steps": total,
                "epochs": ec.epochs,
                "params": n_params,
                "train_seconds": round(train_seconds, 1),
            }
            weights = save_evalnet(
                unwrap(ddp).cpu(), ec.out_dir, extra={"classes": classes, "test_accuracy": acc["overall"]}
            )
            write_json(ec.metrics_file, result)
            tracker.log_metrics({"test_accuracy": acc["overall"]}, step=total)
            tracker.log_artifact(ec.metrics_file)
            tracker.log_artifact(weights.with_suffix(".json"), "model")
            log.info("evalnet: test accuracy %.4f after %d steps (%.0f s); wrote %s and %s",
                     acc["overall"], total, train_seconds, weights, ec.metrics_file)
    cleanup_distributed()
