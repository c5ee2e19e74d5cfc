"""The evaluation protocol (paper section 4, Table 9a): the table of metrics/eval.json.

Every generation mode draws `evaluate.n_samples` images, scored against the cached statistics of
the real val images under one extractor: Frechet distance (`fd`), IS, KID, precision and recall
(rcg.metrics.fidelity). The modes (`MODES`, the table's rows):

- `uncond`: the generator trained with no condition (the baseline the paper beats);
- `label`: the generator trained on class labels, given labels with the train split's frequencies
  (paper Table 9a's baseline);
- `rcg` / `rcg_cfg`: the representation-conditioned generator on RDM samples, without / with
  guidance (`evaluate.cfg`);
- `rcg_class`: the same generator on class-conditional RDM samples (same labels as `label`);
- `oracle`: the same generator on representations of real val images (paper Table 9a's oracle).

`floor` scores N real train images the same way: the best any mode can do at this N. The
classifier's accuracy on `label` and `rcg_class` samples against the asked-for class measures
class-conditional quality. Sample grids and Fig. 7's interpolation strips come out as figures;
writing files and MLflow records is the stage's part (rcg/stages/evaluate.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rcg.config import DataConfig, EvaluateConfig
from rcg.data.loader import read_manifest
from rcg.features import read_features
from rcg.generation import ImageGenerator, RCGGenerator
from rcg.io import PipelineError, file_digest, read_json
from rcg.metrics.evalnet import EvalNet, class_accuracy, classify, load_evalnet
from rcg.metrics.extractors import DESCRIPTIONS, EVALNET_SSL, extractor_setup
from rcg.metrics.fidelity import (
    Features,
    Featurizer,
    cache_name,
    cached_features,
    check_stats_match,
    read_reference_stats,
    score,
    to_uint8,
)

log = logging.getLogger(__name__)

MODES = ("uncond", "label", "rcg", "rcg_cfg", "rcg_class", "oracle")
CLASS_MODES = ("label", "rcg_class")  # modes that are asked for a class
BASELINES = {"uncond": "none", "label": "label"}  # mode -> its generator's condition; the rest are RCG
INTERP_PAIRS, INTERP_POINTS = 4, 8  # interpolation strips: rows, images per row


def check_modes(modes: list[str] | tuple[str, ...]) -> None:
    """A PipelineError naming any mode that is not one of `MODES`."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise PipelineError(f"evaluate.modes: unknown mode(s) {unknown} (known: {', '.join(MODES)})")


class ModeSampler(Protocol):
    """What the protocol draws images from (`ModeGenerators`, or a stand-in in tests)."""

    def sample(self, mode: str, n: int, *, class_ids: Tensor | None = None, reps: Tensor | None = None,
               cfg: float = 0.0, cfg_schedule: str = "linear", steps: int | None = None, seed: int = 0,
               batch_size: int = 250, progress: bool = False) -> Tensor: ...

    def interpolate(self, rep_a: Tensor, rep_b: Tensor, points: int = 8, *, seed: int = 0,
                    steps: int | None = None, batch_size: int = 250) -> Tensor: ...


