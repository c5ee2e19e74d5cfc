"""Sample-quality metrics through torch-fidelity: Frechet distance, IS, KID, precision and recall.

docs/paper.md#evaluation: the reference scores 50k samples with torch-fidelity against reference
statistics of real data. Here the real side (the val split) is featurised once per extractor and
cached under `evaluate.cache_dir` (a DVC output), named by a digest of everything it depends on,
so every mode and every later run reuses it; torch-fidelity's own `cache_root` +
`input2_cache_name` do the caching (0.4.0 has no `fid_statistics_file`).

Metric names say which extractor produced them: `fd` is the Frechet distance under the extractor
named beside it; it is FID only when that extractor is Inception.

torch-fidelity reads its cache entries (and extractor weights) with `torch.load(...,
weights_only=False)`, so a crafted `.pt` file in the cache folder would run code. Every call here
runs with torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD` set: those loads unpickle only tensors and the
float numpy arrays of the FID statistics, and an entry that needs more is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from numpy._core.multiarray import _reconstruct
from torch.utils.data import Dataset

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
    """A torch-fidelity cache entry name for real images: split, count and a digest of `parts`.

    `parts` must hold everything the features depend on (extractor weights digest, shard manifest,
    image size), so a retrained classifier or re-sharded data never reads a stale entry.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{split}-n{n}-{digest}"


# What torch-fidelity's FID statistics ({"mu", "sigma"}: float32/float64 ndarrays) need beyond
# tensors; object arrays stay refused (no ObjectDType).
NUMPY_ARRAYS = [np.ndarray, _reconstruct, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType]
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load honours it even over weights_only=False
NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # its opposite; torch refuses both at once


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs weights-only, whatever its caller asked (torch-fidelity asks for
    `weights_only=False`); float numpy arrays are allowed, as the FID statistics hold them."""
    saved = {k: os.environ.pop(k, None) for k in (FORCE_WEIGHTS_ONLY, NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unsafe_cache_entry(cache_root: str | Path, names: list[str | None]) -> Path | None:
    """The first torch-fidelity cache file of the entries `names` that does not load weights-only."""
    for name in filter(None, names):
        for path in sorted(Path(cache_root).glob(f"{name}-*.pt")):
            try:
                with weights_only_loads():
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                return path
    return None


@contextmanager
def cache_entries_named(cache_root: str | Path, names: list[str | None]) -> Iterator[None]:
    """A cache entry refused by `weights_only_loads` -> one line naming the file (torch does not)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        from rcg.io import weights_only_reason

        where = unsafe_cache_entry(cache_root, names) or Path(cache_root)
        raise PipelineError(f"{where}: a torch-fidelity cache entry this project cannot read safely "
                            f"({weights_only_reason(e)}); nothing in it was run; delete it to recompute") from None


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
    register_extractors()  # torch-fidelity's Inception reads its weights file weights-only from here on
    with weights_only_loads(), cache_entries_named(cache_root, [reference_cache, generated_cache]):
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
