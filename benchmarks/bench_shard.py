"""Sharding speed: `rcg shard` on a folder of JPEGs against `tar cf` over the same files.

Both read the same files from the same warm page cache and write one output to the same disk; the
timed shard work is everything `rcg shard` does after the interpreter starts: listing the folder
(and fingerprinting it), then writing the shards with the stage's default 2 worker processes. `tar
cf` only copies bytes; the shard stage also validates every file (rcg.data.images.prepare,
verify="structure": for each JPEG its marker segments up to the scan, an 8-bit frame header with
the size checked against min_size, and the end-of-image marker; PNG chunk CRCs up to IEND; no pixel
decode). The last line prints `ratio = tar_seconds / shard_seconds` (target: 0.5 or better), each
side the best of 3 runs, with the spread of the 3 ratios. A second figure times Fashion-MNIST's
70,000 images through the real stage (target: under 60 s on 2 cores).

Usage: python benchmarks/bench_shard.py [--n 4000] [--size 128]   (--size 500: ImageNet-like files)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import timed
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
        src = sources.image_folder(tmp / "src")  # warms the same cache for the listing
        write_shards(src, tmp / "shards", shard_size=500, min_size=8, workers=2)  # and the output files
        tar_times, shard_times, tar_cpu, shard_cpu = [], [], [], []
        for _ in range(3):  # interleaved, so a burst of load from other jobs hits both sides alike
            tar_times.append(timed(lambda: subprocess.run(
                ["tar", "cf", str(tmp / "all.tar"), "-C", str(tmp / "src"), "."], check=True), tar_cpu))
            shard_times.append(timed(lambda: write_shards(
                sources.image_folder(tmp / "src"), tmp / "shards", shard_size=500, min_size=8, workers=2),
                shard_cpu))
        tar_s, shard_s = min(tar_times), min(shard_times)
        ratios = sorted(t / s for t, s in zip(tar_times, shard_times))
        mb = sum(p.stat().st_size for p in (tmp / "src").rglob("*.jpg")) / 1e6
        print(f"{args.n} JPEGs ({mb:.1f} MB): tar cf {tar_s:.3f}s, rcg shard {shard_s:.3f}s "
              f"({args.n / shard_s:.0f} img/s); per-run ratios {', '.join(f'{r:.2f}' for r in ratios)}")
        # CPU time is what the wall-clock ratio becomes on a machine with idle cores (2 workers).
        print(f"CPU seconds (least of 3): tar cf {min(tar_cpu):.3f}, rcg shard {min(shard_cpu):.3f} "
              f"(all processes); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if not args.skip_fmnist and Path("/usr/share/datasets/fashion-mnist").exists():
            t = time.perf_counter()
            m = write_shards(sources.fashion_mnist("/usr/share/datasets/fashion-mnist"), tmp / "fm",
                             shard_size=10000, min_size=8, workers=2)
            n = sum(s["written"] for s in m["splits"].values())
            print(f"Fashion-MNIST: {n} images sharded in {time.perf_counter() - t:.1f}s (target < 60 s)")
    print(f"ratio = tar_seconds / shard_seconds = {tar_s / shard_s:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
