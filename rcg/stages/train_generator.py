"""`rcg train-generator --condition rep|none|label|cluster|contrastive`: the image generator (paper
section 3.3), its baselines (Table 9a: no condition, class labels, k-means cluster labels) and the
rep generator trained through the contrastive posterior, with the recipe of rcg.generators.training.

Outputs: models/generator/<condition>/generator.{safetensors,json} (EMA weights) and samples.png,
checkpoints/train_generator/<condition>/checkpoint-last.pt, metrics/details/generator_<condition>.json
(the run's record), its headline in metrics/generator_<condition>.json (rcg.metrics.headline), and
the training curve metrics/curves/generator_<condition>.tsv. A `cluster` generator's folder also
holds its k-means (rcg.clusters: clusters.safetensors, clusters.json), which evaluate draws ids from.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from rcg.clusters import fit_clusters
from rcg.config import Config, GeneratorConfig
from rcg.data.loader import read_manifest, shards_id
from rcg.generators import arch_kind
from rcg.generators.tokens import tokenizer_digest
from rcg.generators.training import MODEL_CONDITION, Inputs, train_generator
from rcg.io import PipelineError, atomic_dir, file_digest, write_json
from rcg.metrics import headline
from rcg.metrics.plots import Curve, CurveTracker
from rcg.tracking import stage_run
from rcg.training import cleanup_distributed, fingerprint, setup_distributed

log = logging.getLogger(__name__)

# Settings that do not change what is learned: kept out of the checkpoint fingerprint, so a run can
# be extended (more steps) or re-logged without starting over.
# The tokenizer folder is an input: its weights' digest, not its path, is what a checkpoint must match.
_RUN_ONLY = ("steps", "ckpt_every", "log_every", "sample_every", "sample_steps", "sample_eta", "sampler",
             "sample_clip_x0", "grid_size", "threads", "checkpoint_dir", "metrics_dir", "details_dir", "curves_dir",
             "out_dir", "verify_cache", "tokenizer", "choice_temperature")
# Keys added after the first checkpoints were written: left out of the fingerprint while they hold
# their default, so that a checkpoint written before they existed still resumes.
_ADDED_LATER = ("tokenizer", "choice_temperature", "lr_schedule", "accum_steps", "clusters", "cluster_iters",
                "rep_posterior", "posterior_temperature", "posterior_bank")
CONDITIONS = tuple(MODEL_CONDITION)  # rep, none, label, cluster, contrastive


def resume_fingerprint(cfg: Config, condition: str) -> str:
    """What a checkpoint must match to be resumed: the settings that change what is learned, and the
    inputs (the shards; for `rep` and `contrastive` also the encoder whose representations condition
    the model; for `cluster` the train features it clusters; for a MAGE arch the tokenizer whose ids
    it learns)."""
    default = GeneratorConfig()
    run_cfg = dataclasses.replace(cfg.train_generator, **{k: getattr(default, k) for k in _RUN_ONLY})
    settings = {k: v for k, v in dataclasses.asdict(run_cfg).items()
                if k not in _ADDED_LATER or v != getattr(default, k)}
    inputs = [shards_id(cfg.data.shards_dir)]
    if MODEL_CONDITION[condition] == "rep":
        inputs.append(file_digest(Path(cfg.encoder.out_dir) / "encoder.safetensors"))
    if condition == "cluster":
        inputs.append(file_digest(Path(cfg.encode.out_dir) / "train.parquet"))
    if arch_kind(cfg.train_generator.arch) == "tokens":
        inputs.append(tokenizer_digest(cfg.train_generator.tokenizer))
    return fingerprint(settings, cfg.data.image_size, cfg.data.channels, cfg.encoder.rep_dim, condition, inputs)


def output_files(gcfg: GeneratorConfig, condition: str) -> tuple[Path, Path, Path]:
    """The metrics file, the details file and the curve file of one generator."""
    name = f"generator_{condition}"
    return (Path(gcfg.metrics_dir) / f"{name}.json", Path(gcfg.details_dir) / f"{name}.json",
            Path(gcfg.curves_dir) / f"{name}.tsv")


def skip(cfg: Config, condition: str, reason: str) -> None:
    """Record that this generator is not trained, and why, in its model folder and metrics files (so the
    DAG goes on and evaluate and `rcg report` say why the mode is missing); no stale model is left."""
    metrics_file, details_file, curve_file = output_files(cfg.train_generator, condition)
    with atomic_dir(Path(cfg.train_generator.out_dir) / condition, after=[metrics_file, details_file]) as tmp:
        write_json(tmp / "skipped.json", {"condition": condition, "reason": reason})
    (Path(cfg.train_generator.checkpoint_dir) / condition).mkdir(parents=True, exist_ok=True)  # a DVC output
    Curve(curve_file).write()  # a curve without rows, like the other DVC outputs of the stage
    headline.write_metrics({"condition": condition, "skipped": reason}, metrics_file, details_file, headline.GENERATOR)
    log.warning("train_generator (%s) skipped: %s", condition, reason)


def run(cfg: Config, condition: str = "rep", **options: Any) -> None:
    """Train one generator and write its metrics file."""
    gcfg = cfg.train_generator
    if condition not in CONDITIONS:
        raise PipelineError(f"--condition must be {', '.join(CONDITIONS[:-1])} or {CONDITIONS[-1]}, got {condition!r}")
    classes = list(read_manifest(cfg.data.shards_dir).get("classes", []))
    if condition == "label" and not classes:
        skip(cfg, condition, f"{cfg.data.shards_dir}/manifest.json lists no classes: the label baseline "
                             "needs class labels (paper Table 9a), and these images have none")
        return
    if gcfg.threads > 0:
        torch.set_num_threads(gcfg.threads)
    inputs = Inputs(Path(cfg.encode.out_dir) / "train.parquet", cfg.encoder.out_dir, classes, cfg.encoder.rep_dim)
    metrics_file, details_file, curve_file = output_files(gcfg, condition)
    info = setup_distributed(cfg.dist.tf32, cfg.dist.compile)
    try:
        if condition == "cluster":  # every rank clusters alike (deterministic), in seconds
            inputs.clusters = fit_clusters(inputs.features, gcfg.clusters, gcfg.cluster_iters, gcfg.seed, info.device)
            log.info("k-means of %s: %s", inputs.features,
                     {k: inputs.clusters.meta[k] for k in ("k", "k_rule", "purity", "mean_sq_distance")})
        with stage_run(cfg, "train_generator", rank=info.rank, condition=condition, resume_key=resume_fingerprint(cfg, condition)) as tracker:
            tracker.set_tags({"condition": condition, "arch": gcfg.arch})
            # The model folder (weights, generator.json, samples.png) and the metrics file are one set:
            # the library writes <out_dir>/<condition>, here a temporary twin swapped in at the end.
            with atomic_dir(Path(gcfg.out_dir) / condition, after=[metrics_file, details_file],
                            enabled=info.is_main) as tmp:
                metrics = train_generator(dataclasses.replace(gcfg, out_dir=str(tmp.parent)), cfg.data, inputs,
                                          condition, resume_fingerprint(cfg, condition), info,
                                          CurveTracker(tracker, curve_file))
            if info.is_main:
                headline.write_metrics(metrics, metrics_file, details_file, headline.GENERATOR)
                tracker.log_metrics({"train_seconds_total": metrics["train_seconds_total"]}, step=metrics["steps"])
                tracker.log_artifact(Path(gcfg.out_dir) / condition / "generator.json", "model")
                log.info("generator (%s) -> %s; %d steps in %.0fs (%s img/s)", condition,
                         Path(gcfg.out_dir) / condition, metrics["steps"], metrics["train_seconds_this_run"],
                         metrics["images_per_s"])
    finally:
        cleanup_distributed()
