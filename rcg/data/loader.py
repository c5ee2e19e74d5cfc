"""The one shard reader every stage shares (WebDataset), in two modes.

- `once`: every sample exactly once across DDP ranks and DataLoader workers (shards are split by
  node, then by worker, never shuffled): encoding and evaluation.
- `train`: an endless stream of resampled shards with an in-memory shuffle buffer; each rank and
  worker draws with its own seed, derived from the caller's, so a run is reproducible. A run
  resumed at step k asks for the stream with `skip_batches=k`: every worker replays its share of the
  first k batches without decoding them (tar reading only), so the resumed run sees exactly the
  batches an uninterrupted run would have seen. Past `data.resume_replay_max` samples per worker the
  replay would cost too much reading (ImageNet-sized runs): the stream is then reseeded at k, which
  keeps the data fresh but not identical, and the log says so.

Batches are dicts: {"key": list[str], "image": float [B, C, H, W] in [0, 1], "label": int64 [B]},
with label -1 for unlabelled samples. With `data.decode_device: cuda` the `train` streams decode
their JPEGs on the GPU (rcg.data.gpu_decode) and their images arrive there; on CUDA the batches are
in pinned memory either way, so a `.to(device, non_blocking=True)` overlaps the copy with compute.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from rcg.config import DataConfig
from rcg.data import gpu_decode
from rcg.data.images import decode, decode_plain_png, resize_crop, to_pixels, to_unit
from rcg.io import PipelineError, file_digest, read_json

log = logging.getLogger(__name__)

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
    """The split's shard files, as the manifest lists them (so no other file in the folder is ever
    read as data); an error naming the folder when there are none."""
    folder = Path(shards_dir) / split
    manifest = Path(shards_dir) / "manifest.json"
    names = read_json(manifest).get("splits", {}).get(split, {}).get("shards", []) if manifest.exists() else []
    if not names:
        raise PipelineError(f"{folder}: no shards for split {split!r} (run `rcg shard` first)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise PipelineError(f"{folder}: shards listed in the manifest are missing: {', '.join(missing[:5])} "
                            "(rerun `rcg shard`)")
    return [str(folder / n) for n in names]


class _Decode:
    """Shard sample -> {"key", "image", "label"}; a picklable callable for DataLoader workers."""

    def __init__(self, size: int, channels: int, random_crop: bool, transform: Transform | None, seed: int = 0,
                 defer_jpeg: bool = False):
        self.size, self.channels, self.random_crop, self.transform = size, channels, random_crop, transform
        self.seed, self.defer_jpeg = seed, defer_jpeg

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = sample.get("png", sample.get("jpg"))
        if data is None:
            raise PipelineError(f"{sample.get('__url__')}: sample {sample['__key__']} has no image")
        cls = sample.get("cls")
        label = int(cls) if cls is not None else -1
        if self.defer_jpeg and "png" not in sample:  # decoded on the GPU (rcg.data.gpu_decode)
            return {"key": sample["__key__"], "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    "place": sample.get("__place__"), "label": label}
        image = decode_plain_png(data, self.channels, self.size)  # the common case, decoded fast
        if image is None:
            # A crop's randomness is a function of the sample's place in the stream, so a replayed
            # (resumed) stream crops exactly as the first pass did.
            rng = np.random.default_rng([self.seed, *sample["__place__"]]) if self.random_crop else None
            image = to_pixels(resize_crop(decode(data, self.channels), self.size, rng))
        if self.transform is not None:
            image = self.transform(to_unit(image))
        return {"key": sample["__key__"], "image": image, "label": label}


class _StreamOf:
    """Which worker's stream this DataLoader worker produces: (rank, stream index, workers).

    DataLoader hands batch i of an iterator to worker i % W, starting again at worker 0 for every new
    iterator. A run resumed after k batches must see next the batch that stream k % W would have
    served, so worker w of the new iterator plays stream (w + k) % W. Without a resume this is the
    worker's own index, and the seeds are WebDataset's usual (rank * 1000 + worker).
    """

    def __init__(self, skip_batches: int) -> None:
        self.skip_batches = skip_batches

    def __call__(self) -> tuple[int, int, int]:
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        workers = max(1, workers)
        return rank, (worker + self.skip_batches) % workers, workers

    def seed(self) -> int:
        rank, stream, _ = self()
        return rank * 1000 + stream


class _WorkerShuffle:
    """WebDataset's shuffle buffer with an rng seeded by (seed, rank, stream) when iteration starts."""

    def __init__(self, buffer: int, seed: int, stream: _StreamOf) -> None:
        self.buffer, self.seed, self.stream = buffer, seed, stream

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        rng = random.Random(wds.utils.make_seed(self.seed, self.stream.seed()))
        return wds.shuffle(self.buffer, rng=rng)(src)


