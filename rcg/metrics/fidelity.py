"""Sample-quality metrics through torch-fidelity: Frechet distance, IS, KID, precision and recall.

docs/paper.md#evaluation: the reference scores 50k samples with torch-fidelity against reference
statistics of real data. Images are turned into features as they arrive, batch by batch
(`Featurizer`, torch-fidelity's own feature extractors), so memory holds features, never the
images of a whole mode: 50k ImageNet samples are ~10 GB as pixels and ~0.6 GB as Inception
features. The metrics are torch-fidelity's own functions over those features (`score`). Real
images' features are cached under `evaluate.cache_dir` (a DVC output), named by a digest of
everything they depend on, and read back weights-only (tensors only: a crafted file runs nothing).

Metric names say which extractor produced them: `fd` is the Frechet distance under the extractor
named beside it; it is FID only when that extractor is Inception.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from rcg.config import DataConfig
from rcg.io import PipelineError
from rcg.metrics.extractors import register_extractors

log = logging.getLogger(__name__)

METRIC_KEYS = {  # torch-fidelity key -> the name this project reports
    "frechet_inception_distance": "fd",  # torch-fidelity's name whatever the extractor
    "inception_score_mean": "is",
    "inception_score_std": "is_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with rounding (exact for real 8-bit images read back)."""
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()


class UInt8Images(Dataset):
    """A fixed set of uint8 [N, C, H, W] images, served as torch-fidelity wants: uint8 [3, H, W]."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


class LazyImages(Dataset):
    """Images loaded only when torch-fidelity first reads them (never, when its cache hits)."""

    def __init__(self, n: int, load: Callable[[], torch.Tensor]) -> None:
        self.n, self._load, self._data = n, load, None

    def _images(self) -> UInt8Images:
        if self._data is None:
            images = self._load()
            if len(images) != self.n:
                raise PipelineError(f"expected {self.n} real images, read {len(images)}")
            self._data = UInt8Images(images)
        return self._data

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._images()[i]


def read_real_images(
    data_cfg: DataConfig, split: str, n: int = 0, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of `split` (0: all) in shard order as uint8, with their labels."""
    from rcg.data.loader import make_loader

    images, labels, have = [], [], 0
    for batch in make_loader(data_cfg, split, "once", batch_size=batch_size):
        images.append(to_uint8(batch["image"]))
        labels.append(batch["label"])
        have += len(batch["label"])
        if n and have >= n:
            break
    if not images:
        raise PipelineError(f"{data_cfg.shards_dir}/{split}: no images")
    x, y = torch.cat(images), torch.cat(labels)
    if n:
        if len(x) < n:
            raise PipelineError(f"{data_cfg.shards_dir}/{split}: {len(x)} images, {n} needed")
        x, y = x[:n], y[:n]
    return x, y


