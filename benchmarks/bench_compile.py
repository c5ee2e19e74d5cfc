"""dist.compile: training steps of the RDM through torch.compile against the same steps run eagerly.

Two copies of one RDM (rcg.rdm, same initial weights), each with its fused AdamW (rcg.training.adamw,
as train_rdm builds it), train on the same batches of random reps with the diffusion loss of the
stage, in the stage's precision (bf16 autocast unless --fp32). One copy's forward runs through
`rcg.training.compiled` (what `fit` does with dist.compile: true), the other eagerly. After warm-up
(the compiled copy's first steps compile it; that time is printed), the two are timed in turns, A B
A B ..., `--repeats` times, so load from other jobs hits both alike; the medians and the spread of
the paired ratios are printed, for wall time and for this process's CPU time (on a shared machine
the CPU seconds move far less with the neighbours; with --threads 1 they are the step's cost).

    .venv/bin/python benchmarks/bench_compile.py [--arch small] [--batch-size 512] [--steps 20] [--repeats 5]
        [--threads 1] [--device cpu|cuda]

The last line is the median ratio eager / compiled wall seconds per step (> 1: compiling pays off).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from rcg.config import RDMConfig
from rcg.diffusion import Diffusion
from rcg.rdm import build_rdm, schedule
from rcg.training import adamw, autocast, compiled


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, diffusion: Diffusion,
                batches: list[tuple[torch.Tensor, ...]], bf16: bool, device: torch.device,
                cpu: list[float] | None = None) -> float:
    """Wall seconds per step of the loop's step (rcg.training._train_step with one batch, no EMA) over
    `batches`; CPU seconds per step are appended to `cpu`."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for x0, t, noise in batches:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = diffusion.training_loss(model, x0, None, t=t, noise=noise)
        loss.backward()
        opt.step()
    sync(device)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / len(batches))
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=RDMConfig().arch)
    p.add_argument("--batch-size", type=int, default=RDMConfig().batch_size)
    p.add_argument("--steps", type=int, default=20, help="steps per timed turn")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each copy first (compiling)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (train_rdm.amp false)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, bf16 = torch.device(args.device), not args.fp32

    rc = RDMConfig(arch=args.arch, batch_size=args.batch_size)
    diffusion = Diffusion.from_meta(schedule(rc))
    torch.manual_seed(0)
    eager = build_rdm(rc.arch).to(device).train()
    bare = copy.deepcopy(eager)
    fast = compiled(bare)
    opts = {m: adamw(m.parameters(), rc.lr, weight_decay=rc.weight_decay, device=device, cpu_fused=True)
            for m in (eager, bare)}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(rc.batch_size, 256, generator=g).to(device),
                diffusion.sample_t(rc.batch_size, device, g, power=rc.timestep_power),
                torch.randn(rc.batch_size, 256, generator=g).to(device)) for _ in range(args.steps)]

    t0 = time.perf_counter()
    train_steps(fast, opts[bare], diffusion, batches[: args.warmup], bf16, device)
    compile_s = time.perf_counter() - t0
    train_steps(eager, opts[eager], diffusion, batches[: args.warmup], bf16, device)
    a, b, ca, cb = [], [], [], []
    for r in range(args.repeats):  # A B A B: eager, compiled
        a.append(train_steps(eager, opts[eager], diffusion, batches, bf16, device, ca))
        b.append(train_steps(fast, opts[bare], diffusion, batches, bf16, device, cb))
        print(f"repeat {r}: eager {a[-1] * 1e3:.1f} ms/step ({ca[-1] * 1e3:.1f} CPU-ms), compiled "
              f"{b[-1] * 1e3:.1f} ms/step ({cb[-1] * 1e3:.1f} CPU-ms)", flush=True)
    paired = sorted(x / y for x, y in zip(a, b))
    paired_cpu = sorted(x / y for x, y in zip(ca, cb))
    n_params = sum(p.numel() for p in eager.parameters())
    print(f"RDM {rc.arch} ({n_params / 1e6:.1f}M params), batch {rc.batch_size}, {args.device}, "
          f"{args.threads} thread(s), {'bf16 autocast' if bf16 else 'fp32'}; first {args.warmup} compiled steps "
          f"(compiling) took {compile_s:.1f}s")
    print(f"medians of {args.repeats}: eager {statistics.median(a) * 1e3:.1f} ms/step (range "
          f"{min(a) * 1e3:.1f}-{max(a) * 1e3:.1f}), compiled {statistics.median(b) * 1e3:.1f} ms/step (range "
          f"{min(b) * 1e3:.1f}-{max(b) * 1e3:.1f}); paired ratios min {paired[0]:.3f}, max {paired[-1]:.3f}")
    print(f"CPU seconds: eager {statistics.median(ca) * 1e3:.1f}, compiled {statistics.median(cb) * 1e3:.1f} "
          f"CPU-ms/step; ratio median {statistics.median(paired_cpu):.3f} (min {paired_cpu[0]:.3f}, max {paired_cpu[-1]:.3f})")
    print(f"{statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