class ModeGenerators:
    """The trained generators behind the modes, each loaded from its folder on first use and kept."""

    def __init__(self, generator_dir: str | Path, rdm_dir: str | Path,
                 device: torch.device | str | None = None) -> None:
        self.generator_dir, self.rdm_dir, self.device = Path(generator_dir), Path(rdm_dir), device
        self._baselines: dict[str, ImageGenerator] = {}
        self._rcg: RCGGenerator | None = None

    def skipped(self, mode: str) -> str | None:
        """Why `mode` has no generator, if its training stage recorded a skip (else None)."""
        condition = BASELINES.get(mode, "rep")
        path = self.generator_dir / condition / "skipped.json"
        return str(read_json(path).get("reason", "skipped")) if path.exists() else None

    def baseline(self, condition: str) -> ImageGenerator:
        """The `none` or `label` generator of `<generator_dir>/<condition>`."""
        if condition not in self._baselines:
            self._baselines[condition] = ImageGenerator.load(self.generator_dir / condition, self.device)
        return self._baselines[condition]

    def rcg(self) -> RCGGenerator:
        """The RDM folder with `<generator_dir>/rep`."""
        if self._rcg is None:
            self._rcg = RCGGenerator.load(self.rdm_dir, self.generator_dir / "rep", device=self.device)
        return self._rcg

    def sample(self, mode: str, n: int, *, class_ids: Tensor | None = None, reps: Tensor | None = None,
               cfg: float = 0.0, cfg_schedule: str = "linear", steps: int | None = None, seed: int = 0,
               batch_size: int = 250, progress: bool = False) -> Tensor:
        """n images [n, C, H, W] in [0, 1] of `mode` (module docstring); `class_ids` [n] for the class
        modes, `reps` [n, D] for `oracle`; `rcg_cfg` is `rcg` with the caller's guidance `cfg`."""
        check_modes([mode])
        if mode in CLASS_MODES and class_ids is None:
            raise PipelineError(f"mode {mode!r} needs class_ids")
        kw: dict[str, Any] = dict(cfg=cfg, cfg_schedule=cfg_schedule, steps=steps, seed=seed,
                                  batch_size=batch_size, progress=progress)
        if mode in BASELINES:
            return self.baseline(BASELINES[mode]).sample(n, label=class_ids if mode == "label" else None, **kw)
        if mode == "oracle":
            if reps is None or reps.shape[0] != n:
                raise PipelineError(f"mode 'oracle' needs reps with {n} rows")
            return self.rcg().from_reps(reps, **kw)
        return self.rcg().sample(n, class_ids if mode == "rcg_class" else None, **kw)

    def interpolate(self, rep_a: Tensor, rep_b: Tensor, points: int = 8, *, seed: int = 0,
                    steps: int | None = None, batch_size: int = 250) -> Tensor:
        """RCGGenerator.interpolate of the rep generator (paper Fig. 7)."""
        return self.rcg().interpolate(rep_a, rep_b, points, seed=seed, steps=steps, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# The real side: reference statistics, the floor, class targets
# --------------------------------------------------------------------------------------------------


def class_frequencies(manifest: dict[str, Any], train_features: str | Path) -> Tensor:
    """Train-split class counts [K]: from the manifest if it has them, else the train features."""
    k = len(manifest["classes"])
    counts = manifest["splits"]["train"].get("class_counts")
    if counts:
        return torch.as_tensor([float(counts[c]) if isinstance(counts, dict) else float(counts[i])
                                for i, c in enumerate(manifest["classes"])])
    path = Path(train_features)
    if path.exists():
        labels = read_features(path, view="orig").labels
        return torch.bincount(labels[labels >= 0], minlength=k).double()[:k]
    log.warning("no class counts in the manifest and no %s: asking for every class equally often", path)
    return torch.ones(k, dtype=torch.float64)


def class_ids_for(freq: Tensor, n: int, seed: int) -> Tensor:
    """`n` labels with exactly the frequencies `freq` (largest remainder), in seeded random order."""
    share = freq.double() / freq.sum() * n
    counts = share.floor().long()
    rest = n - int(counts.sum())
    counts[torch.argsort(share - counts, descending=True)[:rest]] += 1
    ids = torch.repeat_interleave(torch.arange(len(freq)), counts)
    return ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def oracle_reps(val_features: str | Path, n: int, seed: int) -> Tensor:
    """Representations of `n` real val images (original view), drawn without replacement if possible."""
    feats = read_features(Path(val_features), view="orig")
    if len(feats) == 0:
        raise PipelineError(f"{val_features}: no val representations for mode oracle")
    g = torch.Generator().manual_seed(seed)
    if n <= len(feats):
        idx = torch.randperm(len(feats), generator=g)[:n]
    else:
        idx = torch.randint(len(feats), (n,), generator=g)
    return feats.reps[idx].clone()


@dataclass
class Reference:
    """What every row is scored against: `n_ref` real images (or ADM's statistics) under one extractor."""

    n: int  # images per mode (and real train images of the floor)
    n_ref: int
    manifest: dict[str, Any]
    key: tuple[Any, ...]  # everything the real images' features depend on (names their caches)
    featurizer: Featurizer
    features: Features | None  # the real images' features (None: ADM statistics without images)
    stats: dict[str, Any] | None = None  # ADM's {mu, sigma}, when FID is scored against them
    source: str = "val"  # what the reference is, in words eval.json records
    fidelity: dict[str, Any] = field(default_factory=dict)  # `score` keywords of every row

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    @property
    def extractor(self) -> str:
        return self.featurizer.name


def _real_batches(data: DataConfig, split: str, n: int, batch_size: int = 500) -> Any:
    """The first `n` images of `split` in shard order, as uint8 batches (streamed, never all at once)."""
    from rcg.data.loader import make_loader

    have = 0
    for batch in make_loader(data, split, "once", batch_size=batch_size):
        take = batch["image"][: n - have]
        have += len(take)
        yield to_uint8(take)
        if have >= n:
            return
    if have < n:
        raise PipelineError(f"{data.shards_dir}/{split}: {have} images, {n} needed")


def _counts(ev: EvaluateConfig, manifest: dict[str, Any], data: DataConfig) -> tuple[int, int]:
    """(images per mode, reference images), with the split sizes checked."""
    splits = manifest["splits"]
    n_val = int(splits.get("val", {}).get("written", 0))
    n_train = int(splits["train"]["written"])
    n, n_ref = ev.n_samples, ev.n_reference or n_val
    if not ev.reference_stats and (n_val == 0 or n_ref > n_val):
        raise PipelineError(f"{data.shards_dir}: {n_val} val images; the reference needs {n_ref} "
                            "(evaluate.n_reference)")
    if n > n_train:  # the floor scores n real train images, so a small folder gets fewer samples
        log.warning("evaluate.n_samples=%d, but the train split has %d images: scoring %d per mode", n, n_train, n_train)
        n = n_train
    return n, n_ref


def reference_set(ev: EvaluateConfig, data: DataConfig, evalnet_weights: str | Path) -> Reference:
    """The reference of the configured protocol: the val split's images, or ADM's reference batch
    (`evaluate.reference_stats`: FID against its mu/sigma, KID/precision/recall against arr_0)."""
    manifest = read_manifest(data.shards_dir)
    n, n_ref = _counts(ev, manifest, data)
    fe_name, fe_weights = extractor_setup(ev.extractor, evalnet_weights, ev.inception_weights)
    fz = Featurizer(fe_name, fe_weights, ev.feature_batch_size, isc=fe_name != EVALNET_SSL)
    fidelity = dict(isc=fe_name != EVALNET_SSL, kid_subset_size=ev.kid_subset_size,
                    prc_neighborhood=ev.prc_neighborhood, seed=ev.seed)
    # Everything the real images' features depend on: a changed input never reads a stale cache.
    key = (fe_name, file_digest(fe_weights), manifest.get("fingerprint"), manifest["splits"]["train"]["written"],
           manifest["splits"].get("val", {}).get("written", 0), data.image_size, data.channels)
    if ev.reference_stats:
        stats, images = read_reference_stats(ev.reference_stats)
        feats = None
        if images is not None:
            name = cache_name("adm", len(images), fe_name, file_digest(fe_weights), file_digest(ev.reference_stats))
            chunks = (torch.from_numpy(images[i : i + 500]).permute(0, 3, 1, 2) for i in range(0, len(images), 500))
            feats = cached_features(fz, ev.cache_dir, f"{name}-{fe_name}", lambda: chunks)
        log.info("evaluate: %s, %d samples per mode against %s", fe_name, n, ev.reference_stats)
        return Reference(n, len(images) if images is not None else 0, manifest, key, fz, feats, stats,
                         f"reference statistics {Path(ev.reference_stats).name}", fidelity)
    feats = cached_features(fz, ev.cache_dir, f"{cache_name('val', n_ref, *key)}-{fe_name}",
                            lambda: _real_batches(data, "val", n_ref))
    log.info("evaluate: extractor %s (%s), %d samples per mode against %d val images", fe_name, fe_weights, n, n_ref)
    return Reference(n, n_ref, manifest, key, fz, feats, None, f"{n_ref} val images", fidelity)


def score_against(ref: Reference, features: Features) -> dict[str, float]:
    """One row of the table: `features` scored against the reference (rcg.metrics.fidelity.score)."""
    if ref.stats is not None:
        check_stats_match(ref.stats, features, ref.featurizer.layers["fid"], "evaluate.reference_stats")
    return score(features, ref.features, ref.featurizer.layers, reference_stats=ref.stats, **ref.fidelity)


def floor_metrics(ref: Reference, data: DataConfig, cache_dir: str | Path) -> dict[str, float]:
    """The floor: `ref.n` real train images against the reference (their features cached too)."""
    t0 = time.perf_counter()
    feats = cached_features(ref.featurizer, cache_dir, f"{cache_name('train', ref.n, *ref.key)}-{ref.extractor}",
                            lambda: _real_batches(data, "train", ref.n))
    floor = score_against(ref, feats)
    floor["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("floor (real train vs %s): %s", ref.source, _fmt(floor))
    return floor


def class_targets(ev: EvaluateConfig, ref: Reference, evalnet_weights: str | Path,
                  train_features: str | Path) -> tuple[Tensor | None, EvalNet | None]:
    """The class ids the class modes are asked for (train frequencies, or exactly n / K each with
    evaluate.class_balance: uniform) and the classifier that checks them; (None, None) when no class
    mode runs or the shards carry no labels."""
    if not ref.classes or not any(m in CLASS_MODES for m in ev.modes):
        return None, None
    k = len(ref.classes)
    if ev.class_balance == "uniform":
        if ref.n % k:
            raise PipelineError(f"evaluate.n_samples={ref.n} is not a multiple of the {k} classes "
                                "(evaluate.class_balance: uniform asks for exactly n / K of each)")
        freq = torch.ones(k, dtype=torch.float64)
    else:
        freq = class_frequencies(ref.manifest, train_features)
    class_ids = class_ids_for(freq, ref.n, ev.seed)
    weights = Path(evalnet_weights)
    if not weights.exists():
        log.warning("%s missing: class accuracy of %s not measured", weights, CLASS_MODES)
        return class_ids, None
    classifier, meta = load_evalnet(weights)
    if meta.get("classes", ref.classes) != ref.classes:
        raise PipelineError(f"{weights}: trained on classes {meta.get('classes')}, shards have {ref.classes}")
    return class_ids, classifier


# --------------------------------------------------------------------------------------------------
# The generated side: one row per mode, streamed
# --------------------------------------------------------------------------------------------------


@dataclass
class Generated:
    """What one mode's images leave behind once scored: features, the first images, predictions."""

    features: Features
    grid: Tensor  # uint8, the first `evaluate.grid_size` images
    predictions: Tensor | None  # the classifier's class per image, when one was given


def generate_mode(gens: ModeSampler, mode: str, n: int, ev: EvaluateConfig, shape: tuple[int, int, int],
                  featurizer: Featurizer, *, class_ids: Tensor | None = None, reps: Tensor | None = None,
                  seed: int = 0, classifier: EvalNet | None = None, writer: Any = None) -> Generated:
    """`n` images of `mode`, generated in chunks and turned into features as they come, so memory
    holds one chunk of images at a time, whatever `n` is."""
    base = "rcg" if mode == "rcg_cfg" else mode  # rcg_cfg is the rcg mode with guidance
    scale = ev.cfg if mode == "rcg_cfg" else 0.0
    chunk = 10 * ev.batch_size
    grid, preds = [], []
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = gens.sample(base, m, class_ids=None if class_ids is None else class_ids[start : start + m],
                        reps=None if reps is None else reps[start : start + m], cfg=scale,
                        cfg_schedule=ev.cfg_schedule, steps=ev.sample_steps,
                        seed=seed + 1000 * i,  # a call uses seed and seed + 1 (rcg.generation's seeding)
                        batch_size=ev.batch_size, progress=True)
        if tuple(x.shape) != (m, *shape):
            raise PipelineError(f"mode {mode}: generator returned shape {tuple(x.shape)}, expected {(m, *shape)}")
        u8 = to_uint8(x)
        featurizer.add(u8)
        if classifier is not None:
            preds.append(classify(classifier, u8.float() / 255.0))
        if writer is not None:
            writer.add(u8)
        if sum(len(g) for g in grid) < ev.grid_size:
            grid.append(u8[: ev.grid_size - sum(len(g) for g in grid)])
    return Generated(featurizer.finish(), torch.cat(grid), torch.cat(preds) if preds else None)


def interpolation_strips(gens: ModeSampler, reps: Tensor, ev: EvaluateConfig, pairs: int = INTERP_PAIRS,
                         points: int = INTERP_POINTS) -> Tensor:
    """Paper Fig. 7: row j goes from reps[2j] to reps[2j + 1]; float [pairs * points, C, H, W]."""
    a, b = reps[0 : 2 * pairs : 2], reps[1 : 2 * pairs : 2]
    return gens.interpolate(a[: len(b)], b, points, seed=ev.seed, steps=ev.sample_steps, batch_size=ev.batch_size)


@dataclass
class Evaluation:
    """The protocol's outcome: the eval.json table and the figures (name -> images, grid columns)."""

    results: dict[str, Any]
    figures: dict[str, tuple[Tensor, int | None]] = field(default_factory=dict)


def evaluate_modes(gens: ModeSampler, ev: EvaluateConfig, data: DataConfig, *, evalnet_weights: str | Path,
                   features_dir: str | Path) -> Evaluation:
    """Score the floor and every mode of `ev.modes` (paper section 4); nothing is written here
    except, when evaluate.save_samples asks for them, the generated images."""
    check_modes(ev.modes)
    ref = reference_set(ev, data, evalnet_weights)
    floor = floor_metrics(ref, data, ev.cache_dir)
    class_ids, classifier = class_targets(ev, ref, evalnet_weights, Path(features_dir) / "train.parquet")
    out = Evaluation({
        "extractor": ref.extractor, "fd_is": DESCRIPTIONS[ref.extractor], "reference": ref.source,
        "n_samples": ref.n, "n_reference": ref.n_ref, "sample_steps": ev.sample_steps, "cfg": ev.cfg,
        "floor": floor, "modes": {}, "class_accuracy": {}, "skipped": skipped_modes(ev.modes, ref, gens),
    })
    if ref.extractor == EVALNET_SSL:
        out.results["skipped"]["is"] = "IS needs class probabilities; the evaluation network was trained without labels"
    if ref.stats is not None and ref.features is None:
        for metric in ("kid", "precision", "recall"):
            out.results["skipped"][metric] = f"{ref.source} holds no reference images (arr_0), only mu/sigma"
    reps_val = oracle_reps(Path(features_dir) / "val.parquet", ref.n, ev.seed) if "oracle" in ev.modes else None
    for mode in ev.modes:
        if mode in out.results["skipped"]:
            log.info("mode %s skipped: %s", mode, out.results["skipped"][mode])
            continue
        _score_mode(out, gens, mode, ev, data, ref, class_ids if mode in CLASS_MODES else None,
                    reps_val if mode == "oracle" else None, classifier if mode in CLASS_MODES else None)
    if reps_val is not None and len(reps_val) >= 2:
        out.figures["interpolation"] = (interpolation_strips(gens, reps_val, ev), INTERP_POINTS)
    return out


def _score_mode(out: Evaluation, gens: ModeSampler, mode: str, ev: EvaluateConfig, data: DataConfig,
                ref: Reference, class_ids: Tensor | None, reps: Tensor | None, classifier: EvalNet | None) -> None:
    """Generate, featurise and score one mode into `out` (its row, class accuracy and grid)."""
    from rcg.sampling import SampleWriter

    t0 = time.perf_counter()
    shape = (data.channels, data.image_size, data.image_size)
    writer = None
    if ev.save_samples != "none":
        writer = SampleWriter(Path(ev.samples_dir) / mode, ref.n, shape, png=ev.save_samples in ("png", "both"),
                              npz=ev.save_samples in ("npz", "both"))
    gen = generate_mode(gens, mode, ref.n, ev, shape, ref.featurizer, class_ids=class_ids, reps=reps,
                        seed=ev.seed, classifier=classifier, writer=writer)
    if writer is not None:
        writer.close()
    row = score_against(ref, gen.features)
    if gen.predictions is not None:
        acc = class_accuracy(gen.predictions, class_ids, ref.classes)
        out.results["class_accuracy"][mode] = acc
        row["class_accuracy"] = acc["overall"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    out.results["modes"][mode] = row
    out.figures[f"samples_{mode}"] = (gen.grid.float() / 255.0, None)
    log.info("mode %s: %s", mode, _fmt(row))


def skipped_modes(modes: list[str] | tuple[str, ...], ref: Reference, gens: ModeSampler) -> dict[str, str]:
    """The configured modes that cannot run on these data, each with its reason."""
    reasons = {}
    if not ref.classes:
        for mode in CLASS_MODES:
            reasons[mode] = "the shards carry no class labels"
    why = getattr(gens, "skipped", None)
    for mode in modes:
        if why is not None and mode not in reasons and why(mode):
            reasons[mode] = why(mode)
    return {m: r for m, r in reasons.items() if m in modes}


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in row.items())
