"""How good the RDM's representations are: Frechet distances in representation space.

docs/paper.md#representation-quality has the paper's numbers.

The paper checks its RDM by the Frechet distance (FD) between 50k RDM samples and the training
representations (0.48), next to the noise floor of 50k real training representations against all of
them (0.38). `score_rdm` measures both, against the train and the val split, with N samples per draw
on each side (the same N, so the finite-sample bias is the same), averaged over independent draws.
For a class-conditional RDM it draws N // K samples per class, as the reference's
`arange(K).repeat`, and scores each class against that class's representations. `score_prior` scores
the hypersphere prior (rcg.priors) the same way, beside the RDM: what the RDM learns beyond the
support of the standardised representations.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rcg.config import RDMConfig
from rcg.metrics.frechet import Stats, feature_statistics, frechet_distance
from rcg.priors import hypersphere
from rcg.rdm import RDMBundle, sample_reps

log = logging.getLogger(__name__)


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
    bundle: RDMBundle | None,
    n_eval: int,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
) -> _References:
    train_reps, train_labels = train
    n = min(n_eval, train_reps.shape[0])
    st_val = feature_statistics(val[0]) if val is not None else None
    refs = _References(feature_statistics(train_reps), st_val, n)
    if bundle is not None and bundle.class_cond:
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
    bundle: RDMBundle, seed: int, train_reps: torch.Tensor, refs: _References, batch_size: int
) -> dict[str, Any]:
    """One draw: N fresh RDM samples (with the sampler settings saved beside the RDM) and N fresh
    random train reps, each scored against `refs`."""
    out: dict[str, Any] = {}
    if not bundle.class_cond:
        samples = sample_reps(bundle, refs.n, seed=seed, batch_size=batch_size, progress=True)
        return _score_samples(samples, seed, train_reps, refs)

    per = refs.per_class_n
    ids = torch.arange(bundle.num_classes).repeat_interleave(per)
    samples = sample_reps(bundle, ids.numel(), class_ids=ids, seed=seed, batch_size=batch_size, progress=True)
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


def _score_samples(samples: Tensor, seed: int, train_reps: Tensor, refs: _References) -> dict[str, Any]:
    """One draw of unconditional samples, and N random train reps (from seed + 1), against `refs`."""
    real = _random_rows(train_reps, refs.n, seed + 1)
    out = {"fd_train": frechet_distance(samples, refs.train), "fd_floor_train": frechet_distance(real, refs.train)}
    if refs.val is not None:
        out["fd_val"] = frechet_distance(samples, refs.val)
        out["fd_floor_val"] = frechet_distance(real, refs.val)
    out["sample_norm_mean"] = float(samples.norm(dim=1).mean())
    return out


def score_prior(sample: Callable[[int, int], Tensor], train: tuple[Tensor, Tensor],
                val: tuple[Tensor, Tensor] | None, *, n_eval: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """`score_rdm` for an unconditional sampler `sample(n, seed) -> [n, D]` other than the RDM (the
    hypersphere prior): the same N, draws and seeds, so its floors are the RDM's."""
    refs = _references(None, n_eval, train, val)
    draws = [_score_samples(sample(refs.n, s), s, train[0], refs)
             for s in (seed + r * _DRAW_SEED_STRIDE for r in range(repeats))]
    out: dict[str, Any] = {"n_eval": refs.n, "eval_repeats": repeats, **_mean_over_draws(draws)}
    out["fd_train_over_floor"] = out["fd_train"] / max(out["fd_floor_train"], 1e-12)
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


def score_rdm(
    bundle: RDMBundle,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    n_eval: int,
    repeats: int,
    seed: int = 0,
    batch_size: int = 2500,
) -> dict[str, Any]:
    """FDs of N RDM samples and of N random train reps against all train reps and all val reps.

    `train` and `val` are (reps [M, D], labels [M]). fd_train / fd_val: N RDM samples vs all train /
    val reps; fd_floor_train / fd_floor_val: N random train reps vs the same (the paper's noise
    floor). For the class-conditional RDM, fd_per_class_* are means over classes, beside their own
    floor. One draw of N is noisy (the RDM's samples sit off FD's minimum, where sampling error enters
    at first order; the floor's only at second order), so every figure is the mean over `repeats`
    independent draws, with their spread as `*_std`.
    """
    refs = _references(bundle, n_eval, train, val)
    draws = [_score_draw(bundle, seed + r * _DRAW_SEED_STRIDE, train[0], refs, batch_size) for r in range(repeats)]
    out: dict[str, Any] = {"n_eval": refs.n, "eval_repeats": repeats, **_mean_over_draws(draws)}
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


def _record(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The unconditional RDM's figures, the class-conditional one's nested under `class_cond`."""
    result = {k: v for k, v in scores["rdm"].items() if k != "train"}
    train = scores["rdm"]["train"]
    result.update(train_steps=train["steps"], train_seconds=train["train_seconds_total"],
                  train_final_loss=train["final_loss"], train_precision=train["precision"])
    if "rdm_class" in scores:
        result["class_cond"] = scores["rdm_class"]
    return result


def score_trained(rc: RDMConfig, trained: list[tuple[str, RDMBundle, dict[str, Any]]], train: tuple[Tensor, Tensor],
                  val: tuple[Tensor, Tensor] | None, class_skipped: str | None) -> dict[str, Any]:
    """The train_rdm stage's record (metrics/details/rdm.json): each trained (name, RDM, training
    summary) scored by `score_rdm` with rc's evaluation settings; `class_skipped` says why no
    class-conditional RDM was trained."""
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
    result = _record(scores)
    if class_skipped:
        result["class_cond"] = {"skipped": class_skipped}
    dim = train[0].shape[1]
    result["hypersphere"] = score_prior(lambda n, s: hypersphere(n, dim, seed=s), train, val,
                                        n_eval=rc.n_eval, repeats=rc.eval_repeats, seed=rc.seed)
    log.info("hypersphere prior: %s", {k: round(v, 4) for k, v in result["hypersphere"].items() if isinstance(v, float)})
    return result
