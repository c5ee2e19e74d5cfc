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
import time
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config, RDMConfig
from rcg.features import read_features
from rcg.io import PipelineError, atomic_dir
from rcg.metrics import headline
from rcg.metrics.plots import Curve, CurveTracker
from rcg.metrics.rdm import score_rdm
from rcg.rdm import RDMBundle, artifact_name, bundle_from, make_meta, save_rdm, schedule, train_rdm
from rcg.tracking import Tracker, flatten, stage_run
from rcg.training import cleanup_distributed, seed_everything, setup_distributed

log = logging.getLogger(__name__)


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows (both views) of a features file as in-memory tensors (copied out of the memory map)."""
    f = read_features(path)
    if len(f) == 0:
        raise PipelineError(f"{path}: no representations in this file")
    return f.reps.clone().contiguous(), f.labels.clone()


def _save(rc: RDMConfig, net: torch.nn.Module, name: str, summary: dict[str, Any], n_reps: int,
          device: torch.device, out_dir: Path, features: Path) -> RDMBundle:
    """Write <out_dir>/<name>.* with the sampler settings every later use of this RDM reads."""
    meta = make_meta(
        net, rc.arch, schedule(rc),
        {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
        {"trained_steps": summary["steps"], "ema_decay": rc.ema_decay,
         "features": str(features), "num_train_reps": n_reps},
    )
    save_rdm(net.cpu(), meta, out_dir, name)
    log.info("%s: EMA weights written to %s", name, Path(rc.out_dir) / f"{name}.safetensors")
    return bundle_from(net.to(device), meta)


def _metrics(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stage's record: the unconditional RDM's figures, the class-conditional one's nested."""
    result = {k: v for k, v in scores["rdm"].items() if k != "train"}
    train = scores["rdm"]["train"]
    result.update(train_steps=train["steps"], train_seconds=train["train_seconds_total"],
                  train_final_loss=train["final_loss"], train_precision=train["precision"])
    if "rdm_class" in scores:
        result["class_cond"] = scores["rdm_class"]
    return result


def run(cfg: Config, **options: Any) -> None:
    """Train the RDM (and the class-conditional RDM), save them, score them into metrics/rdm.json and
    metrics/details/rdm.json."""
    rc = cfg.train_rdm
    if rc.threads > 0:
        torch.set_num_threads(rc.threads)
    info = setup_distributed()
    try:
        seed_everything(rc.seed, info.rank)
        fdir = Path(cfg.encode.out_dir)
        train = _read(fdir / "train.parquet")
        val = _read(fdir / "val.parquet") if (fdir / "val.parquet").exists() else None
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
                        bundle = _save(rc, net, name, summary, len(train[0]), info.device, tmp, fdir / "train.parquet")
                        trained.append((name, bundle, summary))
                result = _score(rc, trained, train, val, skipped) if info.is_main else {}
            if info.is_main:
                _write(rc, result, trained, tracker)
    finally:
        cleanup_distributed()


def _score(rc: RDMConfig, trained: list, train: tuple, val: tuple | None, class_skipped: str | None) -> dict[str, Any]:
    """The stage's record (metrics/details/rdm.json): every trained RDM scored (rcg.metrics.rdm)."""
    scores: dict[str, dict[str, Any]] = {}
    for name, bundle, summary in trained:
        t0 = time.perf_counter()
        log.info("%s: scoring %d samples (%d DDIM steps)", name, min(rc.n_eval, len(train[0])), rc.sample_steps)
        scores[name] = score_rdm(bundle, train, val,
                                 n_eval=rc.n_eval, repeats=rc.eval_repeats, seed=rc.seed,
                                 batch_size=rc.eval_batch_size)
        scores[name]["train"] = summary
        scores[name]["eval_seconds"] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s", name, {k: round(v, 4) for k, v in scores[name].items() if isinstance(v, float)})
    result = _metrics(scores)
    if class_skipped:
        result["class_cond"] = {"skipped": class_skipped}
    return result


def _write(rc: RDMConfig, result: dict[str, Any], trained: list, tracker: Tracker) -> None:
    headline.write_metrics(result, rc.metrics_file, rc.details_file, headline.RDM)
    tracker.log_metrics({k: float(v) for k, v in flatten(result).items()
                         if isinstance(v, (int, float)) and v == v})
    tracker.log_artifact(rc.details_file)
    for name, *_ in trained:
        tracker.log_artifact(Path(rc.out_dir) / f"{name}.json", "rdm")
    log.info("metrics written to %s and %s", rc.metrics_file, rc.details_file)