def cache_name(split: str, n: int, *parts: Any) -> str:
    """A cache entry name for real images' features: split, count and a digest of `parts`.

    `parts` must hold everything the features depend on (extractor weights digest, shard manifest,
    image size), so a retrained classifier or re-sharded data never reads a stale entry.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{split}-n{n}-{digest}"


Features = dict[str, torch.Tensor]  # feature layer -> [N, d]
PRC_BLOCK = 100_000_000  # entries of one block of precision/recall's distance matrices


class Featurizer:
    """torch-fidelity's feature extractor `name`, fed batch by batch (module docstring).

    Images (uint8 [B, 1|3, H, W], any B) are buffered into batches of `batch_size`, so the extractor
    sees the same batches however the images arrive; `finish` returns every layer's features.
    `layers` maps each metric (isc, fid, kid, prc) to its feature layer; by default the extractor's
    own choice (Inception: 2048-d pool features and logits, as FID and IS define them).
    """

    def __init__(self, name: str, weights: str | Path, batch_size: int = 200,
                 layers: dict[str, str] | None = None, device: torch.device | None = None, isc: bool = True) -> None:
        register_extractors()  # the project's extractors, and the weights-only Inception
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        metrics = ("isc", "fid", "kid", "prc") if isc else ("fid", "kid", "prc")  # IS needs class logits
        self.layers = {m: (layers or {}).get(m) or cls.get_default_feature_layer_for_metric(m) for m in metrics}
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.fe = create_feature_extractor(name, sorted(set(self.layers.values())), cuda=self.device.type == "cuda",
                                           feature_extractor_weights_path=str(weights), verbose=False)
        self.name, self.batch_size = name, batch_size
        self._pending: list[torch.Tensor] = []
        self._parts: dict[str, list[torch.Tensor]] = {}
        self.n = 0

    def add(self, images: torch.Tensor) -> None:
        """Queue images; every full batch is turned into features at once."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
        self._pending.append(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)
        queued = torch.cat(self._pending)
        full = len(queued) - len(queued) % self.batch_size
        for i in range(0, full, self.batch_size):
            self._extract(queued[i : i + self.batch_size])
        self._pending = [queued[full:]] if full < len(queued) else []

    @torch.no_grad()
    def _extract(self, batch: torch.Tensor) -> None:
        out = self.fe.convert_features_tuple_to_dict(self.fe(batch.contiguous().to(self.device)))
        for k, v in out.items():
            self._parts.setdefault(k, []).append(v.cpu())
        self.n += len(batch)

    def finish(self) -> Features:
        """Features of every image added, in order; the featurizer is empty again afterwards."""
        if self._pending:
            self._extract(torch.cat(self._pending))
        out = {k: torch.cat(v) for k, v in self._parts.items()}
        self._pending, self._parts, self.n = [], {}, 0
        return out

    def features(self, batches: Iterable[torch.Tensor]) -> Features:
        """Features of every image of `batches` (an iterator of uint8 batches: nothing is kept)."""
        for images in batches:
            self.add(images)
        return self.finish()


def cached_features(fz: Featurizer, cache_dir: str | Path, name: str,
                    batches: Callable[[], Iterable[torch.Tensor]]) -> Features:
    """Real images' features, read from `<cache_dir>/<name>.pt` or computed from `batches()` and
    written there; the file holds tensors only and is read weights-only (a crafted one runs nothing)."""
    from rcg.io import atomic_path, weights_only_reason

    path = Path(cache_dir) / f"{name}.pt"
    if path.exists():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PipelineError(f"{path}: a feature cache entry this project cannot read safely "
                                f"({weights_only_reason(e)}); nothing in it was run; delete it to recompute") from None
        if isinstance(feats, dict) and all(torch.is_tensor(v) for v in feats.values()):
            return feats
        raise PipelineError(f"{path}: not a feature cache entry (expected tensors by layer); delete it to recompute")
    feats = fz.features(batches())
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats


