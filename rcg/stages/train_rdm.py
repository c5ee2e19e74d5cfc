"""`rcg train-rdm`: the RDM (paper section 3.2) and its class-conditional twin (section 4.4).

Trains on the cached 256-d representations (both views of every train image, the cache's stand-in
for the reference's random flips) with the recipe in rcg.rdm.train_rdm, then scores each RDM.

Outputs: models/rdm/rdm.* (and rdm_class.* when the features carry labels and train_rdm.class_cond),
checkpoints/train_rdm/{uncond,class}/ (resumable; raising train_rdm.steps continues training),
metrics/details/rdm.json (rcg.metrics.rdm: FD of RDM samples against real reps, beside the noise
floor, per draw and per class), its headline in metrics/rdm.json (rcg.metrics.headline), and the
training curves metrics/curves/{rdm,rdm_class}.tsv (the class RDM's without rows when it is not trained).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config, RDMConfig
from rcg.features import read_reps
from rcg.io import atomic_dir
from rcg.metrics import headline
from rcg.metrics.plots import Curve, CurveTracker
from rcg.metrics.rdm import score_trained
from rcg.rdm import artifact_name, save_trained, train_rdm
from rcg.tracking import Tracker, flatten, stage_run
from rcg.training import cleanup_distributed, seed_everything, setup_distributed

log = logging.getLogger(__name__)


def run(cfg: Config, **options: Any) -> None:
    """Train the RDM (and the class-conditional RDM), save them, score them into metrics/rdm.json and
    metrics/details/rdm.json."""
    rc = cfg.train_rdm
    if rc.threads > 0:
        torch.set_num_threads(rc.threads)
    info = setup_distributed(cfg.dist.tf32, cfg.dist.compile)
    try:
        seed_everything(rc.seed, info.rank)
        fdir = Path(cfg.encode.out_dir)
        train = read_reps(fdir / "train.parquet")
        val = read_reps(fdir / "val.parquet") if (fdir / "val.parquet").exists() else None
        if val is None:
            log.warning("%s: not found; fd_val and fd_floor_val are left out", fdir / "val.parquet")
        labelled = bool((train[1] >= 0).all())
        num_classes = int(train[1].max()) + 1 if labelled else 0
        class_cond = rc.class_cond and num_classes > 1
        skipped = None
        if rc.class_cond and not class_cond:
            skipped = "the features carry no class labels (or only one class): no class-conditional RDM"
            log.info("%s", skipped)
        with stage_run(cfg, "train_rdm", rank=info.rank, resume_key=(rc, num_classes, len(train[0]))) as tracker:
            # Both RDMs and their metrics are one set, swapped in once all are written (rcg.io.atomic_dir).
            # Every variant trains first (all ranks), then rank 0 alone scores: no rank waits in DDP.
            with atomic_dir(rc.out_dir, after=[rc.metrics_file, rc.details_file], enabled=info.is_main) as tmp:
                trained = []
                if info.is_main and not class_cond:  # not trained: a curve without rows
                    Curve(Path(rc.curves_dir) / f"{artifact_name(True)}.tsv").write()
                for labels in [None, train[1]] if class_cond else [None]:
                    name = artifact_name(labels is not None)
                    curve = CurveTracker(tracker, Path(rc.curves_dir) / f"{name}.tsv")
                    net, summary = train_rdm(rc, train[0], labels, num_classes, info, curve)
                    if info.is_main:
                        bundle = save_trained(rc, net, name, summary, len(train[0]), info.device, tmp, fdir / "train.parquet")
                        trained.append((name, bundle, summary))
                result = score_trained(rc, trained, train, val, skipped) if info.is_main else {}
            if info.is_main:
                _write(rc, result, trained, tracker)
    finally:
        cleanup_distributed()


def _write(rc: RDMConfig, result: dict[str, Any], trained: list, tracker: Tracker) -> None:
    headline.write_metrics(result, rc.metrics_file, rc.details_file, headline.RDM)
    tracker.log_metrics({k: float(v) for k, v in flatten(result).items()
                         if isinstance(v, (int, float)) and v == v})
    tracker.log_artifact(rc.details_file)
    for name, *_ in trained:
        tracker.log_artifact(Path(rc.out_dir) / f"{name}.json", "rdm")
    log.info("metrics written to %s and %s", rc.metrics_file, rc.details_file)
