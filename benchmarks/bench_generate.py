"""RCG generation: the share of the RDM's sampling in the total time, at the default settings.

Generation is RDM sampling (250 DDIM steps of a residual MLP on 256-d vectors) followed by the
image generator (train_generator.sample_steps steps over whole images). The RDM should cost at most
10% of the total (the paper: training and sampling the RDM is cheap next to the image generator).
Both models are built at the default preset's sizes with random weights (speed does not depend on
the weights), saved to model folders and loaded as an `rcg.generation.RCGGenerator`; the two halves
of its `sample` (`sample_reps`, then `from_reps`) are timed with the same settings `sample` uses.

    .venv/bin/python benchmarks/bench_generate.py [--n 500] [--batch 250] [--threads 1] [--cfg 0]

The last line prints RDM time / total RCG generation time (<= 0.10 is the target).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images (time per image is what matters)")
    ap.add_argument("--batch", type=int, default=250, help="generator batch (evaluate.batch_size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=0.0, help="guidance scale (0: the RDM's worst case)")
    ap.add_argument("--gen-steps", type=int, default=None, help="generator steps (default: evaluate.sample_steps)")
    ap.add_argument("--arch", default=None, help="generator arch (default: train_generator.arch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import rcg.rdm as rdm
    from rcg.config import Config
    from rcg.diffusion import diffusion_meta
    from rcg.generation import RDM_BATCH, RCGGenerator
    from rcg.generators import build_generator, save_generator

    cfg = Config()
    if args.arch:
        cfg.train_generator.arch = args.arch
    rc, gc = cfg.train_rdm, cfg.train_generator
    with tempfile.TemporaryDirectory() as tmp:
        rdm_dir, gen_dir = os.path.join(tmp, "rdm"), Path(tmp) / "generator" / "rep"
        net = rdm.build_rdm(rc.arch, cfg.encoder.rep_dim)
        meta = rdm.make_meta(
            net, rc.arch,
            diffusion_meta(rc.beta_schedule, rc.timesteps, rc.linear_start, rc.linear_end, rc.parameterization),
            {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
        )
        rdm.save_rdm(net, meta, rdm_dir, "rdm")
        kwargs = dict(input_size=cfg.data.image_size, in_channels=cfg.data.channels, condition="rep",
                      rep_dim=cfg.encoder.rep_dim, num_classes=10, rep_drop_prob=gc.rep_drop_prob)
        gen = build_generator(gc.arch, **kwargs)
        save_generator(gen_dir, gen, {
            "arch": gc.arch, "kwargs": kwargs, "condition": "rep", "codec": {"type": "pixel"},
            "diffusion": {"timesteps": gc.timesteps, "beta_schedule": gc.beta_schedule,
                          "parameterization": gc.parameterization},
            "sampling": {"sampler": gc.sampler, "steps": gc.sample_steps, "eta": gc.sample_eta, "amp": gc.amp},
        })
        rcg = RCGGenerator.load(rdm_dir, gen_dir)
        rcg.sample(8, steps=2, batch_size=8)  # warm-up
        gen_steps = args.gen_steps or cfg.evaluate.sample_steps
        t0 = time.perf_counter()
        reps = rcg.sample_reps(args.n, batch_size=max(args.batch, RDM_BATCH))  # what rcg.sample draws
        spent = {"rdm": time.perf_counter() - t0}
        rcg.from_reps(reps, cfg=args.cfg, steps=gen_steps, batch_size=args.batch)
        total = time.perf_counter() - t0

    share = spent["rdm"] / total
    print(f"RCG generation of {args.n} images, {args.threads} thread(s), shared CPU (expect noise):")
    print(f"  RDM {rc.arch}: {rc.sample_steps} DDIM steps, {spent['rdm']:.2f} s "
          f"({args.n / spent['rdm']:.0f} reps/s)")
    print(f"  generator {gc.arch}: {gen_steps} steps, cfg {args.cfg}, "
          f"{total - spent['rdm']:.2f} s ({args.n / (total - spent['rdm']):.1f} img/s)")
    print(f"RDM share of RCG generation time: {share:.3f}")


if __name__ == "__main__":
    main()
