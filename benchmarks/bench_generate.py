"""RCG generation: the share of the RDM's sampling in the total time, at the default settings.

Generation is RDM sampling (250 DDIM steps of a residual MLP on 256-d vectors) followed by the
image generator: a diffusion generator's `evaluate.sample_steps` steps over whole images, or a
MAGE's decoding iterations over token ids and its tokenizer's decoder (paper section 3.3). The RDM
should cost at most 10% of the total (the paper: training and sampling the RDM is cheap next to the
image generator). Both models are built at the default preset's sizes with random weights (speed
does not depend on the weights), saved to model folders as train_generator saves them (the sampler
settings of rcg.generators.training.sampling_settings) and loaded as an `rcg.generation.RCGGenerator`;
the two halves of its `sample` (`sample_reps`, then `from_reps`) are timed with the same settings
`sample` uses. A MAGE arch needs a tokenizer folder: a `tokenizer.arch` (vq_fmnist) with random
weights is written beside it, and its default step count is the 12 decoding iterations of
README.md's MAGE run (evaluate.sample_steps=12 there), not the diffusion default.

Each of `--rounds` rounds times the RDM half, then the generator half (alternating, so load changes
of a shared machine hit both), and gives the RDM's share of that round's total.

    .venv/bin/python benchmarks/bench_generate.py [--arch unet_fmnist|mage_fmnist] [--n 500] [--batch 250]
        [--rounds 3] [--threads 1] [--cfg 0] [--gen-steps N]

The last line prints RDM time / total RCG generation time, the median over rounds (<= 0.10 is the target).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _timing import spread, timed

MAGE_RUN_STEPS = 12  # README.md's MAGE run: train_generator.sample_steps=12, evaluate.sample_steps=12


def save_image_generator(cfg: Any, folder: Path) -> Path:
    """A rep-conditioned generator of `cfg.train_generator.arch` with random weights, saved as
    train_generator saves it (with a random-weight tokenizer folder for a MAGE); returns its folder."""
    from rcg.diffusion import diffusion_meta
    from rcg.generators import arch_kind, build_generator, save_generator
    from rcg.generators.tokens import TokenCodec, mage_kwargs
    from rcg.generators.training import sampling_settings
    from rcg.generators.vae import PixelCodec
    from rcg.tokenizers import build_vqgan, save_tokenizer

    gc, data = cfg.train_generator, cfg.data
    out = folder / "generator" / "rep"
    meta: dict[str, Any] = {"arch": gc.arch, "condition": "rep",
                            "data": {"image_size": data.image_size, "channels": data.channels}}
    if arch_kind(gc.arch) == "tokens":
        vq = build_vqgan(cfg.tokenizer.arch, in_channels=data.channels, image_size=data.image_size)
        save_tokenizer(vq, folder / "tokenizer", cfg.tokenizer.arch, {"source": "random weights (benchmark)"})
        codec = TokenCodec(folder / "tokenizer")
        kwargs = mage_kwargs(codec, "rep", cfg.encoder.rep_dim, 10, gc.rep_drop_prob)
    else:
        codec = PixelCodec()
        kwargs = dict(input_size=data.image_size, in_channels=data.channels, condition="rep",
                      rep_dim=cfg.encoder.rep_dim, num_classes=10, rep_drop_prob=gc.rep_drop_prob)
        meta["diffusion"] = diffusion_meta(gc.beta_schedule, gc.timesteps, parameterization=gc.parameterization)
    meta.update(kwargs=kwargs, codec=codec.meta(), sampling=sampling_settings(gc, codec))
    save_generator(out, build_generator(gc.arch, **kwargs), meta)
    return out


def save_rdm(cfg: Any, folder: Path) -> Path:
    """The default RDM with random weights and its sampler settings, saved; returns its folder."""
    import rcg.rdm as rdm
    from rcg.diffusion import diffusion_meta

    rc = cfg.train_rdm
    net = rdm.build_rdm(rc.arch, cfg.encoder.rep_dim)
    meta = rdm.make_meta(
        net, rc.arch,
        diffusion_meta(rc.beta_schedule, rc.timesteps, rc.linear_start, rc.linear_end, rc.parameterization),
        {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
    )
    rdm.save_rdm(net, meta, folder / "rdm", "rdm")
    return folder / "rdm"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images (time per image is what matters)")
    ap.add_argument("--batch", type=int, default=250, help="generator batch (evaluate.batch_size)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (RDM, then generator, each round)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=0.0, help="guidance scale (0: the RDM's worst case)")
    ap.add_argument("--gen-steps", type=int, default=None,
                    help="generator steps (default: evaluate.sample_steps; a MAGE: README.md's MAGE run, 12)")
    ap.add_argument("--arch", default=None, help="generator arch (default: train_generator.arch)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from rcg.config import Config
    from rcg.generation import RDM_BATCH, RCGGenerator
    from rcg.generators import arch_kind

    cfg = Config()
    if args.arch:
        cfg.train_generator.arch = args.arch
    rc, gc = cfg.train_rdm, cfg.train_generator
    mage = arch_kind(gc.arch) == "tokens"
    gen_steps = args.gen_steps or (MAGE_RUN_STEPS if mage else cfg.evaluate.sample_steps)
    if mage:
        gc.sample_steps = gen_steps  # what generator.json records, as README.md's MAGE run trains it
    with tempfile.TemporaryDirectory() as tmp:
        rcg = RCGGenerator.load(save_rdm(cfg, Path(tmp)), save_image_generator(cfg, Path(tmp)))
        rcg.sample(8, steps=2, batch_size=8)  # warm-up
        wall: dict[str, list[float]] = {"rdm": [], "generator": []}
        cpu: dict[str, list[float]] = {"rdm": [], "generator": []}
        for r in range(args.rounds):  # each timed call runs at once, so the lambdas see this round's r
            out: dict[str, torch.Tensor] = {}
            wall["rdm"].append(timed(lambda: out.update(  # what rcg.sample draws
                reps=rcg.sample_reps(args.n, seed=r, batch_size=max(args.batch, RDM_BATCH))), cpu["rdm"]))
            wall["generator"].append(timed(lambda: rcg.from_reps(
                out["reps"], cfg=args.cfg, steps=gen_steps, seed=r, batch_size=args.batch), cpu["generator"]))
            print(f"round {r + 1}: RDM {wall['rdm'][-1]:.2f} s, generator {wall['generator'][-1]:.2f} s, "
                  f"RDM share {wall['rdm'][-1] / (wall['rdm'][-1] + wall['generator'][-1]):.3f}", flush=True)

    share = [a / (a + b) for a, b in zip(wall["rdm"], wall["generator"])]
    cpu_share = [a / (a + b) for a, b in zip(cpu["rdm"], cpu["generator"])]
    print(f"RCG generation of {args.n} images, {args.threads} thread(s), {args.rounds} rounds, "
          "shared CPU (expect noise):")
    print(f"  RDM {rc.arch}: {rc.sample_steps} DDIM steps, s: {spread(wall['rdm'], '{:.2f}')} "
          f"({args.n / statistics.median(wall['rdm']):.0f} reps/s)")
    print(f"  generator {gc.arch}: {gen_steps} {'decoding iterations' if mage else 'steps'}, cfg {args.cfg}, "
          f"s: {spread(wall['generator'], '{:.2f}')} ({args.n / statistics.median(wall['generator']):.1f} img/s)")
    print(f"  RDM share per round, wall: {' '.join(f'{s:.3f}' for s in share)}; {spread(share)}")
    print(f"  RDM share per round, CPU seconds: {' '.join(f'{s:.3f}' for s in cpu_share)}; {spread(cpu_share)}")
    print(f"RDM share of RCG generation time: {statistics.median(share):.3f} "
          f"(min {min(share):.3f}, max {max(share):.3f}; target <= 0.10)")


if __name__ == "__main__":
    main()
