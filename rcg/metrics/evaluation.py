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
- `oracle`: the same generator on representations of real train images (paper Table 9a's oracle,
  as its authors describe it: the representations the generator was trained on);
- `oracle_val`: the same on representations of real val images; its gap to `oracle` says how far
  the generator has fitted its training representations rather than the representation space;
- `cluster`: the generator trained on k-means cluster ids of the train reps (rcg.clusters), given
  cluster ids with the train split's cluster frequencies (paper Table 9a's fourth row);
- `hypersphere`: the rep generator on samples of the hypersphere prior (rcg.priors) instead of
  the RDM's: what the RDM adds over the simplest prior with the right support;
- `contrastive`: the generator trained through the contrastive posterior (rcg.priors), on
  hypersphere samples.

`floor` scores N real train images the same way: the best any mode can do at this N. The
classifier's accuracy on `label` and `rcg_class` samples against the asked-for class measures
class-conditional quality (for `cluster`: against each cluster's majority class of train labels).
With `evaluate.seeds` every mode (or those of `evaluate.seed_modes`) is drawn once per seed, for
the spread of fd; with
`evaluate.cas_samples` each class-conditional mode's first images train a classifier tested on
real val images (rcg.metrics.cas). Sample grids and Fig. 7's interpolation strips come out as
figures; writing files and MLflow records is the stage's part (rcg/stages/evaluate.py).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rcg.clusters import read_cluster_meta
from rcg.config import DataConfig, EvaluateConfig
from rcg.data.loader import read_manifest
from rcg.features import read_features
from rcg.generation import ImageGenerator, RCGGenerator, RepGenerator
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
from rcg.priors import hypersphere

log = logging.getLogger(__name__)

MODES = ("uncond", "label", "rcg", "rcg_cfg", "rcg_class", "oracle", "oracle_val", "cluster", "hypersphere",
         "contrastive")
ORACLE_SPLITS = {"oracle": "train", "oracle_val": "val"}  # oracle modes -> the split whose real reps they get
CLASS_MODES = ("label", "rcg_class")  # modes that are asked for a class
CAS_MODES = ("label", "rcg_class", "cluster")  # class-conditional modes: their images train CAS classifiers
BASELINES = {"uncond": "none", "label": "label", "cluster": "cluster"}  # mode -> generator folder, sampled by label
GENERATOR_OF = {**BASELINES, "contrastive": "contrastive"}  # mode -> generator folder; the rest: rep
PRIOR_MODES = ("hypersphere", "contrastive")  # rep generators fed hypersphere samples
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

    # Mode `cluster` also asks `cluster_meta()` for the clustering's record (rcg.clusters.read_cluster_meta).


class ModeGenerators:
    """The trained generators behind the modes, each loaded from its folder on first use and kept."""

    def __init__(self, generator_dir: str | Path, rdm_dir: str | Path,
                 device: torch.device | str | None = None) -> None:
        self.generator_dir, self.rdm_dir, self.device = Path(generator_dir), Path(rdm_dir), device
        self._baselines: dict[str, ImageGenerator] = {}
        self._rcg: RCGGenerator | None = None

    def skipped(self, mode: str) -> str | None:
        """Why `mode` has no generator, if its training stage recorded a skip (else None)."""
        condition = GENERATOR_OF.get(mode, "rep")
        path = self.generator_dir / condition / "skipped.json"
        return str(read_json(path).get("reason", "skipped")) if path.exists() else None

    def baseline(self, condition: str) -> ImageGenerator:
        """The generator of `<generator_dir>/<condition>` (`none`, `label`, `cluster`, `rep`, ...)."""
        if condition not in self._baselines:
            self._baselines[condition] = ImageGenerator.load(self.generator_dir / condition, self.device)
        return self._baselines[condition]

    def rcg(self) -> RCGGenerator:
        """The RDM folder with `<generator_dir>/rep` (the one `baseline("rep")` loaded, if it did)."""
        if self._rcg is None:
            self._rcg = RCGGenerator(RepGenerator.load(self.rdm_dir, self.device), self.baseline("rep"))
        return self._rcg

    def cluster_meta(self) -> dict[str, Any]:
        """The `cluster` generator's clustering record (counts, majority classes)."""
        return read_cluster_meta(self.generator_dir / "cluster")

    def sample(self, mode: str, n: int, *, class_ids: Tensor | None = None, reps: Tensor | None = None,
               cfg: float = 0.0, cfg_schedule: str = "linear", steps: int | None = None, seed: int = 0,
               batch_size: int = 250, progress: bool = False) -> Tensor:
        """n images [n, C, H, W] in [0, 1] of `mode` (module docstring); `class_ids` [n] for the class
        modes (cluster ids for `cluster`), `reps` [n, D] for the oracle modes; `rcg_cfg` is `rcg` with the
        caller's guidance `cfg`. The prior modes draw their reps from `seed` (rcg.priors.hypersphere)
        and the images from seed + 1, as RCG draws RDM samples (rcg.generation's seeding)."""
        check_modes([mode])
        if mode in (*CLASS_MODES, "cluster") and class_ids is None:
            raise PipelineError(f"mode {mode!r} needs class_ids")
        kw: dict[str, Any] = dict(cfg=cfg, cfg_schedule=cfg_schedule, steps=steps, seed=seed,
                                  batch_size=batch_size, progress=progress)
        if mode in BASELINES:
            return self.baseline(BASELINES[mode]).sample(n, label=class_ids if mode != "uncond" else None, **kw)
        if mode in PRIOR_MODES:
            image = self.baseline(GENERATOR_OF.get(mode, "rep"))
            return image.sample(n, rep=hypersphere(n, int(image.meta["kwargs"]["rep_dim"]), seed=seed), **kw)
        if mode in ORACLE_SPLITS:
            if reps is None or reps.shape[0] != n:
                raise PipelineError(f"mode {mode!r} needs reps with {n} rows")
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


def oracle_pool(features: str | Path) -> Tensor:
    """Every representation (original view) of one split's features file: what the oracle modes draw from."""
    reps = read_features(Path(features), view="orig").reps
    if len(reps) == 0:
        raise PipelineError(f"{features}: no representations for the oracle modes")
    return reps


def oracle_reps(pool: Tensor, n: int, seed: int) -> Tensor:
    """`n` representations of `pool` (oracle_pool), drawn without replacement if possible."""
    g = torch.Generator().manual_seed(seed)
    if n <= len(pool):
        idx = torch.randperm(len(pool), generator=g)[:n]
    else:
        idx = torch.randint(len(pool), (n,), generator=g)
    return pool[idx].clone()


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
    return class_ids_for(freq, ref.n, ev.seed), load_classifier(ref, evalnet_weights, CLASS_MODES)


def load_classifier(ref: Reference, evalnet_weights: str | Path, modes: tuple[str, ...]) -> EvalNet | None:
    """The evaluation classifier, checked against the shards' classes; None (with a warning naming
    `modes`, whose class accuracy goes unmeasured) when its file is missing."""
    weights = Path(evalnet_weights)
    if not weights.exists():
        log.warning("%s missing: class accuracy of %s not measured", weights, modes)
        return None
    classifier, meta = load_evalnet(weights)
    if meta.get("classes", ref.classes) != ref.classes:
        raise PipelineError(f"{weights}: trained on classes {meta.get('classes')}, shards have {ref.classes}")
    return classifier



def cluster_targets(meta: dict[str, Any], n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """`n` cluster ids with the train split's cluster frequencies (`class_ids_for`), and each
    cluster's majority class of train labels [k] (-1 for none; None when the images are unlabelled):
    what the classifier and CAS hold mode `cluster`'s images to."""
    ids = class_ids_for(torch.as_tensor(meta["counts"], dtype=torch.float64), n, seed)
    majority = meta.get("majority_class")
    classes = None if majority is None else torch.as_tensor([-1 if c is None else c for c in majority])
    return ids, classes


@dataclass
class Targets:
    """What one draw (one seed) asks the modes for."""

    class_ids: Tensor | None = None  # label, rcg_class
    cluster_ids: Tensor | None = None  # cluster
    cluster_classes: Tensor | None = None  # [k]: each cluster's majority class
    reps: dict[str, Tensor] = field(default_factory=dict)  # oracle modes: real train / val reps

    def ids(self, mode: str) -> Tensor | None:
        """The ids `mode` is given: classes, clusters or none."""
        return self.class_ids if mode in CLASS_MODES else self.cluster_ids if mode == "cluster" else None

    def classes(self, mode: str) -> Tensor | None:
        """The class each of `mode`'s images should show (clusters: their majority class), or None."""
        if mode == "cluster":
            if self.cluster_ids is None or self.cluster_classes is None:
                return None
            return self.cluster_classes[self.cluster_ids]
        return self.ids(mode)


def draw_targets(ev: EvaluateConfig, ref: Reference, gens: ModeSampler, modes: list[str], evalnet_weights: str | Path,
                 features_dir: str | Path, pools: dict[str, Tensor] | None = None) -> tuple[Targets, EvalNet | None]:
    """The targets of the draw with seed `ev.seed` and the classifier that checks the class modes.
    `pools` keeps the oracle splits' representations (oracle_pool) from one seed's draw to the next."""
    class_ids, classifier = class_targets(ev, ref, evalnet_weights, Path(features_dir) / "train.parquet")
    t = Targets(class_ids=class_ids)
    if "cluster" in modes:
        meta = getattr(gens, "cluster_meta", None)
        if meta is None:
            raise PipelineError("mode cluster needs the clustering of its generator (cluster_meta)")
        t.cluster_ids, t.cluster_classes = cluster_targets(meta(), ref.n, ev.seed)
        if classifier is None and ref.classes and t.cluster_classes is not None:
            classifier = load_classifier(ref, evalnet_weights, ("cluster",))
    pools = {} if pools is None else pools
    for mode in modes:
        if mode in ORACLE_SPLITS:
            split = ORACLE_SPLITS[mode]
            if split not in pools:
                pools[split] = oracle_pool(Path(features_dir) / f"{split}.parquet")
            t.reps[mode] = oracle_reps(pools[split], ref.n, ev.seed)
    return t, classifier


# --------------------------------------------------------------------------------------------------
# The generated side: one row per mode, streamed
# --------------------------------------------------------------------------------------------------


@dataclass
class Generated:
    """What one mode's images leave behind once scored: features, the first images, predictions."""

    features: Features
    grid: Tensor  # uint8, the first `evaluate.grid_size` images
    predictions: Tensor | None  # the classifier's class per image, when one was given
    kept: Tensor | None = None  # uint8, the first `keep` images (CAS's training set)


def generate_mode(gens: ModeSampler, mode: str, n: int, ev: EvaluateConfig, shape: tuple[int, int, int],
                  featurizer: Featurizer, *, class_ids: Tensor | None = None, reps: Tensor | None = None,
                  seed: int = 0, classifier: EvalNet | None = None, writer: Any = None, keep: int = 0) -> Generated:
    """`n` images of `mode`, generated in chunks and turned into features as they come, so memory
    holds one chunk of images at a time, whatever `n` is (and the first `keep` images)."""
    base = "rcg" if mode == "rcg_cfg" else mode  # rcg_cfg is the rcg mode with guidance
    scale = ev.cfg if mode == "rcg_cfg" else 0.0
    chunk = 10 * ev.batch_size
    grid, preds, kept = [], [], []
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
        if start < keep:
            kept.append(u8[: keep - start])
    return Generated(featurizer.finish(), torch.cat(grid), torch.cat(preds) if preds else None,
                     torch.cat(kept) if kept else None)


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
    # CAS's training sets: mode -> (the first images, the class each should show)
    cas_sets: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def evaluate_modes(gens: ModeSampler, ev: EvaluateConfig, data: DataConfig, *, evalnet_weights: str | Path,
                   features_dir: str | Path) -> Evaluation:
    """Score the floor and every mode of `ev.modes` (paper section 4), once per seed of `ev.seeds`,
    then CAS; nothing is written here except, when evaluate.save_samples asks for them, the
    generated images (of the first seed)."""
    check_modes(ev.modes)
    ref = reference_set(ev, data, evalnet_weights)
    floor = floor_metrics(ref, data, ev.cache_dir)
    out = Evaluation({
        "extractor": ref.extractor, "fd_is": DESCRIPTIONS[ref.extractor], "reference": ref.source,
        "n_samples": ref.n, "n_reference": ref.n_ref, "sample_steps": ev.sample_steps, "cfg": ev.cfg,
        "seeds": list(ev.seeds), "floor": floor, "modes": {}, "class_accuracy": {},
        "skipped": skipped_modes(ev.modes, ref, gens),
    })
    if ref.extractor == EVALNET_SSL:
        out.results["skipped"]["is"] = "IS needs class probabilities; the evaluation network was trained without labels"
    if ref.stats is not None and ref.features is None:
        for metric in ("kid", "precision", "recall"):
            out.results["skipped"][metric] = f"{ref.source} holds no reference images (arr_0), only mu/sigma"
    for mode in ev.modes:
        if mode in out.results["skipped"]:
            log.info("mode %s skipped: %s", mode, out.results["skipped"][mode])
    modes = [m for m in ev.modes if m not in out.results["skipped"]]
    again = [m for m in modes if m in ev.seed_modes] if ev.seed_modes else modes
    pools: dict[str, Tensor] = {}  # the oracle splits' reps, read once for every seed
    for j, offset in enumerate(ev.seeds):
        draw = dataclasses.replace(ev, seed=ev.seed + offset)
        drawn = modes if j == 0 else again
        targets, classifier = draw_targets(draw, ref, gens, drawn, evalnet_weights, features_dir, pools)
        for mode in drawn:
            if j == 0:
                _score_mode(out, gens, mode, draw, data, ref, targets, classifier)
            else:
                _score_again(out, gens, mode, draw, data, ref, targets, offset)
        strip_reps = targets.reps.get("oracle_val", targets.reps.get("oracle"))
        if j == 0 and strip_reps is not None and len(strip_reps) >= 2:
            out.figures["interpolation"] = (interpolation_strips(gens, strip_reps, draw), INTERP_POINTS)
    summarise_seeds(out.results["modes"], list(ev.seeds))
    _cas(out, ev, data, ref, evalnet_weights)
    return out


def _score_mode(out: Evaluation, gens: ModeSampler, mode: str, ev: EvaluateConfig, data: DataConfig,
                ref: Reference, targets: Targets, classifier: EvalNet | None) -> None:
    """Generate, featurise and score one mode into `out` (its row, class accuracy, grid, CAS set)."""
    from rcg.sampling import SampleWriter

    t0 = time.perf_counter()
    shape = (data.channels, data.image_size, data.image_size)
    writer = None
    if ev.save_samples != "none":
        writer = SampleWriter(Path(ev.samples_dir) / mode, ref.n, shape, png=ev.save_samples in ("png", "both"),
                              npz=ev.save_samples in ("npz", "both"))
    want = targets.classes(mode)  # the class each image should show (class modes, cluster)
    keep = min(ev.cas_samples, ref.n) if mode in CAS_MODES and want is not None and ref.classes else 0
    gen = generate_mode(gens, mode, ref.n, ev, shape, ref.featurizer, class_ids=targets.ids(mode),
                        reps=targets.reps.get(mode), seed=ev.seed,
                        classifier=classifier if want is not None else None, writer=writer, keep=keep)
    if writer is not None:
        writer.close()
    row = score_against(ref, gen.features)
    if gen.predictions is not None and want is not None:
        acc = class_accuracy(gen.predictions, want, ref.classes)
        out.results["class_accuracy"][mode] = acc
        row["class_accuracy"] = acc["overall"]
    if gen.kept is not None:
        out.cas_sets[mode] = (gen.kept, want[: len(gen.kept)])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    out.results["modes"][mode] = row
    out.figures[f"samples_{mode}"] = (gen.grid.float() / 255.0, None)
    log.info("mode %s: %s", mode, _fmt(row))


def _score_again(out: Evaluation, gens: ModeSampler, mode: str, ev: EvaluateConfig, data: DataConfig,
                 ref: Reference, targets: Targets, offset: int) -> None:
    """Another draw of `mode` (seed `ev.seed`): its fd goes into the row as `fd_seed_<offset>`."""
    shape = (data.channels, data.image_size, data.image_size)
    gen = generate_mode(gens, mode, ref.n, ev, shape, ref.featurizer, class_ids=targets.ids(mode),
                        reps=targets.reps.get(mode), seed=ev.seed)
    fd = score_against(ref, gen.features)["fd"]
    out.results["modes"][mode][f"fd_seed_{offset}"] = fd
    log.info("mode %s, seed %d: fd=%.4g", mode, ev.seed, fd)


def summarise_seeds(rows: dict[str, dict[str, Any]], seeds: list[int]) -> None:
    """With more than one seed, each row gets `fd_seed_<first>` (its own fd), `fd_mean` and `fd_std`
    (the sample standard deviation over the seeds); with one, the rows stay as they are."""
    if len(seeds) < 2:
        return
    for row in rows.values():
        if not all(f"fd_seed_{s}" in row for s in seeds[1:]):
            continue  # drawn once (not in evaluate.seed_modes)
        row[f"fd_seed_{seeds[0]}"] = row["fd"]
        fds = [float(row[f"fd_seed_{s}"]) for s in seeds]
        row["fd_mean"], row["fd_std"] = statistics.fmean(fds), statistics.stdev(fds)


def _cas(out: Evaluation, ev: EvaluateConfig, data: DataConfig, ref: Reference, evalnet_weights: str | Path) -> None:
    """CAS of the class-conditional modes scored (rcg.metrics.cas) into `out`, or the reason it is not."""
    from rcg.metrics.cas import cas_table

    asked = [m for m in CAS_MODES if m in out.results["modes"]]
    if ev.cas_samples == 0 or not asked:
        return
    if not ref.classes:
        out.results["skipped"]["cas"] = "CAS tests a classifier on labelled val images; the shards carry no labels"
        return
    if not Path(evalnet_weights).exists() or not out.cas_sets:
        out.results["skipped"]["cas"] = f"{evalnet_weights} (the classifier's architecture) is missing"
        return
    table = cas_table(out.cas_sets, ev, data, evalnet_weights, ref.classes)
    out.results["cas"] = table
    for mode, acc in table["modes"].items():
        out.results["modes"][mode]["cas"] = acc


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
