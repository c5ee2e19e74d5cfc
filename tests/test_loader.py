"""The shared shard reader: decoding, exactly-once over workers and ranks, resampled training."""

from __future__ import annotations

import collections
import io
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import webdataset as wds
from PIL import Image

from rcg import config
from rcg.data.images import decode, decode_plain_png, encode_png, resize_crop, to_pixels, to_tensor
from rcg.data.loader import make_loader, read_manifest, shard_urls
from rcg.io import PipelineError


def _cfg(ws: Path) -> config.Config:
    cfg = config.load(ws / "params.yaml")
    cfg.data.shards_dir = str(ws / "data/shards")
    return cfg


def test_once_mode_reads_every_sample_exactly_once_with_two_workers(tiny_workspace: Path) -> None:
    cfg = _cfg(tiny_workspace)
    manifest = read_manifest(cfg.data.shards_dir)
    assert len(shard_urls(cfg.data.shards_dir, "val")) >= 2  # so both workers get shards
    keys: list[str] = []
    for batch in make_loader(cfg.data, "val", "once", batch_size=50, num_workers=2):
        assert batch["image"].shape[1:] == (1, 28, 28)
        assert batch["image"].dtype == torch.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["label"].dtype == torch.long and ((batch["label"] >= 0) & (batch["label"] < 10)).all()
        keys += batch["key"]
    counts = collections.Counter(keys)
    assert len(keys) == manifest["splits"]["val"]["written"] == len(counts)
    assert max(counts.values()) == 1


def _png(mode: str, size: int, seed: int = 0, **save: Any) -> bytes:
    shape = (size, size) if mode == "L" else (size, size, 3)
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    if not save:
        return encode_png(Image.fromarray(arr, mode))
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_plain_png_fast_path_decodes_what_pil_decodes(mode: str, channels: int) -> None:
    data = _png(mode, 28)
    fast = decode_plain_png(data, channels, 28)
    assert fast is not None and fast.dtype == torch.uint8 and fast.shape == (channels, 28, 28)
    assert torch.equal(fast, to_pixels(resize_crop(decode(data, channels), 28)))


def test_plain_png_fast_path_leaves_everything_else_to_pil() -> None:
    assert decode_plain_png(_png("L", 32), 1, 28) is None  # needs a resize
    assert decode_plain_png(_png("RGB", 28), 1, 28) is None  # needs a colour conversion
    assert decode_plain_png(_png("L", 28), 3, 28) is None
    assert decode_plain_png(_png("L", 28, transparency=5), 1, 28) is None  # tRNS before IDAT
    assert decode_plain_png(_png("RGB", 28, dpi=(72, 72)), 3, 28) is None  # pHYs before IDAT
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="JPEG")
    assert decode_plain_png(buf.getvalue(), 1, 28) is None
    assert decode_plain_png(b"", 1, 28) is None


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])  # the libpng path, then PIL's resize
def test_batches_hold_the_shard_pixels_over_255(tiny_workspace: Path, size: int, channels: int) -> None:
    """Samples are decoded to uint8 and whole batches converted: the floats are exactly PIL's."""
    cfg = _cfg(tiny_workspace)
    cfg.data.image_size, cfg.data.channels = size, channels
    raw = {s["__key__"]: s["png"] for s in wds.WebDataset(shard_urls(cfg.data.shards_dir, "val"),
                                                           shardshuffle=False, empty_check=False)}
    batch = next(iter(make_loader(cfg.data, "val", "once", 16, num_workers=0)))
    assert batch["image"].dtype == torch.float32
    for key, image in zip(batch["key"], batch["image"]):
        assert torch.equal(image, to_tensor(resize_crop(decode(raw[key], channels), size)))


def test_transform_and_resize(tiny_workspace: Path) -> None:
    cfg = _cfg(tiny_workspace)
    cfg.data.image_size, cfg.data.channels = 32, 3
    batch = next(iter(make_loader(cfg.data, "train", "once", 8, transform=lambda x: 1 - x, num_workers=0)))
    assert batch["image"].shape == (8, 3, 32, 32)
    # Fashion-MNIST backgrounds are black, so the inverted corner is (nearly) white.
    assert batch["image"][:, :, 0, 0].mean() > 0.9


def test_train_mode_is_endless_and_shuffled(tiny_workspace: Path) -> None:
    cfg = _cfg(tiny_workspace)
    it = iter(make_loader(cfg.data, "train", "train", batch_size=64, num_workers=0))
    batches = [next(it) for _ in range(10)]  # 640 samples from a 256-sample split
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 640 and all(b["image"].shape == (64, 1, 28, 28) for b in batches)
    first = batches[0]["key"]
    assert first != sorted(first)  # shuffled, not in shard order


def test_train_mode_is_reproducible_per_seed(tiny_workspace: Path) -> None:
    """Same seed, same stream (in each worker too); another seed, another stream."""
    cfg = _cfg(tiny_workspace)

    def first_batches(seed: int) -> tuple[list[str], torch.Tensor]:
        torch.manual_seed(0)  # the stages seed torch first; it picks the workers' crop seeds
        it = iter(make_loader(cfg.data, "train", "train", batch_size=32, num_workers=2, seed=seed))
        batches = [next(it) for _ in range(4)]  # workers 0, 1, 0, 1
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    keys, images = first_batches(7)
    again_keys, again_images = first_batches(7)
    assert keys == again_keys and torch.equal(images, again_images)
    assert first_batches(8)[0] != keys
    assert keys[:32] != keys[32:64]  # batches alternate between workers, which draw different streams


def test_missing_shards_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config.Config()
    cfg.data.shards_dir = str(tmp_path)
    with pytest.raises(PipelineError, match="no shards for split 'train'"):
        make_loader(cfg.data, "train", "once", 4)
    with pytest.raises(PipelineError, match="manifest.json: no shard manifest"):
        read_manifest(tmp_path)


def _rank_keys(rank: int, world: int, port: int, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = config.Config()
    cfg.data.shards_dir = shards
    keys = [k for b in make_loader(cfg.data, "val", "once", 32, num_workers=2) for k in b["key"]]
    Path(out, f"rank{rank}.txt").write_text("\n".join(keys))
    dist.destroy_process_group()


def test_once_mode_is_exactly_once_across_two_ranks(tiny_workspace: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shards = str(tiny_workspace / "data/shards")
    tmp_mp.spawn(_rank_keys, args=(2, port, shards, str(tmp_path)), nprocs=2, join=True)
    per_rank = [set((tmp_path / f"rank{r}.txt").read_text().split()) for r in range(2)]
    assert per_rank[0] and per_rank[1] and not (per_rank[0] & per_rank[1])
    written = read_manifest(shards)["splits"]["val"]["written"]
    assert len(per_rank[0] | per_rank[1]) == written
