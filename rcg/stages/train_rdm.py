"""`rcg train-rdm`: train the RDM (and its class-conditional twin) on the cached representations.

REFERENCE.md 2.3 and 2.5: the simple diffusion MSE on the 256-d reps (x0-prediction in the reference,
v in the default preset; both views of every train image, the cache's stand-in for the reference's
random flips), uniform timesteps, AdamW with constant lr 5.12e-4 and weight decay 0.01, EMA 0.9999
with warm-up, global batch 512 split over the ranks. The default preset departs from it in two
places (rcg/config.py has the measurements): `timestep_power` draws more low-noise timesteps and
`lr_decay_frac` decays the lr to zero over the last steps. The reps stay in memory as one
tensor and every step gathers a batch by index, so the data path costs next to nothing
(benchmarks/bench_rdm.py). Runs unchanged under torchrun (DDP, gloo on CPU, NCCL on GPU).

Outputs: models/rdm/rdm.* (and rdm_class.* when the features carry labels and train_rdm.class_cond),
checkpoints/train_rdm/{uncond,class}/checkpoint-last.pt (resumable; raising train_rdm.steps continues
training, and with lr_decay_frac > 0 the lr follows the schedule of the new step count: back up,
then down to zero again), metrics/rdm.json (Frechet distances of RDM samples vs real reps, next to
the real-vs-real noise floor, as in the paper's section 10 check).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config, ConfigError, RDMConfig
from rcg.diffusion import Diffusion, make_betas
from rcg.features import read_features
from rcg.io import PipelineError, get_logger, write_json
from rcg.metrics.frechet import Stats, feature_statistics, frechet_distance
from rcg.rdm import RDMBundle, RDMNet, artifact_name, build_rdm, bundle_from, make_meta, sample_reps, save_rdm
from rcg.tracking import Tracker, stage_run
from rcg.training import (
    EMA,
    Checkpointer,
    DistInfo,
    autocast,
    cleanup_distributed,
    fingerprint,
    lr_factor,
    seed_everything,
    setup_distributed,
    unwrap,
    wrap_ddp,
)

log = get_logger(__name__)


def make_diffusion(rc: RDMConfig) -> Diffusion:
    """The RDM's diffusion process from its config block (reference: sqrt-linear 0.0015..0.0195, x0)."""
    return Diffusion(make_betas(rc.beta_schedule, rc.timesteps, rc.linear_start, rc.linear_end), rc.parameterization)


def diffusion_meta(rc: RDMConfig) -> dict[str, Any]:
    return {
        "schedule": rc.beta_schedule,
        "timesteps": rc.timesteps,
        "linear_start": rc.linear_start,
        "linear_end": rc.linear_end,
        "parameterization": rc.parameterization,
    }


class IndexBatches:
    """Global batches of row indices: a fresh permutation each epoch, cut into `batch` rows, and each
    rank takes its own slice (DistributedSampler semantics, drop_last). Batch k is a pure function of
    (seed, k), so a resumed run continues with exactly the batches it would have seen."""

    def __init__(self, n: int, batch: int, info: DistInfo, seed: int) -> None:
        if batch % info.world_size:
            raise PipelineError(f"train_rdm.batch_size {batch} is not divisible by the {info.world_size} ranks")
        self.n, self.batch, self.seed, self.info = n, batch, seed, info
        self.per_rank = batch // info.world_size
        self.steps_per_epoch = n // batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = pos * self.batch + self.info.rank * self.per_rank
        return self._perm[start : start + self.per_rank]


