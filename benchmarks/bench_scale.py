"""Cost at scale: the shard and encode stages at two dataset sizes 10x apart, per image and in memory.

What ImageNet's 1.28M images cost can be extrapolated from a small run only if the time per image
and the peak memory of a stage do not grow with the number of images. This benchmark writes an
ImageNet-layout folder of JPEGs (crops of scikit-image's photographs, 400 x 300 px by default, as
`bench_shard.make_jpegs` makes them) at two sizes, then runs the real stages on each with the
imagenet256 preset's values, except the image size (`--image-size`), worker counts (`--workers`) and
paths: `rcg.stages.shard.run` (listing, validation, tar shards, manifest) and
`rcg.stages.encode.run` (JPEG decode, resize to the image size, the encoder on both views, the
exactly-once check, Parquet, summary.json). The encoder is a ViT-Ti/16 at the image size with
random weights (its speed, not its quality, matters here), run on `--batch-size` images a forward:
small enough that the small folder fills whole batches too, so the two sizes differ only in how
many batches they run. Each run is a fresh process, so its peak RSS (the high-water mark of the
process, and of its largest worker) is its own; the sizes alternate (small, large, small, large,
...) for `--rounds` rounds, so a shared machine's drift hits both alike. On such a machine the CPU
seconds (the process and its reaped workers) are the steadier measure; both are printed.

    .venv/bin/python benchmarks/bench_scale.py [--small 200] [--factor 10] [--rounds 3]

Per stage, the last lines print `time/image ratio (large/small)` (goal <= 1.1) and `peak RSS ratio
(large/small)` (goal <= 1.2), each of the medians over rounds; before them, the fixed and the
per-image (marginal) CPU cost, and the growth of the peak per image between the two sizes, with
what both would come to at ImageNet's 1.28M train images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from _timing import cpu_seconds

STAGES = ("shard", "encode")
IMAGENET_TRAIN = 1_281_167


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, the high-water mark of its own memory map. ru_maxrss is
    not used for it: Linux carries it across exec, so a child would inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_config(n: int, work: Path, image_size: int, workers: int, batch_size: int):  # noqa: ANN201
    """The imagenet256 preset's config for a run on `n` images in `work`, as `--set` would make it."""
    from rcg import config

    sets = [f"shard.folder={work / f'src-{n}'}", f"data.shards_dir={work / f'shards-{n}'}",
            f"encoder.out_dir={work / 'encoder'}", f"encode.out_dir={work / f'features-{n}'}",
            f"data.image_size={image_size}", f"shard.workers={workers}", f"encode.num_workers={workers}",
            f"encode.batch_size={batch_size}", "data.num_workers=0", "tracking.enabled=false"]
    return config.preset_config("imagenet256", config.parse_set(sets))


def one_run(stage: str, n: int, work: Path, image_size: int, workers: int, batch_size: int) -> dict[str, float]:
    """Run `stage` on the `n`-image folder in this process; its seconds and peak memory."""
    import importlib

    module = importlib.import_module(f"rcg.stages.{stage}")
    cfg = stage_config(n, work, image_size, workers, batch_size)
    out = Path(cfg.data.shards_dir if stage == "shard" else cfg.encode.out_dir)
    shutil.rmtree(out, ignore_errors=True)  # every run writes its outputs from scratch
    before = peak_rss_mb()  # the imports' share
    cpu, t0 = cpu_seconds(), time.perf_counter()
    module.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu
    own = peak_rss_mb()
    # The largest reaped worker (shard writers, loader workers: forked from this process, so their
    # RSS counts the pages they share with it).
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"stage": stage, "n": n, "seconds": wall, "cpu_seconds": cpu, "rss_before_mb": before,
            "peak_rss_mb": max(own, kids), "own_rss_mb": own, "worker_rss_mb": kids}


