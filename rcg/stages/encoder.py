"""`rcg encoder`: the frozen self-supervised encoder in models/encoder/ (paper section 3.1).

With `encoder.checkpoint` set, an official MoCo v3 / DINO / iBOT / DeiT file is converted strictly
and verified. Without one, MoCo v3 (Chen, Xie & He 2021) pretrains the configured ViT on the train
shards through the shared loop (resumable, runnable under torchrun unchanged).

Either way the stage runs the kNN check of rcg.metrics.knn (for the encoder, a random
initialisation of it and raw pixels; labels are used only for that check) and writes the whole
record to metrics/details/encoder.json, its headline (rcg.metrics.headline) to metrics/encoder.json,
and the pretraining curve to metrics/curves/encoder.tsv (empty for a converted checkpoint).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rcg.config import Config, EncoderConfig
from rcg.data.loader import channel_stats, read_manifest
from rcg.encoders.checkpoints import load_checkpoint
from rcg.encoders.moco import pretrain, training_block, training_fingerprint
from rcg.encoders.vit import save_encoder, spec_from_config, verify_encoder
from rcg.io import PipelineError, atomic_dir
from rcg.metrics import headline
from rcg.metrics.knn import knn_report
from rcg.metrics.plots import Curve, CurveTracker
from rcg.tracking import stage_run
from rcg.training import DistInfo, cleanup_distributed, setup_distributed

log = logging.getLogger(__name__)

def _check(ecfg: EncoderConfig, info: DistInfo) -> None:
    if ecfg.batch_size % info.world_size:
        raise PipelineError(f"encoder.batch_size {ecfg.batch_size} is not divisible by {info.world_size} ranks")


def run(cfg: Config, **options: Any) -> None:
    """Convert or pretrain the encoder, save it, verify it, and write the kNN metrics."""
    t0 = time.perf_counter()
    info = setup_distributed(cfg.dist.tf32, cfg.dist.compile)
    ecfg = cfg.encoder
    with stage_run(cfg, "encoder", rank=info.rank, resume_key=None if ecfg.checkpoint else training_fingerprint(ecfg, cfg.data)) as tracker:
        try:
            if ecfg.checkpoint:
                encoder = load_checkpoint(ecfg.checkpoint, ecfg.checkpoint_format, spec_from_config(ecfg, 3))
                meta: dict[str, Any] = {"source": ecfg.checkpoint, "format": ecfg.checkpoint_format}
                facts: dict[str, Any] = {}
                if info.is_main:  # nothing trained here: a curve without rows, no resume state, yet
                    Curve(ecfg.curves_file).write()  # both are outputs dvc.yaml declares for the stage
                    Path(ecfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            else:
                _check(ecfg, info)
                n_train = int(read_manifest(cfg.data.shards_dir)["splits"]["train"]["written"])
                measured = None if (ecfg.mean or ecfg.std) else channel_stats(cfg.data)
                if measured is not None:
                    log.info("input normalisation measured on the train shards: mean %s, std %s", *measured)
                encoder, facts = pretrain(cfg.data, ecfg, spec_from_config(ecfg, cfg.data.channels, measured), n_train,
                                          training_fingerprint(ecfg, cfg.data), info, CurveTracker(tracker, ecfg.curves_file))
                facts["normalisation"] = {"mean": list(encoder.spec.mean), "std": list(encoder.spec.std),
                                          "measured": measured is not None}
                # Only what defines the weights, so a rerun that resumes at the end writes the same files.
                meta = {"source": "mocov3-pretrain", "training_config": training_block(ecfg), "steps": facts["steps"]}
        finally:
            cleanup_distributed()  # the kNN check runs on rank 0 alone, over all the data
        if not info.is_main:
            return
        # The folder and its metrics file are one set: swapped in together (rcg.io.atomic_dir).
        with atomic_dir(ecfg.out_dir, after=[ecfg.metrics_file, ecfg.details_file]) as tmp:
            save_encoder(encoder, encoder.spec, tmp, extra=meta)
            verify_encoder(encoder, tmp)
            metrics = {**knn_report(encoder, cfg.data, ecfg.knn_k, ecfg.knn_max_train, ecfg.seed), **facts,
                       "wall_time_s": round(time.perf_counter() - t0, 1)}
        log.info("encoder written to %s (%s)", ecfg.out_dir, meta["source"])
        headline.write_metrics(metrics, ecfg.metrics_file, ecfg.details_file, headline.ENCODER)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(Path(ecfg.out_dir) / "encoder.json")
        log.info("metrics written to %s and %s", ecfg.metrics_file, ecfg.details_file)
