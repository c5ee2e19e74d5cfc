"""Sample-quality metrics through torch-fidelity: Frechet distance, IS, KID, precision and recall.

docs/paper.md#evaluation: the reference scores 50k samples with torch-fidelity against reference
statistics of real data. Here the real side (the val split) is featurised once per extractor and
cached under `evaluate.cache_dir` (a DVC output), named by a digest of everything it depends on,
so every mode and every later run reuses it; torch-fidelity's own `cache_root` +
`input2_cache_name` do the caching (0.4.0 has no `fid_statistics_file`).

Metric names say which extractor produced them: `fd` is the Frechet distance under the extractor
named beside it; it is FID only when that extractor is Inception.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch.utils.data import Dataset

from rcg.config import DataConfig
from rcg.io import PipelineError

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
    """A torch-fidelity cache entry name for real images: split, count and a digest of `parts`.

    `parts` must hold everything the features depend on (extractor weights digest, shard manifest,
    image size), so a retrained classifier or re-sharded data never reads a stale entry.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{split}-n{n}-{digest}"


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
    verbose: bool = False,
) -> dict[str, float]:
    """FD, IS, KID, precision and recall of `generated` against `reference` under one extractor.

    Both datasets yield uint8 [3, H, W]. The reference's features and statistics are cached as
    `reference_cache` in `cache_root`; `generated_cache` caches input1 too (for real images such as
    the train-vs-val floor; leave None for generated samples). `feature_layers` overrides the
    extractor's default layer per metric ({"fid": "64", ...}; tests use it to keep Inception's
    2048 x 2048 covariance out of CPU runs). Returns this project's names (`METRIC_KEYS`).
    """
    n1, n2 = len(generated), len(reference)
    if min(n1, n2) < 2:
        raise PipelineError(f"need at least 2 images on each side, got {n1} and {n2}")
    raw = torch_fidelity.calculate_metrics(
        input1=generated,
        input2=reference,
        input1_cache_name=generated_cache,
        input2_cache_name=reference_cache,
        cache_root=str(cache_root),
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        isc=isc,  # IS needs class probabilities: off for an extractor without them
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=str(weights),
        isc_splits=min(10, n1),
        kid_subset_size=min(kid_subset_size, n1, n2),  # KID needs subsets no larger than each side
        prc_neighborhood=min(prc_neighborhood, n1 - 1, n2 - 1),
        save_cpu_ram=True,  # no DataLoader worker processes (2 cores), chunked distance matrices
        samples_shuffle=True,
        rng_seed=seed,
        verbose=verbose,
        **{f"feature_layer_{metric}": layer for metric, layer in (feature_layers or {}).items()},
    )
    return {ours: float(raw[theirs]) for theirs, ours in METRIC_KEYS.items() if theirs in raw}