def score(generated: Features, reference: Features | None, layers: dict[str, str], *, isc: bool = True,
          reference_stats: dict[str, np.ndarray] | None = None, kid_subset_size: int = 1000,
          prc_neighborhood: int = 3, seed: int = 0) -> dict[str, float]:
    """FD (against `reference_stats` {mu, sigma} when given, else the reference's features), IS,
    KID and precision/recall (when reference features exist), by torch-fidelity's own functions."""
    n1 = len(generated[layers["fid"]])
    n2 = len(reference[layers["fid"]]) if reference is not None else n1
    if min(n1, n2) < 2:
        raise PipelineError(f"need at least 2 images on each side, got {n1} and {n2}")
    kw = dict(isc_splits=min(10, n1), samples_shuffle=True, rng_seed=seed, verbose=False,
              kid_subset_size=min(kid_subset_size, n1, n2),  # KID needs subsets no larger than each side
              prc_neighborhood=min(prc_neighborhood, n1 - 1, n2 - 1),
              # precision/recall's distance matrices in blocks of at most PRC_BLOCK entries (~400 MB),
              # so their memory stays flat in the sample count (one block up to 10k x 10k samples)
              save_cpu_ram=True, prc_batch_size=max(256, PRC_BLOCK // max(n1, n2)))
    raw: dict[str, Any] = {}
    if isc:
        raw.update(isc_featuresdict_to_metric(generated, layers["isc"], **kw))
    stats_gen = fid_featuresdict_to_statistics(generated, layers["fid"])
    if reference_stats is not None:  # a file's statistics (ADM's are float64): compare in float64
        stats_gen = {k: np.asarray(v, np.float64) for k, v in stats_gen.items()}
        stats_ref = {k: np.asarray(reference_stats[k], np.float64) for k in ("mu", "sigma")}
    else:
        stats_ref = fid_featuresdict_to_statistics(reference, layers["fid"])
    raw.update(fid_statistics_to_metric(stats_gen, stats_ref, False))
    if reference is not None:
        raw.update(kid_featuresdict_to_metric(generated, reference, layers["kid"], **kw))
        raw.update(prc_featuresdict_to_metric(generated, reference, layers["prc"], **kw))
    return {ours: float(raw[theirs]) for theirs, ours in METRIC_KEYS.items() if theirs in raw}


def dataset_batches(ds: Dataset, batch_size: int) -> Iterable[torch.Tensor]:
    """A Dataset of uint8 [C, H, W] images as uint8 batches, in order."""
    for i in range(0, len(ds), batch_size):
        yield torch.stack([ds[j] for j in range(i, min(i + batch_size, len(ds)))])


def fidelity_metrics(
    generated: Dataset,
    reference: Dataset,
    *,
    extractor: str,
    weights: str | Path,
    cache_root: str | Path,
    reference_cache: str,
    generated_cache: str | None = None,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    batch_size: int = 200,
    seed: int = 0,
    feature_layers: dict[str, str] | None = None,
    isc: bool = True,
) -> dict[str, float]:
    """FD, IS, KID, precision and recall of two image sets under one extractor (both Datasets of
    uint8 [C, H, W]); the reference's features are cached as `reference_cache` in `cache_root`,
    the generated side's as `generated_cache` when given (real images, e.g. the floor).
    `feature_layers` overrides the extractor's layer per metric ({"fid": "64", ...})."""
    if min(len(generated), len(reference)) < 2:
        raise PipelineError(f"need at least 2 images on each side, got {len(generated)} and {len(reference)}")
    fz = Featurizer(extractor, weights, batch_size, feature_layers, isc=isc)
    ref = cached_features(fz, cache_root, f"{reference_cache}-{extractor}", lambda: dataset_batches(reference, batch_size))
    if generated_cache:
        gen = cached_features(fz, cache_root, f"{generated_cache}-{extractor}",
                              lambda: dataset_batches(generated, batch_size))
    else:
        gen = fz.features(dataset_batches(generated, batch_size))
    return score(gen, ref, fz.layers, isc=isc, kid_subset_size=kid_subset_size,
                 prc_neighborhood=prc_neighborhood, seed=seed)


def read_reference_stats(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """ADM's reference batch (`mu`, `sigma` of Inception pool features; `arr_0`, reference images
    NHWC uint8; also `mu_s`/`sigma_s`, unused) or MAR's stats file (`mu`, `sigma` only):
    ({"mu", "sigma"}, arr_0 or None). Read without pickles; a missing key is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"evaluate.reference_stats: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise PipelineError(f"{path}: not a reference statistics file: missing {', '.join(missing)} "
                                    f"(has {', '.join(sorted(keys)) or 'nothing'}; expected mu, sigma and optionally arr_0)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            images = f["arr_0"] if "arr_0" in keys else None
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: not a readable .npz file ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise PipelineError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3)):
        raise PipelineError(f"{path}: arr_0 must hold uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    return {"mu": mu, "sigma": sigma}, images


def check_stats_match(stats: dict[str, np.ndarray], features: Features, layer: str, path: str | Path) -> None:
    """The statistics must be of the feature layer FD is computed on (e.g. Inception's 2048-d pool)."""
    d = features[layer].shape[1]
    if len(stats["mu"]) != d:
        raise PipelineError(f"{path}: statistics of {len(stats['mu'])}-d features, but the extractor's FD layer "
                            f"{layer!r} has {d} dimensions (ADM's reference statistics need evaluate.extractor: "
                            "inception)")
