"""GPU training throughput and model FLOPs utilisation of the 256 px generators, through the project's loop.

DiT-XL/2 on SD-VAE latents (256 px images -> 4 x 32 x 32, the reference DiT's setting) and MAGE-B on
the 16 x 16 ids of a 1024-code VQGAN (rcg.generators.mage.MAGE_ARCHS), both conditioned on 256-d
representations (paper section 3.3), each trained by `rcg.training.fit` itself: bf16 autocast
(RCG_PRECISION=bf16), fused AdamW (`rcg.training.adamw`), TF32 (`use_tf32`, dist.tf32), EMA,
gradient clipping as train_generator, and torch.compile with `--compile` (dist.compile). The batches
are random tensors of the right shapes already on the GPU, so this is the model's speed, not the
input path's (benchmarks/bench_input.py measures that).

Model FLOPs utilisation (MFU) = 3 x forward FLOPs per image (forward + backward, counted with
torch.utils.flop_counter.FlopCounterMode on the training loss's forward) x images/s / the GPU's
dense bf16 peak (`PEAK_TFLOPS` by device name, or --peak-tflops).

    .venv/bin/python benchmarks/bench_gpu_train.py [--models dit,mage] [--batch 64] [--steps 20]
        [--repeats 3] [--compile] [--peak-tflops 989]

On a machine without CUDA it says so and exits 0 (`--device cpu --dit dit_tiny --mage mage_tiny`
runs the same code on CPU, as a check of the script). The last line sums up images/s and MFU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from rcg.diffusion import Diffusion, diffusion_meta
from rcg.generators.dit import build_dit
from rcg.generators.mage import build_mage
from rcg.training import DistInfo, LoopSpec, adamw, autocast, fit, use_tf32

# Dense bf16 tensor-core peak, TFLOP/s, by a part of torch.cuda.get_device_name() (first match wins):
# NVIDIA's data sheets (without 2:4 sparsity).
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


class _Done(Exception):
    """Raised from the loop's per-step hook once the timed steps are done (no final checkpoint)."""


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


Case = tuple[nn.Module, Callable[[], Any], Callable[..., Tensor]]  # model, batch maker, loss(model, batch, step)


def dit_case(arch: str, batch: int, device: torch.device) -> Case:
    """DiT on SD-VAE latents [B, 4, 32, 32], eps-prediction with the reference's linear schedule."""
    model = build_dit(arch, input_size=32, in_channels=4, condition="rep", rep_dim=256).to(device)
    diffusion = Diffusion.from_meta(diffusion_meta("linear", 1000, parameterization="eps"))

    def batch_fn() -> tuple[Tensor, Tensor]:
        return torch.randn(batch, 4, 32, 32, device=device), torch.randn(batch, 256, device=device)

    def loss(net: nn.Module, b: tuple[Tensor, Tensor], step: int) -> Tensor:
        return diffusion.training_loss(net, b[0], {"rep": b[1]})

    return model, batch_fn, loss


class MageObjective(nn.Module):
    """MAGE's training loss (`MAGE.loss`: masking, encoder, decoder, cross-entropy) as a module's
    forward, so that the loop's torch.compile covers all of it."""

    def __init__(self, mage: nn.Module) -> None:
        super().__init__()
        self.mage = mage

    def forward(self, ids: Tensor, rep: Tensor) -> Tensor:
        return self.mage.loss(ids, rep=rep)


def mage_case(arch: str, batch: int, device: torch.device) -> Case:
    """MAGE on token grids [B, tokens] of its codebook (MAGE-B: 16 x 16 ids of 1024 codes)."""
    mage = build_mage(arch, condition="rep", rep_dim=256)
    tokens, codes = mage.num_tokens, mage.codebook_size

    def batch_fn() -> tuple[Tensor, Tensor]:
        return torch.randint(0, codes, (batch, tokens), device=device), torch.randn(batch, 256, device=device)

    def loss(net: nn.Module, b: tuple[Tensor, Tensor], step: int) -> Tensor:
        return net(b[0], b[1])

    return MageObjective(mage).to(device), batch_fn, loss