def train_rdm_model(
    rc: RDMConfig,
    reps: torch.Tensor,
    labels: torch.Tensor | None,
    info: DistInfo,
    tracker: Tracker | None = None,
    num_classes: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> tuple[RDMNet, dict[str, Any]]:
    """Train one RDM (class-conditional when `labels` and `num_classes` are given) and return its EMA
    network with a summary; resumes from and writes checkpoints in `rc.checkpoint_dir/{uncond,class}`."""
    class_cond = labels is not None and num_classes > 0
    name = artifact_name(class_cond)
    device = info.device
    n, dim = reps.shape
    batch = rc.batch_size
    if n < batch:
        log.warning("%s: only %d reps for a global batch of %d; using batch %d", name, n, batch, n)
        batch = max(info.world_size, n - n % info.world_size)

    torch.manual_seed(rc.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    net = build_rdm(rc.arch, dim, num_classes if class_cond else 0).to(device)
    diffusion = make_diffusion(rc)
    ema = EMA(net, rc.ema_decay, warmup=True)
    # fused AdamW: the same update in one kernel (4x faster than the per-tensor loop on CPU here)
    opt = torch.optim.AdamW(net.parameters(), lr=rc.lr, weight_decay=rc.weight_decay, fused=True)

    # Everything that makes a checkpoint incompatible; not `steps`, so raising it continues training.
    train_keys = {k: getattr(rc, k) for k in (
        "arch", "timesteps", "beta_schedule", "linear_start", "linear_end", "parameterization",
        "timestep_power", "batch_size", "lr", "lr_decay_frac", "weight_decay", "ema_decay", "seed")}
    data_id = [n, dim, num_classes, float(reps[:: max(1, n // 1000)].double().sum())]
    ckpt = Checkpointer(
        Path(rc.checkpoint_dir) / ("class" if class_cond else "uncond"),
        fingerprint(train_keys, name, data_id),  # not the world size: the global batch is fixed
    )
    start, last_loss = 0, float("nan")
    state = ckpt.load()
    if state is not None:
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        # Carried over so a run resumed at its end still reports the loss it finished on.
        last_loss = float(state.get("last_loss", float("nan")))
    model = wrap_ddp(net, info)
    batches = IndexBatches(n, batch, info, rc.seed)
    # Per-rank noise and timesteps, reseeded at (re)start so ranks never share noise.
    g = torch.Generator().manual_seed(hash((rc.seed, info.rank, start)) % 2**63)
    reps_dev = reps.to(device)
    labels_dev = labels.to(device) if class_cond else None

    def save(step: int) -> None:
        if info.is_main:
            ckpt.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                       "step": step, "last_loss": last_loss}, final=step == rc.steps)

    log.info(
        "%s: %s, %d reps of dim %d, global batch %d on %d rank(s), steps %d -> %d",
        name, rc.arch, n, dim, batch, info.world_size, start, rc.steps,
    )
    pbar = None
    if info.is_main and rc.steps > start:
        from tqdm.auto import tqdm

        pbar = tqdm(total=rc.steps, initial=start, desc=f"train {name}", unit="step")
    ckpt.start_clock(training=start < rc.steps)
    running, count = torch.zeros((), device=device), 0
    model.train()
    for step in range(start, rc.steps):
        idx = batches(step).to(device)
        x0 = reps_dev[idx]  # (b, D)
        t = diffusion.sample_t(idx.numel(), device, g, power=rc.timestep_power)
        noise = torch.randn(x0.shape, generator=g).to(device)
        kwargs = {"y": labels_dev[idx]} if labels_dev is not None else None
        for group in opt.param_groups:
            group["lr"] = rc.lr * lr_factor(step, rc.steps, decay_frac=rc.lr_decay_frac)
        with autocast(device, rc.amp):  # bf16 matmuls; the loss itself is taken in fp32
            loss = diffusion.training_loss(model, x0, kwargs, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        running += loss.detach()
        count += 1
        done = step + 1
        if done % rc.log_every == 0 or done == rc.steps:
            last_loss = float(running) / count
            running.zero_()
            count = 0
            if tracker is not None:
                tracker.log_metrics({f"{name}/loss": last_loss}, step=done)
            if pbar is not None:
                pbar.set_postfix(loss=f"{last_loss:.4f}")
        if pbar is not None:
            pbar.update(1)
        if done % rc.ckpt_every == 0 or done == rc.steps:
            save(done)
        if on_step is not None:
            on_step(done)
    if pbar is not None:
        pbar.close()
    seconds = ckpt.stop_clock()
    trained = max(0, rc.steps - start)
    summary = {
        "steps": max(rc.steps, start),
        "steps_this_run": trained,
        "seconds": round(ckpt.train_seconds, 2),  # all runs that trained this checkpoint
        "seconds_this_run": round(seconds, 2),
        "steps_per_second": round(trained / seconds, 3) if trained else None,
        "final_loss": last_loss,  # the last logged mean loss, from the checkpoint if this run logged none
    }
    if trained:
        log.info("%s: %d steps in %.1fs (%.2f steps/s), loss %.4f", name, trained, seconds, trained / seconds, last_loss)
    return unwrap(ema.model).eval(), summary


# --------------------------------------------------------------------------------------------------
# Evaluation: Frechet distances in representation space (REFERENCE.md 10)
# --------------------------------------------------------------------------------------------------


def _random_rows(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


# Seeds of draw r are offset by r * _DRAW_SEED_STRIDE, so draw 0 is the single draw of earlier runs.
# Within a draw the class-conditional floor uses seed + 2 + c, distinct from every other draw's
# seeds up to 998 classes.
_DRAW_SEED_STRIDE = 1000


@dataclass
class _References:
    """What every draw is scored against, computed once: statistics of all train / val reps and,
    for the class-conditional RDM, each class's train rows with its train / val statistics."""

    train: Stats
    val: Stats | None
    n: int  # N, draws per figure
    per_class_n: int = 0  # N // K samples per class (class-conditional only)
    classes: dict[int, tuple[torch.Tensor, Stats, Stats | None]] = field(default_factory=dict)


def _references(
    bundle: RDMBundle,
    rc: RDMConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
) -> _References:
    train_reps, train_labels = train
    n = min(rc.n_eval, train_reps.shape[0])
    st_val = feature_statistics(val[0]) if val is not None else None
    refs = _References(feature_statistics(train_reps), st_val, n)
    if bundle.class_cond:
        refs.per_class_n = max(2, n // bundle.num_classes)
        for c in range(bundle.num_classes):
            rows = torch.nonzero(train_labels == c).flatten()
            if rows.numel() < 2:
                continue
            vrows = val[0][val[1] == c] if val is not None else None
            st_vc = feature_statistics(vrows) if vrows is not None and vrows.shape[0] >= 2 else None
            refs.classes[c] = (rows, feature_statistics(train_reps[rows]), st_vc)
    return refs


def _score_draw(
    bundle: RDMBundle, rc: RDMConfig, seed: int, train_reps: torch.Tensor, refs: _References
) -> dict[str, Any]:
    """One draw: N fresh RDM samples and N fresh random train reps, each scored against `refs`."""
    out: dict[str, Any] = {}
    if not bundle.class_cond:
        samples = sample_reps(bundle, refs.n, steps=rc.sample_steps, eta=rc.eta, temperature=rc.temperature,
                              seed=seed, batch_size=rc.eval_batch_size, progress=True)
        real = _random_rows(train_reps, refs.n, seed + 1)
        out["fd_train"] = frechet_distance(samples, refs.train)
        out["fd_floor_train"] = frechet_distance(real, refs.train)
        if refs.val is not None:
            out["fd_val"] = frechet_distance(samples, refs.val)
            out["fd_floor_val"] = frechet_distance(real, refs.val)
        out["sample_norm_mean"] = float(samples.norm(dim=1).mean())
        return out

    per = refs.per_class_n
    ids = torch.arange(bundle.num_classes).repeat_interleave(per)
    samples = sample_reps(bundle, ids.numel(), class_ids=ids, steps=rc.sample_steps, eta=rc.eta,
                          temperature=rc.temperature, seed=seed, batch_size=rc.eval_batch_size, progress=True)
    out["fd_train"] = frechet_distance(samples, refs.train)
    if refs.val is not None:
        out["fd_val"] = frechet_distance(samples, refs.val)
    per_class: dict[str, dict[str, float]] = {}
    for c, (rows, st_c, st_vc) in refs.classes.items():
        s_c = samples[ids == c]
        real_c = train_reps[_random_rows(rows, per, seed + 2 + c)]  # gathers only the drawn rows
        row = {"fd_train": frechet_distance(s_c, st_c), "fd_floor_train": frechet_distance(real_c, st_c)}
        if st_vc is not None:
            row["fd_val"] = frechet_distance(s_c, st_vc)
            row["fd_floor_val"] = frechet_distance(real_c, st_vc)
        per_class[str(c)] = row
    out["per_class"] = per_class
    return out


def _mean_over_draws(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every number over the draws, nested dicts alike; `<key>_std` beside every FD."""
    out: dict[str, Any] = {}
    for key, first in draws[0].items():
        if isinstance(first, dict):
            out[key] = _mean_over_draws([d[key] for d in draws])
            continue
        vals = [float(d[key]) for d in draws]
        out[key] = sum(vals) / len(vals)
        if key.startswith("fd_") and len(vals) > 1:
            out[f"{key}_std"] = statistics.stdev(vals)
    return out


def evaluate_rdm(
    bundle: RDMBundle,
    rc: RDMConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, Any]:
    """FDs of N RDM samples and of N random train reps against all train reps and all val reps.

    fd_train / fd_val: N RDM samples vs all train / val reps; fd_floor_train / fd_floor_val: N random
    train reps vs all train / val reps (the paper's noise floor: its FD 0.48 vs 0.38 on train). N is
    train_rdm.n_eval; the same N on both sides makes the finite-sample bias the same. For the
    class-conditional RDM, N // K samples per class (as the reference's arange(K).repeat), scored
    against that class's reps: fd_per_class_* are means over classes, beside their own floor.

    At N = 5000 on 256-d reps one draw is noisy (default run with eta 1: per-draw spread 0.05-0.08
    on fd_train ~0.65, 0.03 with eta 0; 0.01-0.03 on the floor's ~0.41), so every figure
    is the mean over `train_rdm.eval_repeats` independent draws of N, with their spread as `*_std`.
    The floor scatters less because it sits at FD's minimum, where sampling error enters only at
    second order; the RDM's samples are off it, so theirs enters at first order.
    """
    refs = _references(bundle, rc, train, val)
    draws = [
        _score_draw(bundle, rc, rc.seed + r * _DRAW_SEED_STRIDE, train[0], refs)
        for r in range(rc.eval_repeats)
    ]
    out: dict[str, Any] = {"n_eval": refs.n, "eval_repeats": rc.eval_repeats, **_mean_over_draws(draws)}
    if not bundle.class_cond:
        out["fd_train_over_floor"] = out["fd_train"] / max(out["fd_floor_train"], 1e-12)
        return out
    out["n_per_class"] = refs.per_class_n
    per_class = out.pop("per_class")
    for key in ("fd_train", "fd_floor_train", "fd_val", "fd_floor_val"):
        vals = [r[key] for r in per_class.values() if key in r]
        if vals:
            out[f"fd_per_class_{key[3:]}"] = sum(vals) / len(vals)
    out["per_class"] = per_class
    return out


def _flat_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and v is not None and v == v:
            flat[f"{prefix}{k}"] = float(v)
    return flat


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows (both views) of a features file as in-memory tensors (copied out of the memory map)."""
    f = read_features(path)
    if len(f) == 0:
        raise PipelineError(f"{path}: no representations in this file")
    return f.reps.clone().contiguous(), f.labels.clone()


def run(cfg: Config, **options: Any) -> None:
    """Train the RDM (and the class-conditional RDM), save them, score them into metrics/rdm.json."""
    rc = cfg.train_rdm
    if not 0.0 <= rc.lr_decay_frac <= 1.0:
        raise ConfigError(f"train_rdm.lr_decay_frac: {rc.lr_decay_frac} is not a fraction of the steps (0..1)")
    if rc.timestep_power <= 0:
        raise ConfigError(f"train_rdm.timestep_power: {rc.timestep_power} must be > 0 (1 = uniform timesteps)")
    if rc.eval_repeats < 1:
        raise ConfigError(f"train_rdm.eval_repeats: {rc.eval_repeats} must be >= 1 (draws of n_eval per FD)")
    if rc.threads > 0:
        torch.set_num_threads(rc.threads)
    info = setup_distributed()
    try:
        seed_everything(rc.seed, info.rank)
        fdir = Path(rc.features_dir)
        train_reps, train_labels = _read(fdir / "train.parquet")
        labelled = bool((train_labels >= 0).all())
        num_classes = int(train_labels.max()) + 1 if labelled else 0
        val = _read(fdir / "val.parquet") if (fdir / "val.parquet").exists() else None
        if val is None:
            log.warning("%s: not found; fd_val and fd_floor_val are left out", fdir / "val.parquet")
        variants = [False]
        if rc.class_cond and labelled and num_classes > 1:
            variants.append(True)
        elif rc.class_cond:
            log.info("features carry no (or only one) class label: skipping the class-conditional RDM")
        out_dir = Path(rc.out_dir)
        if info.is_main and True not in variants:
            for suffix in (".safetensors", ".json"):  # never leave a stale class-conditional RDM behind
                (out_dir / f"{artifact_name(True)}{suffix}").unlink(missing_ok=True)

        metrics: dict[str, Any] = {}
        with stage_run(cfg, "train_rdm", rank=info.rank) as tracker:
            # Train every variant first (all ranks), then score on rank 0 alone, so no rank waits
            # inside DDP for another rank's evaluation.
            trained: list[tuple[str, RDMBundle, dict[str, Any]]] = []
            for class_cond in variants:
                name = artifact_name(class_cond)
                ema_net, summary = train_rdm_model(
                    rc, train_reps, train_labels if class_cond else None, info, tracker,
                    num_classes=num_classes if class_cond else 0,
                )
                if not info.is_main:
                    continue
                meta = make_meta(
                    ema_net, rc.arch, diffusion_meta(rc),
                    {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
                    {"trained_steps": summary["steps"], "ema_decay": rc.ema_decay,
                     "features": str(fdir / "train.parquet"), "num_train_reps": int(train_reps.shape[0])},
                )
                path = save_rdm(ema_net.cpu(), meta, out_dir, name)
                log.info("%s: EMA weights written to %s", name, path)
                trained.append((name, bundle_from(ema_net.to(info.device), meta), summary))

            for name, bundle, summary in trained:
                t0 = time.perf_counter()
                log.info("%s: scoring %d samples (%d DDIM steps)", name, min(rc.n_eval, len(train_reps)), rc.sample_steps)
                scores = evaluate_rdm(bundle, rc, (train_reps, train_labels), val)
                scores["train"] = summary
                scores["eval_seconds"] = round(time.perf_counter() - t0, 1)
                metrics[name] = scores
                log.info("%s: %s", name, {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})

            if info.is_main:
                result = dict(metrics.get("rdm", {}))
                result.pop("train", None)
                train = metrics.get("rdm", {}).get("train", {})
                result["train_steps"] = train.get("steps")
                result["train_seconds"] = train.get("seconds")
                result["train_final_loss"] = train.get("final_loss")
                if "rdm_class" in metrics:
                    result["class_cond"] = metrics["rdm_class"]
                write_json(rc.metrics_file, result)
                tracker.log_metrics(_flat_metrics(result))
                tracker.log_artifact(rc.metrics_file)
                for name in metrics:
                    tracker.log_artifact(out_dir / f"{name}.json", "rdm")
                log.info("metrics written to %s", rc.metrics_file)
    finally:
        cleanup_distributed()
