"""MAGE training step: tokenizing every batch (what train_generator does) against precomputed ids.

A MAGE generator (paper section 3.3) learns on the token ids of a frozen VQ tokenizer. Today
`rcg.generators.training._data` runs the tokenizer's encoder on each training batch
(`TokenCodec.encode` in its `prepare`). When the training crop is fixed (Fashion-MNIST: the
images are already `data.image_size`, so the loader's resize + crop is the identity) and the only
augmentation is the horizontal flip, each image has exactly two id grids (orig, flip) that could be
computed once, as the encode stage already does for the representations (rcg.features.RepCache).
This script measures what that would save, on real Fashion-MNIST batches, in one process:

  A (per step): tokenize the batch + MAGE loss forward/backward under bf16 autocast (the default
                preset's train_generator.amp) + gradient clipping + AdamW, as rcg.training's step
                does, with the MAGE recipe (weight decay 0.05 off biases and norms, clip 3.0, no
                EMA: the imagenet256_mage_* presets, tests/test_mage_pipeline.py);
  B (cached):   the same step fed the batch's ids looked up in a precomputed pass (the tokenize
                part removed).

Both get the same batches, the same representations (with rep_source cache, the default, the
reps are a Parquet lookup in both: nothing to save there) and the same model code; batches are
read into memory first, so the loader's cost (the same in A and B) is left out. After a warm-up, A
and B alternate step by step (ABAB, the tokenizer alone timed between them), `--rounds` rounds of
`--steps` steps each; each round gives a ratio B/A of its mean step times.

The tokenizer is the folder `--tokenizer` names when it holds one (a trained `rcg tokenizer`),
else `vq_fmnist` with random weights (rcg.tokenizers), its codebook initialised as the tokenizer
stage initialises it (k-means of the first batch's encoder outputs), so that the ids spread over
the codebook as a trained one's do. Exactness: the ids the loader path computes for a
batch (batch of `--batch`, flipped views included) must equal those of the precomputed pass (once
over the split, batches of tokenizer.eval_batch_size, both views); both run in fp32
(TokenCodec.encode disables autocast).

    .venv/bin/python benchmarks/bench_token_cache.py [--batch 128] [--rounds 6] [--steps 10] [--threads 2]
                                                     [--tokenizer models/tokenizer]

The last line prints the cached / per-step ratio of seconds per step (< 1.0: caching is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
from _timing import spread, timed
from torch import Tensor, nn

from rcg import config as config_mod
from rcg.data.loader import make_loader
from rcg.generators import build_generator
from rcg.generators.tokens import TokenCodec, mage_kwargs, weight_decay_groups
from rcg.stages import shard
from rcg.tokenizers import build_vqgan, save_tokenizer
from rcg.tokenizers.train import kmeans
from rcg.training import EMA, adamw, autocast

Views = dict[tuple[str, int], Tensor]  # (key, 1 if flipped) -> ids [T]


@dataclass
class Batch:
    """One training batch as train_generator's `prepare` sees it, before tokenizing."""

    keys: list[str]
    flipped: Tensor  # [B] bool: which images are the flipped view
    x: Tensor  # [B, C, H, W] in [0, 1]: the augmented crops

    def cached_ids(self, views: Views) -> Tensor:
        """The batch's ids [B, T] looked up in the precomputed pass."""
        return torch.stack([views[(k, int(f))] for k, f in zip(self.keys, self.flipped.tolist())])


