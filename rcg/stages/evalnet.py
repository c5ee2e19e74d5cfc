"""`rcg evalnet`: train the network whose features the evaluate stage scores images with.

Without Inception weights the pipeline trains its own extractor on the train split
(rcg.metrics.evalnet): a small CNN classifier when the shards carry labels, the same CNN trained
self-supervised (SimCLR) when they do not. Writes models/evalnet/, metrics/details/evalnet.json (for
the classifier: `test_accuracy` on the val split and per class; for both: the training summary),
its headline in metrics/evalnet.json (rcg.metrics.headline) and the training curve
metrics/curves/evalnet.tsv.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rcg.config import Config
from rcg.data.loader import read_manifest, shards_id
from rcg.io import atomic_dir
from rcg.metrics import headline
from rcg.metrics.evalnet import save_evalnet, train_contrastive, train_evalnet, val_accuracy
from rcg.metrics.plots import CurveTracker
from rcg.tracking import stage_run
from rcg.training import cleanup_distributed, fingerprint, setup_distributed

log = logging.getLogger(__name__)

NO_LABELS = "the shards carry no class labels: the network is trained without them (SimCLR), so it has no accuracy"


def run(cfg: Config, **options: object) -> None:
    """Train the evaluation network and write models/evalnet/ and its metrics files."""
    ec = cfg.evalnet
    manifest = read_manifest(cfg.data.shards_dir)
    classes = list(manifest.get("classes") or [])
    n_train = int(manifest["splits"]["train"]["written"])
    # The shards too, so a checkpoint is never resumed on re-sharded data. Where the record and the
    # curve go does not change what is learned (and leaving them out keeps older checkpoints resumable).
    settings = {k: v for k, v in asdict(ec).items() if k not in ("details_file", "curves_file")}
    # data.decode_device came later: left out at its default so older checkpoints still resume.
    data = {k: v for k, v in asdict(cfg.data).items() if not (k == "decode_device" and v == "cpu")}
    resume_id = fingerprint(settings, data, len(classes), shards_id(cfg.data.shards_dir))
    info = setup_distributed(cfg.dist.tf32, cfg.dist.compile)
    try:
        with stage_run(cfg, "evalnet", info.rank, resume_key=resume_id) as tracker:
            curve = CurveTracker(tracker, ec.curves_file)
            if classes:
                net, summary = train_evalnet(ec, cfg.data, len(classes), n_train, resume_id, info, curve)
                acc = val_accuracy(net, cfg.data, classes, info.device)
                result: dict[str, Any] = {"kind": "classifier", "test_accuracy": acc["overall"],
                                          "per_class_accuracy": acc["per_class"]}
            else:
                log.info("evalnet: %s", NO_LABELS)
                net, summary = train_contrastive(ec, cfg.data, n_train, resume_id, info, curve)
                result = {"kind": "contrastive", "test_accuracy": None, "skipped": {"test_accuracy": NO_LABELS}}
            if info.is_main:
                _write(cfg, net, classes, {**result, "epochs": ec.epochs,
                                           "params": sum(p.numel() for p in net.parameters()), **summary}, tracker)
    finally:
        cleanup_distributed()


def _write(cfg: Config, net: Any, classes: list[str], result: dict[str, Any], tracker: Any) -> None:
    ec = cfg.evalnet
    with atomic_dir(ec.out_dir, after=[ec.metrics_file, ec.details_file]) as tmp:  # the folder and its metrics
        extra = {"classes": classes, "test_accuracy": result["test_accuracy"]}
        weights = Path(ec.out_dir) / save_evalnet(net.cpu(), tmp, extra=extra).name
    headline.write_metrics(result, ec.metrics_file, ec.details_file, headline.EVALNET)
    if result["test_accuracy"] is not None:
        tracker.log_metrics({"test_accuracy": result["test_accuracy"]}, step=result["steps"])
    tracker.log_artifact(ec.details_file)
    tracker.log_artifact(weights.with_suffix(".json"), "model")
    log.info("evalnet (%s): %s after %d steps; wrote %s and %s", result["kind"],
             f"test accuracy {result['test_accuracy']:.4f}" if result["test_accuracy"] is not None else "no labels",
             result["steps"], weights, ec.metrics_file)
