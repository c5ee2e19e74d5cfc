"""Streaming evaluation: peak memory and time per image at two sample counts 10x apart.

The evaluate protocol (rcg.metrics.evaluation.generate_mode) turns images into features chunk by
chunk, so its peak memory should not grow with the number of samples (50k ImageNet samples are
~10 GB as pixels). Each size runs in a fresh process that generates `n` images of `--size` px
(random, from a stand-in generator: the generator's own cost is not what is measured), featurises
them with the evaluation network's extractor (random weights) and scores them against a fixed
reference; the process reports its peak RSS (ru_maxrss) and seconds per image.

    .venv/bin/python benchmarks/bench_eval_memory.py [--small 500] [--factor 10] [--size 128]

The last line prints the peak-RSS ratio large / small (goal <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class RandomImages:
    """Plays ModeGenerators: `n` random images per call, seeded (the protocol's chunks)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def sample(self, mode: str, n: int, *, seed: int = 0, **kw: object):  # noqa: ANN201
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, self.size, self.size, generator=g)


def one_size(n: int, size: int, workdir: str) -> dict[str, float]:
    """Generate, featurise and score `n` images in this process; its peak RSS and time per image."""
    import torch

    from rcg.config import EvaluateConfig
    from rcg.metrics.evalnet import EvalNet, save_evalnet
    from rcg.metrics.evaluation import generate_mode
    from rcg.metrics.fidelity import Featurizer, score

    torch.manual_seed(0)
    weights = save_evalnet(EvalNet(in_channels=3, image_size=size, num_classes=10, width=8, feature_dim=64).eval(),
                           Path(workdir) / f"evalnet{n}")
    ev = EvaluateConfig(batch_size=100, feature_batch_size=200, grid_size=16)
    fz = Featurizer("evalnet", weights, ev.feature_batch_size)
    ref = fz.features([torch.randint(0, 256, (500, 3, size, size), dtype=torch.uint8)])
    t0 = time.perf_counter()
    gen = generate_mode(RandomImages(size), "uncond", n, ev, (3, size, size), fz)
    row = score(gen.features, ref, fz.layers, isc=True, kid_subset_size=100)
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {"n": n, "peak_rss_mb": round(rss_mb, 1), "ms_per_image": round(1e3 * seconds / n, 3), "fd": row["fd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--size", type=int, default=128, help="image side in px (RGB)")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: run one size
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_size(args.one, args.size, tmp)))
        return
    rows = []
    for n in (args.small, args.small * args.factor):  # fresh processes: each peak is its own
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--size", str(args.size)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        held = n * 3 * args.size**2 / 2**20
        print(f"n={n:6d}: peak RSS {r['peak_rss_mb']:7.1f} MB, {r['ms_per_image']:.3f} ms/image "
              f"(the images themselves would be {held:.0f} MB)")
    print(f"time per image ratio large / small: {rows[1]['ms_per_image'] / rows[0]['ms_per_image']:.2f}")
    print(f"peak-RSS ratio large / small: {rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
