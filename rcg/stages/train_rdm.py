"""`rcg train-rdm`: the RDM (paper section 3.2) and its class-conditional twin (section 4.4).

The simple diffusion MSE on the cached 256-d representations (both views of every train image,
the cache's stand-in for the reference's random flips), AdamW, EMA with warm-up, global batch split
over the torchrun ranks, through the shared loop (rcg.training.fit). The reps stay in memory as one
tensor and every step gathers its batch by index, so the data path costs next to nothing.

Outputs: models/rdm/rdm.* (and rdm_class.* when the features carry labels and train_rdm.class_cond),
checkpoints/train_rdm/{uncond,class}/ (resumable; raising train_rdm.steps continues training),
metrics/rdm.json (rcg.metrics.rdm: FD of RDM samples against real reps, beside the noise floor).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config, ConfigError, RDMConfig
from rcg.diffusion import Diffusion, diffusion_meta
from rcg.features import read_features
from rcg.io import PipelineError, write_json
from rcg.metrics.rdm import score_rdm
from rcg.rdm import RDMBundle, artifact_name, build_rdm, bundle_from, make_meta, save_rdm
from rcg.tracking import Tracker, flatten, stage_run
from rcg.training import DistInfo, LoopSpec, cleanup_distributed, fingerprint, fit, seed_everything, setup_distributed

log = logging.getLogger(__name__)

# Settings that change what is learned (not `steps`: raising it continues a finished run).
_TRAINING_KEYS = ("arch", "timesteps", "beta_schedule", "linear_start", "linear_end", "parameterization",
                  "timestep_power", "batch_size", "lr", "lr_decay_frac", "weight_decay", "ema_decay", "seed")


def schedule(rc: RDMConfig) -> dict[str, Any]:
    """The RDM's diffusion process as its JSON describes it (paper section 3.2: 1000 steps, x0)."""
    return diffusion_meta(rc.beta_schedule, rc.timesteps, rc.linear_start, rc.linear_end, rc.parameterization)


def index_batches(n: int, batch: int, info: DistInfo, seed: int, start: int) -> Iterator[torch.Tensor]:
    """This rank's row indices for every step from `start`: a fresh permutation per epoch, cut into
    global batches, each rank taking its slice (DistributedSampler semantics, drop_last). Step k's
    batch is a pure function of (seed, k), so a resumed run sees exactly the batches it would have."""
    per_rank, per_epoch = batch // info.world_size, n // batch
    epoch_now, perm = -1, torch.empty(0, dtype=torch.long)
    for step in itertools.count(start):
        epoch, pos = divmod(step, per_epoch)
        if epoch != epoch_now:
            epoch_now, perm = epoch, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        first = pos * batch + info.rank * per_rank
        yield perm[first : first + per_rank]