def forward_flops(model: nn.Module, loss: Callable[..., Tensor], batch: Any, device: torch.device) -> float:
    """FLOPs of one forward of the training loss on `batch` (bf16 autocast, no gradients kept)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(device), counter:
        loss(model, batch, 0)
    return float(counter.get_total_flops())


def time_fit(model: nn.Module, batch_fn: Callable[[], Any], loss: Callable[..., Tensor], info: DistInfo,
             warmup: int, steps: int) -> float:
    """Seconds per optimiser step of `fit` over `steps` steps after `warmup` (compiling included there)."""
    stamps: list[float] = []
    batches = [batch_fn() for _ in range(4)]  # cycled: fresh random tensors cost GPU time too

    def data(start: int) -> Iterator[Any]:
        return (batches[i % len(batches)] for i in range(start, 10**9))

    def on_step(step: int, ema: nn.Module | None) -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if step == warmup + steps:
            raise _Done

    opt = adamw(model.parameters(), 1e-4, betas=(0.9, 0.95), weight_decay=0.0, device=info.device)
    with tempfile.TemporaryDirectory() as tmp:
        spec = LoopSpec(name="bench", steps=warmup + steps + 1, lr=1e-4, checkpoint_dir=tmp, fingerprint="bench",
                        grad_clip=1.0, ema_decay=0.9999, log_every=10**9, ckpt_every=10**9, amp=True)
        try:
            fit(spec, model, opt, loss, data, info, on_step=on_step)
        except _Done:
            pass
    return (stamps[-1] - stamps[warmup - 1]) / steps


def run_model(name: str, case: Case, args: argparse.Namespace,
              info: DistInfo, peak: float | None) -> tuple[float, float | None]:
    """Images/s per GPU (median of the repeats) and MFU of one model; prints the details."""
    model, batch_fn, loss = case
    flops = forward_flops(model, loss, batch_fn(), info.device) / args.batch
    per_step = [time_fit(model, batch_fn, loss, info, args.warmup, args.steps) for _ in range(args.repeats)]
    rates = sorted(args.batch / s for s in per_step)
    rate = statistics.median(rates)
    mfu = 3 * flops * rate / (peak * 1e12) if peak else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({n_params / 1e6:.1f}M params), batch {args.batch}, {'compiled' if info.compile else 'eager'}: "
          f"{rate:.0f} images/s (repeats {rates[0]:.0f}-{rates[-1]:.0f}), forward {flops / 1e9:.1f} GFLOP/image, "
          f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}", flush=True)
    return rate, mfu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="dit,mage", help="comma-separated: dit, mage")
    p.add_argument("--dit", default="DiT-XL/2", help="DiT size (rcg.generators.dit.DIT_ARCHS)")
    p.add_argument("--mage", default="MAGE-B", help="MAGE size (rcg.generators.mage.MAGE_ARCHS)")
    p.add_argument("--batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, >= 1 (autotuning, compiling)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="train through torch.compile (dist.compile: true)")
    p.add_argument("--no-tf32", action="store_true", help="dist.tf32: false")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    args.warmup = max(1, args.warmup)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_train: needs a CUDA GPU (none is visible here); nothing measured")
        sys.exit(0)
    os.environ["RCG_PRECISION"] = "bf16"  # bf16 autocast, as train_generator.amp chooses on these GPUs
    device = torch.device(args.device)
    if device.type == "cuda":
        use_tf32(not args.no_tf32)
    info = DistInfo(0, 1, 0, device, compile=args.compile)
    peak = peak_tflops(device, args.peak_tflops)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tf32 = "n/a" if device.type != "cuda" else "off" if args.no_tf32 else "on"
    print(f"{label}, torch {torch.__version__}, bf16 peak {peak or 'unknown'} TFLOP/s, TF32 {tf32}")
    cases = {"dit": (args.dit, dit_case), "mage": (args.mage, mage_case)}
    summary = []
    for key in args.models.split(","):
        name, build = cases[key.strip()]
        torch.manual_seed(0)
        rate, mfu = run_model(name, build(name, args.batch, device), args, info, peak)
        summary.append(f"{name} {rate:.0f} img/s" + ("" if mfu is None else f" MFU {100 * mfu:.1f}%"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"per GPU, batch {args.batch}{', compiled' if args.compile else ''}: " + "; ".join(summary))


if __name__ == "__main__":
    main()
