"""`rcg evalnet`: train the domain classifier the evaluate stage uses as its feature extractor.

Without Inception weights the default pipeline scores images on the features of a small CNN trained
on the labelled train split (rcg.metrics.evalnet). Writes models/evalnet/ and metrics/evalnet.json
(`test_accuracy` on the val split, per-class accuracy, the training summary).
"""

from __future__ import annotations

import logging

from rcg.config import Config
from rcg.data.loader import read_manifest, shards_id
from rcg.io import PipelineError, write_json
from rcg.metrics.evalnet import save_evalnet, train_evalnet, val_accuracy
from rcg.tracking import stage_run
from rcg.training import cleanup_distributed, fingerprint, setup_distributed

log = logging.getLogger(__name__)


def run(cfg: Config, **options: object) -> None:
    """Train the evaluation classifier and write models/evalnet/ + metrics/evalnet.json."""
    ec = cfg.evalnet
    manifest = read_manifest(cfg.data.shards_dir)
    classes = list(manifest.get("classes") or [])
    if not classes:
        raise PipelineError(
            f"{cfg.data.shards_dir}/manifest.json: the shards have no class labels, so no evaluation "
            "classifier can be trained; set evaluate.extractor: inception (with Inception weights)"
        )
    # The shards too, so a checkpoint is never resumed on re-sharded data.
    resume_id = fingerprint(ec, cfg.data, len(classes), shards_id(cfg.data.shards_dir))
    info = setup_distributed()
    try:
        with stage_run(cfg, "evalnet", info.rank) as tracker:
            net, summary = train_evalnet(ec, cfg.data, len(classes), int(manifest["splits"]["train"]["written"]),
                                         resume_id, info, tracker)
            acc = val_accuracy(net, cfg.data, classes, info.device)
            if info.is_main:
                weights = save_evalnet(net.cpu(), ec.out_dir, extra={"classes": classes, "test_accuracy": acc["overall"]})
                result = {"test_accuracy": acc["overall"], "per_class_accuracy": acc["per_class"], "epochs": ec.epochs,
                          "params": sum(p.numel() for p in net.parameters()), **summary}
                write_json(ec.metrics_file, result)
                tracker.log_metrics({"test_accuracy": acc["overall"]}, step=summary["steps"])
                tracker.log_artifact(ec.metrics_file)
                tracker.log_artifact(weights.with_suffix(".json"), "model")
                log.info("evalnet: test accuracy %.4f after %d steps; wrote %s and %s",
                         acc["overall"], summary["steps"], weights, ec.metrics_file)
    finally:
        cleanup_distributed()