def train_one(rc: RDMConfig, reps: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
              info: DistInfo, tracker: Tracker | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one RDM (class-conditional when `labels` are given); returns its EMA network and summary."""
    name = artifact_name(labels is not None)
    n, dim = reps.shape
    batch = rc.batch_size
    if batch % info.world_size:
        raise PipelineError(f"train_rdm.batch_size {batch} is not divisible by the {info.world_size} ranks")
    if n < batch:
        log.warning("%s: only %d reps for a global batch of %d; using batch %d", name, n, batch, n)
        batch = max(info.world_size, n - n % info.world_size)
    torch.manual_seed(rc.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    net = build_rdm(rc.arch, dim, num_classes if labels is not None else 0).to(info.device)
    diffusion = Diffusion.from_meta(schedule(rc))
    # fused AdamW: the same update in one kernel (several times faster than the per-tensor loop on CPU)
    opt = torch.optim.AdamW(net.parameters(), lr=rc.lr, weight_decay=rc.weight_decay, fused=True)
    data_id = [n, dim, num_classes, float(reps[:: max(1, n // 1000)].double().sum())]
    spec = LoopSpec(
        name=f"train_rdm ({name})", steps=rc.steps, lr=rc.lr, batch_size=batch, decay="linear",
        decay_frac=rc.lr_decay_frac, amp=rc.amp, ema_decay=rc.ema_decay, log_every=rc.log_every,
        ckpt_every=rc.ckpt_every, metric_prefix=f"{name}/", config_key="train_rdm",
        checkpoint_dir=Path(rc.checkpoint_dir) / ("class" if labels is not None else "uncond"),
        fingerprint=fingerprint({k: getattr(rc, k) for k in _TRAINING_KEYS}, name, data_id),
    )
    # This rank's noise and timesteps: a stream of its own, saved in the checkpoints.
    g = torch.Generator().manual_seed(hash((rc.seed, info.rank, 0)) % 2**63)
    reps_dev = reps.to(info.device)
    labels_dev = labels.to(info.device) if labels is not None else None

    def data(start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx in index_batches(n, batch, info, rc.seed, start):
            idx = idx.to(info.device)
            x0 = reps_dev[idx]  # (b, D)
            t = diffusion.sample_t(idx.numel(), info.device, g, power=rc.timestep_power)
            noise = torch.randn(x0.shape, generator=g).to(info.device)
            yield x0, t, noise, (labels_dev[idx] if labels_dev is not None else None)

    def loss(model: torch.nn.Module, b: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x0, t, noise, y = b
        return diffusion.training_loss(model, x0, {"y": y} if y is not None else None, t=t, noise=noise)

    log.info("%s: %s, %d reps of dim %d, global batch %d on %d rank(s), %d steps",
             name, rc.arch, n, dim, batch, info.world_size, rc.steps)
    trained = fit(spec, net, opt, loss, data, info, tracker, generators={"noise": g})
    return trained.ema, trained.summary


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows (both views) of a features file as in-memory tensors (copied out of the memory map)."""
    f = read_features(path)
    if len(f) == 0:
        raise PipelineError(f"{path}: no representations in this file")
    return f.reps.clone().contiguous(), f.labels.clone()


def _check(rc: RDMConfig) -> None:
    if not 0.0 <= rc.lr_decay_frac <= 1.0:
        raise ConfigError(f"train_rdm.lr_decay_frac: {rc.lr_decay_frac} is not a fraction of the steps (0..1)")
    if rc.timestep_power <= 0:
        raise ConfigError(f"train_rdm.timestep_power: {rc.timestep_power} must be > 0 (1 = uniform timesteps)")
    if rc.eval_repeats < 1:
        raise ConfigError(f"train_rdm.eval_repeats: {rc.eval_repeats} must be >= 1 (draws of n_eval per FD)")


def _save(rc: RDMConfig, net: torch.nn.Module, name: str, summary: dict[str, Any], n_reps: int,
          device: torch.device) -> RDMBundle:
    """Write models/rdm/<name>.* with the sampler settings every later use of this RDM reads."""
    meta = make_meta(
        net, rc.arch, schedule(rc),
        {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
        {"trained_steps": summary["steps"], "ema_decay": rc.ema_decay,
         "features": str(Path(rc.features_dir) / "train.parquet"), "num_train_reps": n_reps},
    )
    log.info("%s: EMA weights written to %s", name, save_rdm(net.cpu(), meta, rc.out_dir, name))
    return bundle_from(net.to(device), meta)


def _metrics(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """metrics/rdm.json: the unconditional RDM's figures, the class-conditional one's nested."""
    result = {k: v for k, v in scores["rdm"].items() if k != "train"}
    train = scores["rdm"]["train"]
    result.update(train_steps=train["steps"], train_seconds=train["train_seconds_total"],
                  train_final_loss=train["final_loss"])
    if "rdm_class" in scores:
        result["class_cond"] = scores["rdm_class"]
    return result


def run(cfg: Config, **options: Any) -> None:
    """Train the RDM (and the class-conditional RDM), save them, score them into metrics/rdm.json."""
    rc = cfg.train_rdm
    _check(rc)
    if rc.threads > 0:
        torch.set_num_threads(rc.threads)
    info = setup_distributed()
    try:
        seed_everything(rc.seed, info.rank)
        fdir = Path(rc.features_dir)
        train = _read(fdir / "train.parquet")
        val = _read(fdir / "val.parquet") if (fdir / "val.parquet").exists() else None
        if val is None:
            log.warning("%s: not found; fd_val and fd_floor_val are left out", fdir / "val.parquet")
        labelled = bool((train[1] >= 0).all())
        num_classes = int(train[1].max()) + 1 if labelled else 0
        class_cond = rc.class_cond and num_classes > 1
        if rc.class_cond and not class_cond:
            log.info("features carry no (or only one) class label: skipping the class-conditional RDM")
        if not class_cond and info.is_main:
            for suffix in (".safetensors", ".json"):  # never leave a stale class-conditional RDM behind
                (Path(rc.out_dir) / f"{artifact_name(True)}{suffix}").unlink(missing_ok=True)
        with stage_run(cfg, "train_rdm", rank=info.rank) as tracker:
            # Train every variant first (all ranks), then score on rank 0 alone, so no rank waits
            # inside DDP for another rank's evaluation.
            trained = []
            for labels in [None, train[1]] if class_cond else [None]:
                net, summary = train_one(rc, train[0], labels, num_classes, info, tracker)
                if info.is_main:
                    name = artifact_name(labels is not None)
                    trained.append((name, _save(rc, net, name, summary, len(train[0]), info.device), summary))
            if info.is_main:
                _score_and_write(rc, trained, train, val, tracker)
    finally:
        cleanup_distributed()


def _score_and_write(rc: RDMConfig, trained: list, train: tuple, val: tuple | None, tracker: Tracker) -> None:
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
    write_json(rc.metrics_file, result)
    tracker.log_metrics({k: float(v) for k, v in flatten(result).items()
                         if isinstance(v, (int, float)) and v == v})
    tracker.log_artifact(rc.metrics_file)
    for name in scores:
        tracker.log_artifact(Path(rc.out_dir) / f"{name}.json", "rdm")
    log.info("metrics written to %s", rc.metrics_file)
