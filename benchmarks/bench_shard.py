"""Sharding speed: `rcg shard` on a folder of JPEGs against `tar cf` over the same files.

Both read the same files from the same (warm) page cache; `tar cf` only copies bytes, while the
shard stage also decodes every image fully to catch corrupt ones. The last line prints
`ratio = tar_seconds / shard_seconds` (target: 0.5 or better). A second figure times Fashion-MNIST's
70,000 images through the real stage (target: under 60 s on 2 cores).

Usage: python benchmarks/bench_shard.py [--n 4000] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from rcg.data import sources
from rcg.data.shards import write_shards


def make_jpegs(root: Path, n: int, size: int) -> None:
    """`n` JPEGs (random crops of scikit-image's photographs, resized to `size` x 3/4 `size`, the
    aspect of a typical ImageNet photo) in ImageNet layout with 10 class folders."""
    rng = np.random.default_rng(0)
    photos = [np.asarray(getattr(skdata, k)()) for k in ("astronaut", "chelsea", "coffee", "rocket")]
    for i in range(n):
        p = photos[i % len(photos)]
        side = min(p.shape[:2]) // 2
        y, x = rng.integers(0, p.shape[0] - side), rng.integers(0, p.shape[1] - side)
        crop = Image.fromarray(p[y : y + side, x : x + side]).resize((size, size * 3 // 4))
        d = root / "train" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        crop.save(d / f"img{i:06d}.jpg", quality=90)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="number of JPEG files")
    ap.add_argument("--size", type=int, default=128, help="width of each JPEG (500: ImageNet-like)")
    ap.add_argument("--skip-fmnist", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "src", args.n, args.size)
        subprocess.run(["tar", "cf", os.devnull, "-C", str(tmp / "src"), "."], check=True)  # warm cache
        tar_s = best_of(lambda: subprocess.run(["tar", "cf", str(tmp / "all.tar"), "-C", str(tmp / "src"), "."], check=True))
        src = sources.image_folder(tmp / "src")
        shard_s = best_of(lambda: write_shards(src, tmp / "shards", shard_size=500, min_size=8, workers=2))
        mb = sum(p.stat().st_size for p in (tmp / "src").rglob("*.jpg")) / 1e6
        print(f"{args.n} JPEGs ({mb:.1f} MB): tar cf {tar_s:.2f}s, rcg shard {shard_s:.2f}s "
              f"({args.n / shard_s:.0f} img/s)")
        if not args.skip_fmnist and Path("/usr/share/datasets/fashion-mnist").exists():
            t = time.perf_counter()
            m = write_shards(sources.fashion_mnist("/usr/share/datasets/fashion-mnist"), tmp / "fm",
                             shard_size=10000, min_size=8, workers=2)
            n = sum(s["written"] for s in m["splits"].values())
            print(f"Fashion-MNIST: {n} images sharded in {time.perf_counter() - t:.1f}s (target < 60 s)")
    print(f"ratio = tar_seconds / shard_seconds = {tar_s / shard_s:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