def make_inputs(work: Path, sizes: tuple[int, int], side: int, image_size: int) -> None:
    """The JPEG folders (src-<n>) and the encoder: a ViT-Ti/16 at `image_size` with the MoCo v3
    projector, random weights, saved as the encoder stage saves one (models/encoder)."""
    import torch
    from bench_shard import make_jpegs

    from rcg.encoders import EncoderSpec, RepEncoder, save_encoder

    for n in sizes:
        make_jpegs(work / f"src-{n}", n, side)
    spec = EncoderSpec(img_size=image_size, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    torch.manual_seed(0)
    save_encoder(RepEncoder(spec), spec, work / "encoder", extra={"source": "random (bench_scale)"})


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(rows: list[dict[str, float]], small: int, large: int) -> None:
    """Per stage and size: time per image and peak RSS (median, min-max over rounds); the ratios."""
    for stage in STAGES:
        per = {n: [r for r in rows if r["stage"] == stage and r["n"] == n] for n in (small, large)}
        ms = {n: [1e3 * r["seconds"] / n for r in rs] for n, rs in per.items()}
        cpu_ms = {n: [1e3 * r["cpu_seconds"] / n for r in rs] for n, rs in per.items()}
        rss = {n: [r["peak_rss_mb"] for r in rs] for n, rs in per.items()}
        for n in (small, large):
            print(f"{stage:6s} n={n:6d}: {spread(ms[n])} ms/image wall, {spread(cpu_ms[n])} CPU-ms/image, "
                  f"peak RSS {spread(rss[n], '{:.0f}')} MB (after imports "
                  f"{statistics.median(r['rss_before_mb'] for r in per[n]):.0f} MB)")
        # CPU time = fixed + n x marginal: the marginal cost per image is what scales to ImageNet.
        t = {n: statistics.median(r["cpu_seconds"] for r in rs) for n, rs in per.items()}
        marginal = (t[large] - t[small]) / (large - small)
        print(f"{stage:6s} marginal {1e3 * marginal:.2f} CPU-ms/image, fixed {t[small] - small * marginal:.1f} "
              f"CPU-s (from the medians): {marginal * IMAGENET_TRAIN / 3600:.1f} CPU-hours for ImageNet's train images")
        growth_kb = 1024 * (statistics.median(rss[large]) - statistics.median(rss[small])) / (large - small)
        print(f"{stage:6s} peak RSS growth {growth_kb:.2f} KB/image: {growth_kb * IMAGENET_TRAIN / 2**20:.1f} GB "
              f"more at ImageNet's {IMAGENET_TRAIN} train images, if it grew linearly")
    for stage in STAGES:
        def med(key: str, n: int, per_image: bool = True) -> float:
            return statistics.median(r[key] / (n if per_image else 1)
                                     for r in rows if r["stage"] == stage and r["n"] == n)

        print(f"{stage}: time/image ratio (large/small): {med('seconds', large) / med('seconds', small):.2f} "
              f"(CPU time/image: {med('cpu_seconds', large) / med('cpu_seconds', small):.2f}; goal <= 1.1)")
        print(f"{stage}: peak RSS ratio (large/small): "
              f"{med('peak_rss_mb', large, False) / med('peak_rss_mb', small, False):.2f} (goal <= 1.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=200, help="images of the small folder")
    ap.add_argument("--factor", type=int, default=10, help="the large folder has small x factor images")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each stage at each size, sizes alternated")
    ap.add_argument("--side", type=int, default=400,
                    help="JPEG width in px (height 3/4 of it; >= 342 for a short side of 256 px or more)")
    ap.add_argument("--image-size", type=int, default=64, help="data.image_size (the encoder's input too)")
    ap.add_argument("--workers", type=int, default=2, help="shard.workers and encode.num_workers")
    ap.add_argument("--batch-size", type=int, default=64, help="encode.batch_size (the preset's: 256)")
    # Internal: one stage run, or the inputs, in a fresh process (this one stays small: what it
    # maps would count in a child's peak until the child's exec).
    ap.add_argument("--one", nargs=3, metavar=("STAGE", "N", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    small, large = args.small, args.small * args.factor
    if args.one:
        stage, n, work = args.one
        print(json.dumps(one_run(stage, int(n), Path(work), args.image_size, args.workers, args.batch_size)))
        return
    if args.inputs:
        make_inputs(Path(args.inputs), (small, large), args.side, args.image_size)
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--inputs", str(work)], check=True)
        print(f"{small} and {large} JPEGs of {args.side}x{args.side * 3 // 4} px written in "
              f"{time.perf_counter() - t:.0f}s; data.image_size {args.image_size}, {args.workers} workers, "
              f"encode.batch_size {args.batch_size}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        rows = []
        for i in range(args.rounds):
            for stage in STAGES:  # shard first: encode reads its shards
                for n in (small, large):
                    cmd = [sys.executable, __file__, "--one", stage, str(n), str(work),
                           "--image-size", str(args.image_size), "--workers", str(args.workers),
                           "--batch-size", str(args.batch_size)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"round {i + 1} {stage:6s} n={n:6d}: {r['seconds']:6.1f} s, {r['cpu_seconds']:6.1f} CPU-s, "
                          f"peak RSS {r['peak_rss_mb']:5.0f} MB (process {r['own_rss_mb']:.0f}, "
                          f"largest worker {r['worker_rss_mb']:.0f})", flush=True)
    report(rows, small, large)


if __name__ == "__main__":
    main()
