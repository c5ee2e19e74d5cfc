"""`rcg evalnet`: train the domain classifier the evaluate stage uses as its feature extractor.

Without Inception weights the default pipeline scores images on the features of a small CNN trained
on the labelled train split (rcg.metrics.evalnet), through the shared loop: AdamW, warm-up then a
half cosine, resumable, runnable under torchrun. Writes models/evalnet/ and metrics/evalnet.json
(`test_accuracy` on the val split, per-class accuracy, wall time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from rcg.config import Config
from rcg.data.loader import make_loader, read_manifest, shards_id
from rcg.io import PipelineError, write_json
from rcg.metrics.evalnet import EvalNet, save_evalnet, val_accuracy
from rcg.tracking import stage_run
from rcg.training import LoopSpec, cleanup_distributed, fingerprint, fit, seed_everything, setup_distributed

log = logging.getLogger(__name__)


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
    seed_everything(ec.seed, info.rank)
    model = EvalNet(in_channels=cfg.data.channels, image_size=cfg.data.image_size, num_classes=len(classes),
                    width=ec.width, feature_dim=ec.feature_dim).to(info.device)
    opt = torch.optim.AdamW(model.parameters(), lr=ec.lr, weight_decay=ec.weight_decay)
    spec = LoopSpec(
        name="evalnet", steps=total, lr=ec.lr, warmup_steps=min(100, total // 10), decay="cosine", amp=False,
        batch_size=ec.batch_size * info.world_size, log_every=ec.log_every, ckpt_every=ec.ckpt_every,
        config_key="evalnet", checkpoint_dir=ec.checkpoint_dir,
        # The shards too, so a checkpoint is never resumed on re-sharded data.
        fingerprint=fingerprint(ec, cfg.data, len(classes), shards_id(cfg.data.shards_dir)),
    )

    def labelled(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch["label"] >= 0  # unlabelled samples cannot teach a classifier
        return batch["image"][keep].to(info.device), batch["label"][keep].to(info.device)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(make_loader(cfg.data, "train", "train", ec.batch_size, seed=ec.seed, skip_batches=start))
        return (labelled(b) for b in batches)

    def loss(net: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return F.cross_entropy(net(b[0]), b[1], label_smoothing=ec.label_smoothing)

    log.info("evalnet: %d params, %d steps of %d (%.2f epochs of %d images)",
             sum(p.numel() for p in model.parameters()), total, ec.batch_size, ec.epochs, n_train)
    try:
        with stage_run(cfg, "evalnet", info.rank) as tracker:
            trained = fit(spec, model, opt, loss, data, info, tracker)
            acc = val_accuracy(trained.model, cfg.data, classes, info.device)
            if info.is_main:
                weights = save_evalnet(trained.model.cpu(), ec.out_dir,
                                       extra={"classes": classes, "test_accuracy": acc["overall"]})
                result = {"test_accuracy": acc["overall"], "per_class_accuracy": acc["per_class"],
                          "epochs": ec.epochs, "params": sum(p.numel() for p in model.parameters()),
                          **trained.summary}
                write_json(ec.metrics_file, result)
                tracker.log_metrics({"test_accuracy": acc["overall"]}, step=total)
                tracker.log_artifact(ec.metrics_file)
                tracker.log_artifact(weights.with_suffix(".json"), "model")
                log.info("evalnet: test accuracy %.4f after %d steps; wrote %s and %s",
                         acc["overall"], total, weights, ec.metrics_file)
    finally:
        cleanup_distributed()