class _Position:
    """Numbers the samples of one stream and drops the first `skip_batches` batches' worth.

    After k batches, stream s has served the batches i < k with i % W == s; those samples are
    dropped here, before decoding, so replaying them costs only reading the tar members.
    """

    def __init__(self, skip_batches: int, batch_size: int, stream: _StreamOf) -> None:
        self.skip_batches, self.batch_size, self.stream = skip_batches, batch_size, stream

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        rank, stream, workers = self.stream()
        skip = len(range(stream, self.skip_batches, workers)) * self.batch_size
        for i, sample in enumerate(src):
            if i >= skip:
                sample["__place__"] = (rank, stream, i)
                yield sample


def replay_limit_exceeded(data_cfg: DataConfig, skip_batches: int, batch_size: int) -> bool:
    """Whether replaying `skip_batches` batches would read more than data.resume_replay_max samples
    per worker (then the stream is reseeded instead: see the module docstring)."""
    workers = max(1, data_cfg.num_workers)
    return skip_batches * batch_size / workers > data_cfg.resume_replay_max


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
    skip_batches: int = 0,
    batch_size: int = 1,
    defer_jpeg: bool = False,
) -> wds.DataPipeline:
    """The per-sample WebDataset pipeline for `split` (see the module docstring for the modes);
    `defer_jpeg` leaves JPEGs compressed for `rcg.data.gpu_decode` (and the transform to it)."""
    urls = shard_urls(data_cfg.shards_dir, split)
    dec = _Decode(data_cfg.image_size, data_cfg.channels, random_crop=(mode == "train"),
                  transform=None if defer_jpeg else transform, seed=seed, defer_jpeg=defer_jpeg)
    if mode == "once":
        ds = wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a worker may get no shard when shards < workers x ranks
        )
    elif mode == "train":
        stream = _StreamOf(skip_batches)
        # Built from parts because webdataset 1.0's WebDataset(resampled=True, seed=...) ignores the
        # seed and, like .shuffle(), seeds itself from the clock, pid and os.urandom: no two runs saw
        # the same samples. ResampledShards(deterministic=True) mixes seed, rank and worker instead.
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=stream.seed),
            wds.tarfile_to_samples(),
            _WorkerShuffle(data_cfg.shuffle_buffer, seed, stream),
            _Position(skip_batches, batch_size, stream),
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
    drop_last: bool | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    skip_batches: int = 0,
    decode_device: str | None = None,
) -> Iterable[dict[str, Any]]:
    """A DataLoader over the shards of `split` yielding dict batches (module docstring).

    `seed` picks the `train` stream (shards, shuffle, crops); `skip_batches` starts it where a run
    that already took that many batches left off. Rank and world size are read from
    torch.distributed by WebDataset's node splitter. `drop_last` defaults to True in `train` mode
    (equal batch shapes for DDP) and False in `once` mode (nothing may be lost). `decode_device`
    (`cpu` or `cuda`) defaults to data.decode_device in `train` mode and to `cpu` in `once` mode.
    """
    workers = data_cfg.num_workers if num_workers is None else num_workers
    if mode == "train" and skip_batches and replay_limit_exceeded(data_cfg, skip_batches, batch_size):
        log.warning("resuming at batch %d: replaying the stream would read more than data.resume_replay_max "
                    "samples per worker; the stream is reseeded, so the data order differs from an "
                    "uninterrupted run", skip_batches)
        seed, skip_batches = seed + skip_batches, 0
    decode_device = decode_device or (data_cfg.decode_device if mode == "train" else "cpu")
    on_gpu = decode_device == "cuda"
    device = gpu_decode.cuda_device() if on_gpu else None  # a clear error without a GPU, before any work
    ds = image_dataset(data_cfg, split, mode, transform, seed, skip_batches, batch_size, defer_jpeg=on_gpu)
    drop = (mode == "train") if drop_last is None else drop_last
    # `once` streams draw nothing random, so they get a private generator and leave torch's global
    # RNG alone; a `train` DataLoader draws its base seed from it, as DataLoader does by default.
    generator = torch.Generator().manual_seed(seed) if mode == "once" else None
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=gpu_decode.collate_deferred if on_gpu else _collate,
        drop_last=drop,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous copies to the GPU
        generator=generator,
    )
    if device is None:
        return loader
    return gpu_decode.DecodedOn(loader, data_cfg.image_size, data_cfg.channels, seed, mode == "train", device,
                                transform)


def channel_stats(data_cfg: DataConfig, split: str = "train", limit: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the first `limit` images of `split` as the models see them
    (at data.image_size, in [0, 1]): the input normalisation of an encoder pretrained on this data."""
    total = torch.zeros(data_cfg.channels, dtype=torch.float64)
    squares = torch.zeros(data_cfg.channels, dtype=torch.float64)
    pixels = 0
    for batch in make_loader(data_cfg, split, "once", batch_size=500):
        x = batch["image"][: max(0, limit - pixels // (data_cfg.image_size**2))].double()
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
        if pixels >= limit * data_cfg.image_size**2:
            break
    if pixels == 0:
        raise PipelineError(f"{data_cfg.shards_dir}/{split}: no images to measure the input normalisation on")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]
