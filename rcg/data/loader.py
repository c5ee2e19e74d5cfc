"""The one shard reader every stage shares (WebDataset), in two modes.

- `once`: every sample exactly once across DDP ranks and DataLoader workers (shards are split by
  node, then by worker, never shuffled): encoding and evaluation.
- `train`: an endless stream of resampled shards with an in-memory shuffle buffer; each rank and
  worker draws with its own seed, derived from the caller's, so a run is reproducible. Training
  loops count steps, not epochs, and pass seed + the step they resume from, so that a resumed run
  draws fresh samples instead of replaying the start of the stream.

Batches are dicts: {"key": list[str], "image": float [B, C, H, W] in [0, 1], "label": int64 [B]},
with label -1 for unlabelled samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from rcg.config import DataConfig
from rcg.data.images import decode, decode_plain_png, resize_crop, to_pixels, to_unit
from rcg.io import PipelineError, file_digest, read_json
from rcg.training import DistInfo

Transform = Callable[[torch.Tensor], torch.Tensor]


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The shard stage's manifest.json (counts, classes, skipped files)."""
    path = Path(shards_dir) / "manifest.json"
    if not path.exists():
        raise PipelineError(f"{path}: no shard manifest (run `rcg shard` first)")
    return read_json(path)


def shards_id(shards_dir: str | Path) -> str:
    """A digest of the shard manifest (source, splits, shard files): which data a training stage
    read. Resume fingerprints include it, so a checkpoint is not resumed on re-sharded data."""
    return file_digest(Path(shards_dir) / "manifest.json")


def shard_urls(shards_dir: str | Path, split: str) -> list[str]:
    """The split's shard files in order; an error naming the folder when there are none."""
    folder = Path(shards_dir) / split
    urls = sorted(str(p) for p in folder.glob(f"{split}-*.tar"))
    if not urls:
        raise PipelineError(f"{folder}: no shards for split {split!r} (run `rcg shard` first)")
    return urls


class _Decode:
    """Shard sample -> {"key", "image", "label"}; a picklable callable for DataLoader workers."""

    def __init__(self, size: int, channels: int, random_crop: bool, transform: Transform | None):
        self.size, self.channels, self.random_crop, self.transform = size, channels, random_crop, transform
        self._rng: np.random.Generator | None = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = sample.get("png", sample.get("jpg"))
        if data is None:
            raise PipelineError(f"{sample.get('__url__')}: sample {sample['__key__']} has no image")
        if self.random_crop and self._rng is None:
            # Seeded from torch's per-worker seed, so workers differ but runs are reproducible.
            self._rng = np.random.default_rng(torch.initial_seed() % 2**32)
        image = decode_plain_png(data, self.channels, self.size)  # the common case, decoded fast
        if image is None:
            img = resize_crop(decode(data, self.channels), self.size, self._rng if self.random_crop else None)
            image = to_pixels(img)
        if self.transform is not None:
            image = self.transform(to_unit(image))
        cls = sample.get("cls")
        label = int(cls) if cls is not None else -1
        return {"key": sample["__key__"], "image": image, "label": label}


class _WorkerShuffle:
    """WebDataset's shuffle buffer with an rng seeded by (seed, rank, worker) when iteration starts."""

    def __init__(self, buffer: int, seed: int) -> None:
        self.buffer, self.seed = buffer, seed

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        rng = random.Random(wds.utils.make_seed(self.seed, wds.utils.pytorch_worker_seed()))
        return wds.shuffle(self.buffer, rng=rng)(src)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.stack([s["image"] for s in samples])  # uint8 pixels, or floats from a transform
    return {
        "key": [s["key"] for s in samples],
        "image": to_unit(images) if images.dtype == torch.uint8 else images,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }


def image_dataset(
    data_cfg: DataConfig,
    split: str,
    mode: Literal["once", "train"],
    transform: Transform | None = None,
    seed: int = 0,
) -> wds.DataPipeline:
    """The per-sample WebDataset pipeline for `split` (see the module docstring for the modes)."""
    urls = shard_urls(data_cfg.shards_dir, split)
    dec = _Decode(data_cfg.image_size, data_cfg.channels, random_crop=(mode == "train"), transform=transform)
    if mode == "once":
        ds = wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a worker may get no shard when shards < workers x ranks
        )
    elif mode == "train":
        # Built from parts because webdataset 1.0's WebDataset(resampled=True, seed=...) ignores the
        # seed and, like .shuffle(), seeds itself from the clock, pid and os.urandom: no two runs saw
        # the same samples. ResampledShards(deterministic=True) mixes seed, rank and worker instead.
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(),
            _WorkerShuffle(data_cfg.shuffle_buffer, seed),
            wds.map(dec),
        )
    else:
        raise ValueError(f"mode must be 'once' or 'train', got {mode!r}")
    return ds.map(dec)


def make_loader(
    data_cfg: DataConfig,
    split: str,
    mode: Literal["once", "train"],
    batch_size: int,
    transform: Transform | None = None,
    info: DistInfo | None = None,
    drop_last: bool | None = None,
    num_workers: int | None = None,
    seed: int = 0,
) -> Iterable[dict[str, Any]]:
    """A DataLoader over the shards of `split` yielding dict batches (module docstring).

    `seed` picks the `train` stream (shards, shuffle); crops use torch's per-worker seed.

    `info` is accepted for symmetry with the training code; rank and world size are read from
    torch.distributed by WebDataset's node splitter. `drop_last` defaults to True in `train` mode
    (equal batch shapes for DDP) and False in `once` mode (nothing may be lost).
    """
    del info  # splitting by node reads torch.distributed directly
    workers = data_cfg.num_workers if num_workers is None else num_workers
    ds = image_dataset(data_cfg, split, mode, transform, seed)
    drop = (mode == "train") if drop_last is None else drop_last
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        drop_last=drop,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
