"""RDM training throughput: the train-rdm loop against a bare loop of the same MLP, same run.

The stage keeps the cached reps in memory and gathers each batch by index (plus timestep/noise draws,
the q_sample, the EMA update and progress bookkeeping). The baseline is the bare minimum for the same
network: forward, MSE, backward and the AdamW step on one batch already in memory. The ratio is
baseline time per step / stage time per step (1.0 = no overhead; the target is >= 0.9). Runs are
interleaved and the median taken, since other jobs share the machine.

    .venv/bin/python benchmarks/bench_rdm.py [--arch small] [--steps 40] [--threads 1]

The last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rcg.training as training
from rcg.config import RDMConfig
from rcg.features import read_features, to_table, write_features
from rcg.rdm import build_rdm, train_rdm
from rcg.training import DistInfo, autocast


def make_features(path: Path, n: int, dim: int = 256) -> None:
    """A features file of n images x 2 views of standardised random reps (the encode stage's shape)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)
    keys = [f"img-{i:06d}" for i in range(n)]
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    write_features(path, [to_table(keys, labels, ["orig"] * n, x), to_table(keys, labels, ["flip"] * n, x[:, ::-1])])


def time_bare(rc: RDMConfig, dim: int, steps: int, warmup: int, with_step: bool, class_cond: bool) -> float:
    """Seconds per step of forward + MSE + backward (+ AdamW step) on a fixed in-memory batch."""
    torch.manual_seed(0)
    net = build_rdm(rc.arch, dim, 10 if class_cond else 0)
    opt = torch.optim.AdamW(net.parameters(), lr=rc.lr, weight_decay=rc.weight_decay, fused=True)  # as the stage
    x = torch.randn(rc.batch_size, dim)
    t = torch.randint(0, rc.timesteps, (rc.batch_size,))
    y = torch.randint(0, 10, (rc.batch_size,)) if class_cond else None
    target = torch.randn(rc.batch_size, dim)
    net.train()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with autocast(torch.device("cpu"), rc.amp):  # same precision as the stage
            loss = torch.mean((net(x, t, y).float() - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if with_step:
            opt.step()
    return (time.perf_counter() - t0) / steps


def time_stage(rc: RDMConfig, reps: torch.Tensor, labels: torch.Tensor | None, steps: int, warmup: int,
               ckpt_dir: str) -> float:
    """Seconds per step of the stage's own training (rcg.rdm.train_rdm through the shared loop),
    setup excluded: the time between consecutive optimiser steps, data and bookkeeping included."""
    stamps: list[float] = []
    rc.steps, rc.ckpt_every, rc.checkpoint_dir = warmup + steps + 1, 10**9, ckpt_dir
    for f in Path(ckpt_dir).rglob("*.pt"):
        f.unlink()  # start fresh each time
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    real = training._train_step

    def stamped(*args: object, **kwargs: object) -> None:
        stamps.append(time.perf_counter())
        real(*args, **kwargs)

    training._train_step = stamped
    try:
        train_rdm(rc, reps, labels, 10 if labels is not None else 0, info)
    finally:
        training._train_step = real
    # stamps[k] is when step k starts; the last step also writes the final checkpoint: not timed
    return (stamps[warmup + steps] - stamps[warmup]) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=RDMConfig().arch)
    p.add_argument("--batch-size", type=int, default=RDMConfig().batch_size)
    p.add_argument("--images", type=int, default=60000, help="images in the synthetic cache (x2 views)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--class-cond", action="store_true", help="benchmark the class-conditional RDM")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (train_rdm.amp false)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rc = RDMConfig(arch=args.arch, batch_size=args.batch_size, amp=not args.fp32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        make_features(path, args.images)
        t0 = time.perf_counter()
        f = read_features(path)
        reps, labels = f.reps.clone(), f.labels.clone()
        print(f"read {len(f)} reps from Parquet in {time.perf_counter() - t0:.3f}s (once per run)")
        labels_in = labels if args.class_cond else None
        bare, bare_fb, stage = [], [], []
        for r in range(args.repeats):
            bare.append(time_bare(rc, reps.shape[1], args.steps, args.warmup, True, args.class_cond))
            stage.append(time_stage(rc, reps, labels_in, args.steps, args.warmup, str(Path(tmp) / "ckpt")))
            bare_fb.append(time_bare(rc, reps.shape[1], args.steps, args.warmup, False, args.class_cond))
            print(f"repeat {r}: bare fwd/bwd/AdamW {bare[-1] * 1e3:.1f} ms/step, bare fwd/bwd only "
                  f"{bare_fb[-1] * 1e3:.1f} ms/step, train-rdm loop {stage[-1] * 1e3:.1f} ms/step")
    b, bfb, s = statistics.median(bare), statistics.median(bare_fb), statistics.median(stage)
    paired = sorted(x / y for x, y in zip(bare, stage))  # each repeat's own ratio: the spread
    print(f"paired ratios over {args.repeats} repeats: min {paired[0]:.3f}, median "
          f"{statistics.median(paired):.3f}, max {paired[-1]:.3f}")
    n_params = sum(p.numel() for p in build_rdm(rc.arch).parameters())
    print(f"arch {rc.arch} ({n_params / 1e6:.1f}M params), batch {rc.batch_size}, {args.threads} thread(s), "
          f"{'bf16 autocast' if rc.amp else 'fp32'}, "
          f"medians of {args.repeats}: bare {b * 1e3:.1f} ms, bare fwd/bwd only {bfb * 1e3:.1f} ms, "
          f"stage {s * 1e3:.1f} ms per step; stage = {rc.batch_size / s:.0f} reps/s")
    print(f"ratio vs fwd/bwd only (stage also runs AdamW + EMA): {bfb / s:.3f}")
    print(f"ratio (bare fwd/bwd/AdamW loop time / train-rdm loop time): {b / s:.3f}")
    print(f"{b / s:.3f}")


if __name__ == "__main__":
    main()
