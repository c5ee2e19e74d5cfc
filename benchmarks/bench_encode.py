"""Encode-stage throughput against the bare encoder forward on the same batches.

Builds Fashion-MNIST shards in a temporary folder (or uses --shards), takes the default preset's
encoder architecture (models/encoder if --model-dir exists, else a random init of the same size),
then measures in one process:
  baseline: the encoder forward on both views of every batch, images already in memory;
  stage:    `rcg.features.encode_split` + `write_split` (the exactly-once check, the canonical
            row order, the Parquet write), i.e. the stage's whole per-split work from shards on
            disk to features on disk, with the stage's own loader settings (encode.num_workers).
Each round runs them in the order baseline, stage, stage, baseline (ABBA), and gives a ratio,
stage images/s over baseline images/s from the summed times; the last line prints the median over
rounds (target: >= 0.85). On a shared VM the same forward's speed drifts within minutes, enough to
scatter simple pairs and best-of-each ratios far from the true one
(docs/measurements.md#encode-benchmark-scatter). The ABBA order cancels a drift that is linear
over the round. The line before it compares CPU seconds (the process and its reaped loader
workers), which a busy neighbour changes far less than wall time.

    .venv/bin/python benchmarks/bench_encode.py [--n 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
from _timing import timed

from rcg import config as config_mod
from rcg import features
from rcg.data.loader import make_loader, read_manifest
from rcg.encoders import RepEncoder, load_encoder
from rcg.encoders.vit import build_vit, spec_from_config
from rcg.stages import shard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="images in the benchmark split")
    p.add_argument("--shards", default="", help="existing shards folder (default: build temporary ones)")
    p.add_argument("--model-dir", default="models/encoder", help="trained encoder, if present")
    p.add_argument("--repeats", type=int, default=5, help="timed ABBA rounds (baseline, stage, stage, baseline)")
    args = p.parse_args()

    blocks = [f.name for f in dataclasses.fields(config_mod.Config) if f.name != "preset"]
    cfg = config_mod.resolve({"preset": "default", **{b: {} for b in blocks}})
    tmp = tempfile.TemporaryDirectory()
    if args.shards:
        cfg.data.shards_dir = args.shards
    else:
        cfg.data.shards_dir = str(Path(tmp.name) / "shards")
        cfg.shard.max_per_split = args.n
        t = time.perf_counter()
        shard.run(cfg)
        print(f"built {args.n} x 2 shards in {time.perf_counter() - t:.1f}s")
    split = "val" if read_manifest(cfg.data.shards_dir)["splits"]["val"]["written"] else "train"
    n = read_manifest(cfg.data.shards_dir)["splits"][split]["written"]

    if (Path(args.model_dir) / "encoder.json").exists():
        encoder = load_encoder(args.model_dir)
        print(f"encoder: {args.model_dir}")
    else:
        spec = spec_from_config(cfg.encoder, cfg.data.channels)
        torch.manual_seed(0)
        encoder = RepEncoder(spec, build_vit(spec))
        print("encoder: random init of the default architecture")
    device = torch.device("cpu")
    batches = [b["image"] for b in make_loader(cfg.data, split, "once", cfg.encode.batch_size)]

    def bare() -> None:
        with torch.inference_mode():
            for x in batches:
                encoder(torch.cat([x, x.flip(-1)]))

    def stage() -> None:
        table = features.encode_split(encoder, cfg.data, split, device, cfg.encode.batch_size, cfg.encode.num_workers, progress=False)
        features.write_split(table, n, split, Path(tmp.name) / f"{split}.parquet")

    bare()  # warm-up (allocator, kernels) before either timing
    ratios, cpu_ratios = [], []
    for _ in range(args.repeats):
        wall = {"bare": 0.0, "stage": 0.0}
        cpu: dict[str, list[float]] = {"bare": [], "stage": []}
        for name, fn in (("bare", bare), ("stage", stage), ("stage", stage), ("bare", bare)):
            dt = timed(fn, cpu[name])
            wall[name] += dt
            print(f"{name:5s}: {n / dt:8.0f} images/s "
                  f"(x2 views, {n} images, threads={torch.get_num_threads()})")
        ratios.append(wall["bare"] / wall["stage"])  # = stage images/s over bare images/s
        cpu_ratios.append(sum(cpu["bare"]) / sum(cpu["stage"]))
    tmp.cleanup()
    print("round ratios: " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"CPU-time ratio bare / stage (median of {len(cpu_ratios)} rounds): {statistics.median(cpu_ratios):.3f}")
    print(f"encode stage / bare encoder forward (median of {len(ratios)} ABBA rounds): {statistics.median(ratios):.3f}")

if __name__ == "__main__":
    main()
