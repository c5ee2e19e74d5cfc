"""Input throughput at 256 px: can the loader keep a GPU fed? Decode + crop images/s per CPU core.

ImageNet-sized JPEGs (500 x 375, the typical ImageNet photo) are sharded, then read through the
training loader (`rcg.data.loader.make_loader`, mode `train`: WebDataset stream, JPEG decode, the
resize + random crop to `data.image_size`, uint8 batches), with 0 workers (one core) and with
`--workers` workers. The per-core rate says how many loader workers a GPU needs: DiT-XL/2 trains at
about 100-200 images/s per A100 (DiT paper, Table 4 scale), MAGE-B faster; divide that by the per-core
rate below. On a CUDA machine the script also times torchvision's GPU JPEG decoder
(`torchvision.io.decode_jpeg(device="cuda")`) on the same files, and the training loader with
`data.decode_device: cuda` (rcg.data.gpu_decode: workers only read the tars, the batch is decoded,
resized and cropped on the GPU), interleaved with the CPU loader; on a CPU it says so.

    .venv/bin/python benchmarks/bench_input.py [--n 2000] [--size 256] [--workers 2]

The last line prints images/s per CPU core of the CPU loader.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_shard import make_jpegs

from rcg.config import DataConfig
from rcg.data import sources
from rcg.data.loader import make_loader
from rcg.data.shards import write_shards


def loader_rate(shards: Path, size: int, workers: int, images: int, batch: int = 64, decode_device: str = "cpu") -> float:
    """Images/s of the training loader over `images` images (after one warm-up batch); with
    `decode_device` cuda the batches are decoded on the GPU and the time includes finishing them there."""
    cfg = DataConfig(shards_dir=str(shards), image_size=size, channels=3, num_workers=workers, shuffle_buffer=256,
                     decode_device=decode_device)
    it = iter(make_loader(cfg, "train", "train", batch, seed=0))
    next(it)
    t0, seen = time.perf_counter(), 0
    while seen < images:
        seen += len(next(it)["image"])
    if decode_device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def gpu_decode_rate(folder: Path, n: int) -> float | None:
    """Images/s of torchvision's CUDA JPEG decoder on the raw files (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    from torchvision.io import decode_jpeg, read_file

    files = sorted(folder.rglob("*.jpg"))[:n]
    data = [read_file(str(f)) for f in files]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(data), 64):
        decode_jpeg(data[i : i + 64], device="cuda")
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="JPEG files (500 x 375)")
    ap.add_argument("--size", type=int, default=256, help="training image size (data.image_size)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "src", args.n, 500)
        write_shards(sources.image_folder(tmp / "src", val_fraction=0.0), tmp / "shards", 1000, 8, 2)
        one, many, on_gpu = [], [], []
        for _ in range(args.repeats):  # alternated, so load changes hit both alike
            one.append(loader_rate(tmp / "shards", args.size, 0, args.n))
            many.append(loader_rate(tmp / "shards", args.size, args.workers, args.n))
            if torch.cuda.is_available():
                on_gpu.append(loader_rate(tmp / "shards", args.size, args.workers, args.n, decode_device="cuda"))
        gpu = gpu_decode_rate(tmp / "src", args.n)
    print(f"500x375 JPEG -> {args.size} px crops, {args.repeats} rounds: 1 core (0 workers) "
          f"{statistics.median(one):.0f} images/s (range {min(one):.0f}-{max(one):.0f}); "
          f"{args.workers} workers {statistics.median(many):.0f} images/s (range {min(many):.0f}-{max(many):.0f})")
    print("GPU JPEG decode: needs a CUDA machine" if gpu is None else f"GPU JPEG decode (nvjpeg): {gpu:.0f} images/s")
    if on_gpu:
        print(f"training loader with data.decode_device cuda, {args.workers} workers: "
              f"{statistics.median(on_gpu):.0f} images/s (range {min(on_gpu):.0f}-{max(on_gpu):.0f})")
    print(f"images/s per CPU core: {statistics.median(one):.0f}")


if __name__ == "__main__":
    main()