def make_tokenizer(cfg: config_mod.Config, folder: Path) -> TokenCodec:
    """A `vq_fmnist` tokenizer with random weights, its codebook the k-means of the first train
    batch's encoder outputs (rcg.tokenizers.train's initialisation), written and reloaded as a folder."""
    vq = build_vqgan("vq_fmnist", in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    x = next(iter(make_loader(cfg.data, "train", "once", cfg.tokenizer.batch_size, num_workers=0)))["image"]
    with torch.no_grad():
        z = vq.encoder(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        centres = kmeans(flat, vq.codebook_size, cfg.tokenizer.kmeans_iters, torch.Generator().manual_seed(0))
        vq.quantize.embedding.weight.copy_(centres)
    save_tokenizer(vq, folder, "vq_fmnist", {"source": "random weights, k-means codebook (benchmark)"})
    return TokenCodec(folder)


def precomputed_ids(cfg: config_mod.Config, codec: TokenCodec) -> tuple[Views, float]:
    """The precomputed pass: ids of both views of every train image, once over the split in
    batches of tokenizer.eval_batch_size; and its seconds per image."""
    views: Views = {}
    t0, n = time.perf_counter(), 0
    for batch in make_loader(cfg.data, "train", "once", cfg.tokenizer.eval_batch_size, num_workers=0):
        x = batch["image"]
        ids = codec.encode(torch.cat([x, x.flip(-1)]))  # (2B, T): both views in one pass
        for i, key in enumerate(batch["key"]):
            views[(key, 0)], views[(key, 1)] = ids[i], ids[len(x) + i]
        n += len(x)
    return views, (time.perf_counter() - t0) / n


def training_batches(cfg: config_mod.Config, count: int) -> list[Batch]:
    """`count` batches of the training stream, flipped as train_generator's `prepare` flips them."""
    gcfg = cfg.train_generator
    torch.manual_seed(gcfg.seed)
    out = []
    loader = iter(make_loader(cfg.data, "train", "train", gcfg.batch_size, seed=gcfg.seed, num_workers=0))
    for _ in range(count):
        b = next(loader)
        x = b["image"]
        flipped = (torch.rand(len(x)) < 0.5) if gcfg.hflip else torch.zeros(len(x), dtype=torch.bool)
        out.append(Batch(b["key"], flipped, torch.where(flipped[:, None, None, None], x.flip(-1), x)))
    return out


def check_exact(codec: TokenCodec, batches: list[Batch], views: Views) -> tuple[int, int]:
    """(differing ids, all ids) between the loader path's encode and the precomputed pass."""
    diff = total = 0
    for b in batches:
        fresh = codec.encode(b.x)
        diff += int((fresh != b.cached_ids(views)).sum())
        total += fresh.numel()
    return diff, total


def step_fn(cfg: config_mod.Config, codec: TokenCodec, batches: list[Batch], reps: list[Tensor],
            cached: list[Tensor] | None) -> Callable[[int], None]:
    """`step(i)`: one training step on batch i, tokenizing it (cached None) or reading its ids."""
    gcfg, device = cfg.train_generator, torch.device("cpu")
    model = build_generator("mage_fmnist", **mage_kwargs(codec, "rep", 256, 10, gcfg.rep_drop_prob)).train()
    opt = adamw(weight_decay_groups(model, gcfg.weight_decay), gcfg.lr, betas=(0.9, 0.95), device=device)
    ema = EMA(model, gcfg.ema_decay) if gcfg.ema_decay > 0 else None
    # Each side draws its mask ratios and masks from its own stream with the same seed, so step i of
    # A and of B keep the same number of tokens (the encoder's cost follows it).
    masks = torch.Generator().manual_seed(gcfg.seed)

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        ids = codec.encode(b.x) if cached is None else cached[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(device, gcfg.amp):
            loss = model.loss(ids, rep=reps[i % len(batches)], generator=masks)
        loss.backward()
        if gcfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), gcfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)

    return step



def alternate(sides: dict[str, Callable[[int], None]], tokenize: Callable[[int], None], rounds: int,
              steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each side and of the tokenizer alone: the mean of each round, wall and
    CPU, and the fastest single step (the least disturbed by neighbours). Within a round the three
    alternate step by step (A, B, tokenize, A, B, ...): on a shared machine the neighbours' load
    changes within seconds, and adjacent steps see about the same."""
    per_step: dict[str, list[float]] = {k: [] for k in [*sides, "tokenize only"]}
    cpu: dict[str, list[float]] = {k: [] for k in per_step}
    fastest = dict.fromkeys(per_step, float("inf"))
    for r in range(rounds):
        wall = dict.fromkeys(per_step, 0.0)
        used: dict[str, list[float]] = {k: [] for k in per_step}
        for i in range(r * steps, (r + 1) * steps):
            for name, fn in [*sides.items(), ("tokenize only", tokenize)]:
                dt = timed(lambda fn=fn: fn(i), used[name])
                wall[name], fastest[name] = wall[name] + dt, min(fastest[name], dt)
        for name in per_step:
            per_step[name].append(wall[name] / steps)
            cpu[name].append(sum(used[name]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms ({cpu[k][-1] / steps * 1e3:.0f} CPU-ms)"
                                             for k, v in per_step.items()), flush=True)
    return per_step, cpu, fastest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="train images sharded (the precomputed pass covers them)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6, help="timed ABAB rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per round and side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", default="models/tokenizer", help="a trained tokenizer folder, if present")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = config_mod.preset_config("default")
    cfg.tracking.enabled = False  # no MLflow store in the working directory
    cfg.train_generator.arch, cfg.train_generator.batch_size = "mage_fmnist", args.batch
    # The MAGE recipe; hflip stays on so that the exactness check covers both views (a flip costs
    # the same in A and B, and is done before the timing).
    cfg.train_generator.weight_decay, cfg.train_generator.grad_clip, cfg.train_generator.ema_decay = 0.05, 3.0, 0.0
    gcfg = cfg.train_generator
    with tempfile.TemporaryDirectory(prefix="bench-token-cache-") as tmp:
        cfg.data.shards_dir, cfg.shard.max_per_split = str(Path(tmp) / "shards"), args.n
        shard.run(cfg)
        trained = (Path(args.tokenizer) / "tokenizer.safetensors").is_file()
        codec = TokenCodec(args.tokenizer) if trained else make_tokenizer(cfg, Path(tmp) / "tokenizer")
        print(f"tokenizer: {args.tokenizer if trained else 'vq_fmnist, random weights, k-means codebook'}")
        views, pass_s = precomputed_ids(cfg, codec)
        batches = training_batches(cfg, max(args.steps, 4))
    diff, total = check_exact(codec, batches, views)
    used = len(torch.cat(list(views.values())).unique())
    print(f"exactness: loader-path ids vs precomputed pass: {diff} of {total} ids differ "
          f"({len(batches)} batches of {args.batch}, both views; {used} of {codec.codebook_size} codes in use)")
    cached = [b.cached_ids(views) for b in batches]
    reps = [torch.randn(args.batch, 256) for _ in batches]  # the cache's lookup, the same in A and B
    sides = {"A per-step": step_fn(cfg, codec, batches, reps, None),
             "B cached": step_fn(cfg, codec, batches, reps, cached)}
    for fn in sides.values():
        for i in range(args.warmup):
            fn(i)
    tokenize = lambda i: codec.encode(batches[i % len(batches)].x)  # noqa: E731
    per_step, cpu, fastest = alternate(sides, tokenize, args.rounds, args.steps)
    grid = "x".join(map(str, codec.grid))
    print(f"mage_fmnist on {grid} ids of {codec.codebook_size} codes, batch {args.batch}, {args.threads} thread(s), "
          f"{'bf16 autocast' if gcfg.amp else 'fp32'}, grad clip {gcfg.grad_clip}, "
          f"EMA {gcfg.ema_decay or 'off'}, hflip {gcfg.hflip}; {args.rounds} ABAB rounds of {args.steps} steps "
          "(shared CPU: expect noise)")
    for name, v in per_step.items():
        cpu_ms = [c / args.steps for c in cpu[name]]
        print(f"  {name:14s} ms per batch: {spread([x * 1e3 for x in v], '{:.1f}')}  "
              f"({args.batch / statistics.median(v):6.0f} img/s); CPU-ms {spread([x * 1e3 for x in cpu_ms], '{:.1f}')}")
    print(f"precomputed pass: {pass_s * 1e3:.3f} ms per image for both views "
          f"({pass_s * 60000:.0f} s for Fashion-MNIST's 60k train images)")
    a, b, t = (fastest[k] * 1e3 for k in per_step)
    print(f"fastest single steps: A {a:.0f} ms, B {b:.0f} ms (ratio {b / a:.3f}); A - B {a - b:.0f} ms, "
          f"tokenize only {t:.0f} ms")
    ratios = sorted(b / a for a, b in zip(per_step["A per-step"], per_step["B cached"]))
    cpu_ratio = sum(cpu["B cached"]) / sum(cpu["A per-step"])
    print(f"round ratios B/A: {' '.join(f'{r:.3f}' for r in ratios)}; CPU-time ratio B/A {cpu_ratio:.3f}")
    print(f"cached/per-step step time ratio: {statistics.median(ratios):.3f} "
          f"(spread {ratios[0]:.3f}..{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
