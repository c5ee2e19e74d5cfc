"""Typed configuration: params.yaml -> dataclasses -> plain functions.

params.yaml holds every value each stage runs with, so DVC tracks values, not overrides
(`dvc params diff`, `dvc exp show`, `dvc exp run -S train_rdm.lr=1e-4`). `rcg params --preset NAME`
writes it (`write_params`). Resolution order (later wins):
  1. the dataclass defaults below: the embedded default preset (Fashion-MNIST on a laptop CPU);
  2. a preset (``rcg/presets/<name>.yaml``, overrides only): the one `rcg params --preset` or a
     one-off `rcg <stage> --preset` names; for params.yaml, the one its header records, which
     fills in only keys the file lacks (a file older than the key);
  3. the stage blocks of params.yaml (left out by a one-off `--preset` run);
  4. ``--set key=value`` on the command line.

Every key is checked before any work starts: an unknown key, a value of the wrong type or one
outside its range (each block's RANGES table, `check_ranges`) raises :class:`ConfigError` naming
the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml

from rcg.io import PipelineError, atomic_path

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_NAMES = ("tiny", "default", "folder", "imagenet256", "imagenet256_mage_b", "imagenet256_mage_l")


class ConfigError(ValueError, PipelineError):
    """A params.yaml or preset value that cannot be used; the message names the dotted key (a
    user-facing failure like any PipelineError, raised before the stage's work starts)."""


# --------------------------------------------------------------------------------------------------
# Allowed values. Each block lists every field in its RANGES table: a `Range`, or FREE where the
# type says it all (bool, a Literal's choices) or any string is fine. `check_ranges` applies them
# to every resolved config, so a value that cannot work stops before any work starts.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The values a number, string or list field allows (floats must also be finite: no NaN, inf).

    `zero_ok`: 0 is allowed too ("off"/"all") besides the bounds; `item`: each list item's range;
    `why`: a few words for the error message where the bound is not obvious.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    zero_ok: bool = False
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False  # strings and lists
    length: int | None = None  # lists: exactly this many items
    unique: bool = False  # lists: no item twice
    item: Range | None = None
    why: str = ""


FREE: Range | None = None  # any value of the field's type
POSITIVE = Range(gt=0)  # learning rates, temperatures, scales: > 0 and finite
COUNT = Range(ge=1)  # steps, sizes, batch sizes, intervals: 0 makes no sense
NON_NEGATIVE = Range(ge=0)  # 0 means off / all / the default (the field's comment says which)
PROBABILITY = Range(ge=0, le=1)
SEED = Range(ge=0, why="numpy seeds are non-negative")
PATH = Range(nonempty=True, why="an empty path is the working folder")


# --------------------------------------------------------------------------------------------------
# Stage blocks. One dataclass per block of params.yaml; a comment on every default says why.
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardConfig:
    """`rcg shard`: turn an image source into WebDataset shards (stage `shard`, docs/design.md)."""

    source: Literal["fashion_mnist", "folder"] = "fashion_mnist"  # the embedded default
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"  # Debian `dataset-fashion-mnist`
    folder: str = ""  # image folder: ImageNet layout (train/<class>/*) or flat, unlabelled
    # A folder without val/ holds out this share of its images for val (0: no val split; at most
    # 0.5), chosen by key hash, so the stages that evaluate on val work on any folder. 5% is what
    # ImageNet's 50k of 1.28M is to the train split, about.
    val_fraction: float = 0.05
    # ... but at least this many, while that stays within a quarter of the folder (a 160-image
    # folder: 40 val, 120 train): 50 images give a kNN accuracy or an FD a usable, if noisy, value.
    val_min_count: int = 50
    min_size: int = 8  # images whose shorter side is below this are skipped (too small to use)
    # Files larger than this (64 MiB) are skipped unread: a shard worker holds one whole file in
    # memory and copies it into a tar. A 40-megapixel photo is ~10 MB as a JPEG at quality 90 and
    # ~35 MB at quality 100, so any JPEG within max_pixels fits; a 40 MP PNG photo may not.
    max_file_bytes: int = 67_108_864
    # Images with more pixels are skipped, judged from the header alone (no decode): each epoch a
    # loader worker decodes a kept image in full before resizing it, and at 40 MP that is 120 MB of
    # RGB pixels and ~0.5 s of one core. 40 MP is far above ImageNet's photos (mostly under 0.5 MP)
    # and most cameras' output; larger photos are best downscaled first. PIL's decompression-bomb
    # limit (200 MP, rcg.data.images) applies on top.
    max_pixels: int = 40_000_000
    max_per_split: int = 0  # cap on images per split (0: all); the tiny preset uses a few hundred
    # Samples per .tar. FMNIST's 10k val samples are then one ~23 MB shard (tar headers and blocks
    # dwarf each ~300-byte PNG), which one loader worker reads (WebDataset splits whole shards over
    # ranks and workers); on 2 cores a second worker did not help (docs/measurements.md#shard-size).
    shard_size: int = 10000
    workers: int = 2  # processes writing shards in parallel (one shard per process at a time)
    # "structure": JPEG segments + end marker, PNG chunk CRCs (rcg.data.images.prepare), no pixel
    # decode, about as fast as tar cf on photos; "decode": decode every image with PIL (also
    # catches damage inside the compressed data, at many times the cost: docs/measurements.md#shard-verify)
    verify: Literal["structure", "decode"] = "structure"

    RANGES: ClassVar[dict[str, Range | None]] = {
        "source": FREE, "fashion_mnist_dir": PATH, "folder": FREE,  # folder: the stage asks for it
        "val_fraction": Range(ge=0, le=0.5, why="train keeps most images"), "val_min_count": NON_NEGATIVE,
        "min_size": COUNT, "max_file_bytes": COUNT, "max_pixels": COUNT, "max_per_split": NON_NEGATIVE,
        "shard_size": COUNT, "workers": COUNT, "verify": FREE,
    }


@dataclass
class DataConfig:
    """How every later stage reads the shards (one reader, rcg.data.loader)."""

    shards_dir: str = "data/shards"
    image_size: int = 28  # side of the square images the models see
    channels: int = 1  # 1 for grayscale Fashion-MNIST, 3 for photographs
    num_workers: int = 2  # DataLoader workers; shards are split across them
    shuffle_buffer: int = 2000  # samples kept for WebDataset's in-memory shuffle
    # A resumed run replays its stream up to here (samples per loader worker, read but not decoded)
    # so that it sees exactly the data of an uninterrupted run; beyond, the stream is reseeded.
    resume_replay_max: int = 2_000_000
    # Where the training streams (loader mode `train`) decode JPEGs: `cpu` = PIL in the DataLoader
    # workers; `cuda` = nvjpeg (torchvision.io.decode_jpeg) on the GPU, a batch at a time in the
    # training process, with the resize and crop there too (rcg.data.gpu_decode), for photographs
    # when the CPU cores cannot feed the GPU (benchmarks/bench_input.py measures both). PNGs, and
    # every `once` stream (encode, evaluation), decode on the CPU either way. `cuda` needs a CUDA GPU
    # (docs/measurements.md#gpu).
    decode_device: Literal["cpu", "cuda"] = "cpu"

    RANGES: ClassVar[dict[str, Range | None]] = {
        "shards_dir": PATH,
        # The evaluation CNN halves the side twice (rcg.metrics.evalnet), the generators halve it or
        # cut it into patches, and shard.min_size keeps nothing below 8 px by default.
        "image_size": Range(ge=8, why="the models downsample it; smaller images are skipped when sharding"),
        "channels": Range(choices=(1, 3), why="grayscale or RGB"),
        "num_workers": NON_NEGATIVE, "shuffle_buffer": COUNT, "resume_replay_max": NON_NEGATIVE,
        "decode_device": FREE,
    }


@dataclass
class EncoderConfig:
    """`rcg encoder`: the frozen SSL encoder (paper section 3.1, docs/paper.md#representation; MoCo v3).

    With `checkpoint` set, an official file is converted (strictly) into models/encoder/; otherwise
    MoCo v3 pretrains the architecture below on the train shards. The size fields apply when `arch`
    is empty; a named `arch` (rcg.encoders.vit.ENCODER_ARCHS) brings its own size and ImageNet normalisation.
    """

    checkpoint: str = ""  # official checkpoint file; empty = pretrain MoCo v3 on the train shards
    checkpoint_format: Literal["mocov3", "dino", "ibot", "deit"] = "mocov3"  # layout of `checkpoint`
    arch: str = ""  # e.g. mocov3_vit_base for the official ViT-B; empty = the size fields below
    img_size: int = 28  # encoder input side; inputs are normalised then resized bicubic to it
    # 28 px / 7 = 16 tokens: fast enough for CPU pretraining; patch 4 (49 tokens) at the same cost per
    # step learned less (docs/measurements.md#encoder-patch-size).
    patch_size: int = 7
    # How pixels become the 4x4 tokens when pretraining (rcg.encoders.vit.conv_stem): "patch" = ViT's
    # linear patch projection, "conv" = 3x3 stride-2 convolutions (Xiao et al. 2021), which learns
    # a clearly better representation for a few % less speed (docs/measurements.md#encoder-stem).
    # A converted checkpoint always has a patch projection.
    stem: Literal["patch", "conv"] = "conv"
    # ~0.9M-parameter backbone; width 128 runs faster, but not enough to train longer within the
    # encoder's 10-minute CPU budget (docs/measurements.md#encoder-width-and-depth).
    embed_dim: int = 192
    depth: int = 2  # deeper ViTs learn less in the CPU budget (docs/measurements.md#encoder-width-and-depth)
    num_heads: int = 3  # 64-d heads, as in ViT-S/B
    mlp_ratio: float = 4.0  # standard ViT
    proj_hidden_dim: int = 1024  # MoCo v3 uses 4096; smaller keeps the CPU preset fast
    rep_dim: int = 256  # the representation RCG conditions on (projector output)
    # Per-channel input normalisation of a pretrained encoder; empty: measured on the train shards
    # (one value per data.channels), so a new folder needs no setting. A named `arch` brings its own.
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # MoCo v3 pretraining (used only when `checkpoint` is empty)
    # 6 epochs = 1406 steps, so pretraining stays inside the encoder's 10-minute CPU budget on a slow
    # day too; each doubling of the length gains less (docs/measurements.md#encoder-pretraining-length).
    epochs: float = 6.0
    batch_size: int = 256  # global batch (split over torchrun ranks); negatives per query
    # Base lr per 256 images (lr = blr * batch / 256); MoCo v3 ViT: 1.5e-4. The short FMNIST run with
    # the conv stem learns best near 1e-3 (docs/measurements.md#encoder-learning-rate).
    lr: float = 1e-3
    weight_decay: float = 0.1  # MoCo v3 ViT recipe, AdamW (docs/measurements.md#encoder-recipe)
    warmup_epochs: float = 0.5  # linear warm-up, then half-cosine decay
    temperature: float = 0.1  # InfoNCE temperature; beat MoCo v3 ViT's 0.2 (docs/measurements.md#encoder-recipe)
    momentum: float = 0.99  # key encoder's momentum, cosine-increased to 1 (docs/measurements.md#encoder-recipe)
    pred_hidden_dim: int = 1024  # predictor MLP width (MoCo v3: 4096), scaled like the projector
    freeze_patch_embed: bool = True  # MoCo v3's random fixed patch projection (stem "patch" only; a conv stem trains)
    # random-resized-crop area [min, 1] (MoCo v3: 0.08); on FMNIST a larger minimum did better, up to
    # 0.7 (docs/measurements.md#encoder-augmentation)
    crop_min_scale: float = 0.7
    jitter: float = 0.4  # brightness/contrast jitter strength (MoCo v3: 0.4)
    blur_prob: float = 1.0  # Gaussian blur probability of view 1 (view 2: a tenth of it)
    # Blur sigma range in pixels of the encoder input. MoCo v3: 0.1-2.0 px on 224 px crops; scaled
    # to 28 px that is <= 0.25 px and blurs nothing; 0.05-1.0 px did best
    # (docs/measurements.md#encoder-augmentation).
    blur_sigma: list[float] = field(default_factory=lambda: [0.05, 1.0])
    solarize_prob: float = 0.2  # solarisation probability of view 2 (MoCo v3: 0.2)
    amp: bool = True  # bf16 autocast: ~2x faster on CPU, no GradScaler needed
    knn_k: int = 20  # neighbours in the kNN check of metrics/encoder.json
    knn_max_train: int = 0  # cap on train samples for the kNN check (0 = all)
    ckpt_every: int = 200  # optimiser steps between resumable checkpoints
    log_every: int = 20  # optimiser steps between MLflow metric points
    seed: int = 0
    out_dir: str = "models/encoder"
    checkpoint_dir: str = "checkpoints/encoder"  # resumable MoCo state (dvc: persist, no cache)
    metrics_file: str = "metrics/encoder.json"  # the headline numbers (`dvc metrics show`)
    details_file: str = "metrics/details/encoder.json"  # everything the stage measured
    curves_file: str = "metrics/curves/encoder.tsv"  # the training curve (`dvc plots show`)

    RANGES: ClassVar[dict[str, Range | None]] = {
        "checkpoint": FREE, "checkpoint_format": FREE, "arch": FREE, "stem": FREE,
        "img_size": Range(ge=8, why="the encoder's input side, as data.image_size"), "patch_size": COUNT,
        "embed_dim": Range(ge=4, multiple_of=4, why="the 2-D sin-cos position embedding uses quarters"),
        "depth": COUNT, "num_heads": COUNT, "mlp_ratio": POSITIVE, "proj_hidden_dim": COUNT, "rep_dim": COUNT,
        "mean": Range(item=Range()), "std": Range(item=POSITIVE),  # lengths: see _cross_checks
        "epochs": POSITIVE, "batch_size": Range(ge=2, why="the other images of the batch are the negatives"),
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "temperature": POSITIVE,
        "momentum": PROBABILITY, "pred_hidden_dim": COUNT, "freeze_patch_embed": FREE,
        "crop_min_scale": Range(gt=0, le=1, why="a share of the image area"),
        "jitter": Range(ge=0, le=1, why="brightness and contrast factors stay in [1 - jitter, 1 + jitter]"),
        "blur_prob": PROBABILITY, "blur_sigma": Range(length=2, item=POSITIVE, why="[min, max] pixels"),
        "solarize_prob": PROBABILITY, "amp": FREE, "knn_k": COUNT, "knn_max_train": NON_NEGATIVE,
        "ckpt_every": COUNT, "log_every": COUNT, "seed": SEED,
        "out_dir": PATH, "checkpoint_dir": PATH, "metrics_file": PATH, "details_file": PATH, "curves_file": PATH,
    }


@dataclass
class EncodeConfig:
    """`rcg encode`: representations of every sample and its flip to Parquet."""

    batch_size: int = 512  # images per forward (x2 with the flipped view); inference only
    # DataLoader workers for this stage alone (data.num_workers serves the training stages). 0 =
    # decode in the stage's own process: on 2 cores a worker competes with the forward's two
    # threads, and 28 px PNGs decode in a fraction of the forward's time
    # (docs/measurements.md#encode-loader-workers). Photographs in JPEG want workers (imagenet256
    # sets 10). The rows do not depend on it (rcg.stages.encode.write_split).
    num_workers: int = 0
    out_dir: str = "data/features"
    uniformity_samples: int = 10000  # reps used for the uniformity loss (pairwise, O(n^2))

    RANGES: ClassVar[dict[str, Range | None]] = {
        "batch_size": COUNT, "num_workers": NON_NEGATIVE, "out_dir": PATH,
        "uniformity_samples": Range(ge=2, why="the loss is over pairs"),
    }


@dataclass
class RDMConfig:
    """`rcg train-rdm`: the representation diffusion model (paper section 3.2, docs/paper.md#rdm-network)."""

    arch: str = "small"  # size in rcg.rdm.RDM_ARCHS; 512 x 4 (~3M) fits a CPU budget; paper: "paper" (12 x 1536)
    class_cond: bool = True  # also train the class-conditional RDM when the features carry labels
    timesteps: int = 1000  # T of the reference
    beta_schedule: Literal["sqrt_linear", "linear", "cosine"] = "sqrt_linear"  # the reference's "linear"
    linear_start: float = 0.0015  # reference beta_1
    linear_end: float = 0.0195  # reference beta_T
    # The reference RDM predicts x0 (imagenet256 keeps that). On the CPU budget x0-prediction leaves the
    # small-variance directions of the rep collapsed; v-prediction, which keeps an identity path at
    # low noise, scores far better (docs/measurements.md#rdm-parameterisation).
    parameterization: Literal["x0", "eps", "v"] = "v"
    # What the RDM gets wrong on the CPU budget is the rep's low-variance directions: its samples
    # carry excess variance there (a smoothed distribution), which dominates fd_train. Longer
    # training, a decaying lr and more low-noise timesteps each cut it (steps, lr_decay_frac and this
    # power; the sweep: docs/measurements.md#rdm-schedule). Low-noise timesteps settle those
    # directions; power p draws t = T u^p (1 = the reference's uniform).
    timestep_power: float = 2.0
    steps: int = 16000  # optimiser steps per RDM (~68 epochs of the 120k reps); ~7 min on 2 quiet cores
    batch_size: int = 512  # global batch, split over ranks (reference: 4 x 128)
    lr: float = 3e-3  # peak lr, no warm-up (reference: 5.12e-4 constant, kept by imagenet256)
    # Linear decay to 0 over this last fraction of `steps` (0 = the reference's constant lr): with a
    # constant lr the EMA alone leaves the net noisy in those directions.
    lr_decay_frac: float = 0.5
    weight_decay: float = 0.01  # reference AdamW weight decay, on all parameters
    ema_decay: float = 0.9999  # reference LitEma, with warm-up min(decay, (1+n)/(10+n))
    amp: bool = True  # bf16 autocast (training and sampling): 3x faster on this CPU; reference: fp32
    threads: int = 0  # torch CPU threads; 0 = torch's default (1 is faster on a busy shared CPU)
    ckpt_every: int = 500  # steps between resumable checkpoints (checkpoints/train_rdm/)
    log_every: int = 100  # steps between loss logs (MLflow, progress bar)
    # The reference's 250 respaced DDIM steps; on the default run's RDM 1000 steps score the same
    # (docs/measurements.md#rdm-sampler).
    sample_steps: int = 250  # DDIM steps at sampling time (reference: 250 of 1000)
    # Deterministic DDIM (eta 0), not the reference's eta 1 (imagenet256 keeps 1): its samples lie
    # closer to the noise floor and scatter less over draws, and the rcg images do not tell the two
    # apart (docs/measurements.md#rdm-sampler).
    eta: float = 0.0  # DDIM eta (reference: 1.0 everywhere)
    temperature: float = 1.0  # DDIM noise temperature (reference: 1.0; `--temp` is MAGE's, not this)
    n_eval: int = 5000  # N: RDM samples and random real reps per Frechet distance in metrics/rdm.json
    # Each FD in metrics/rdm.json is the mean over this many independent draws of N (fresh samples,
    # fresh real reps): one draw scatters too much to compare runs by
    # (docs/measurements.md#rdm-evaluation-draws).
    eval_repeats: int = 4
    eval_batch_size: int = 2500  # samples per DDIM batch during evaluation (memory vs speed)
    seed: int = 0
    out_dir: str = "models/rdm"
    checkpoint_dir: str = "checkpoints/train_rdm"
    metrics_file: str = "metrics/rdm.json"  # the headline numbers (`dvc metrics show`)
    details_file: str = "metrics/details/rdm.json"  # everything the stage measured: per draw, per class
    curves_dir: str = "metrics/curves"  # + /rdm.tsv, /rdm_class.tsv: the training curves (`dvc plots show`)

    RANGES: ClassVar[dict[str, Range | None]] = {
        "arch": FREE, "class_cond": FREE, "timesteps": COUNT, "beta_schedule": FREE,
        "linear_start": Range(gt=0, lt=1, why="a beta"), "linear_end": Range(gt=0, lt=1, why="a beta"),
        "parameterization": FREE, "timestep_power": POSITIVE, "steps": COUNT, "batch_size": COUNT,
        "lr": POSITIVE, "lr_decay_frac": PROBABILITY, "weight_decay": NON_NEGATIVE,
        "ema_decay": Range(gt=0, lt=1, why="the EMA weights are the model written"),
        "amp": FREE, "threads": NON_NEGATIVE, "ckpt_every": COUNT, "log_every": COUNT,
        "sample_steps": COUNT,  # <= timesteps: _cross_checks
        "eta": Range(ge=0, le=1, why="DDIM (0) to DDPM-like (1) noise"), "temperature": POSITIVE,
        "n_eval": Range(ge=2, why="a Frechet distance needs a covariance"), "eval_repeats": COUNT,
        "eval_batch_size": COUNT, "seed": SEED, "out_dir": PATH, "checkpoint_dir": PATH, "metrics_file": PATH,
        "details_file": PATH, "curves_dir": PATH,
    }


@dataclass
class GeneratorConfig:
    """`rcg train-generator`: the representation-conditioned image generator (paper section 3.3,
    docs/paper.md#image-generators)."""

    # Model (rcg.generators.REGISTRY). The default is the small ADM-style U-Net: at the same CPU
    # time it scored better than dit_fmnist for mode rcg, and its samples are not blocky
    # (docs/measurements.md#generator-choice). The DiT stays the 256 px diffusion generator; the
    # MAGE sizes (MAGE-B, MAGE-L, mage_fmnist, mage_tiny) generate the ids of `tokenizer` instead.
    arch: str = "unet_fmnist"
    rep_drop_prob: float = 0.1  # share of reps swapped for the learned fake_latent (reference: 0.1)
    # Condition `cluster` (paper Table 9a's k-means cluster labels; rcg.clusters): k, the number of
    # clusters of the train representations; 0 = the number of classes when the shards have labels,
    # else round(sqrt(n / 100)) (rcg.clusters.default_k says why). Lloyd iterations of k-means, a fixed
    # count (it stops earlier only at a fixed point), after k-means++ seeding from `seed`.
    clusters: int = 0
    cluster_iters: int = 50
    # The contrastive posterior (rcg.priors): each training image is conditioned on one of
    # `posterior_bank` hypersphere samples drawn by softmax(cos(its rep, sample) / temperature), not on
    # its own rep. `none` keeps the rep generator as the paper trains it; the `contrastive` condition
    # always trains with it. With 256-d reps and a bank of 1024, temperature 0.03 carries about 2 nats
    # of the image (log(bank) - H(softmax)), a 10-class label's 2.3: 0.1 carries 0.2, 0.01 5.7.
    rep_posterior: Literal["none", "contrastive"] = "none"
    posterior_temperature: float = 0.03
    posterior_bank: int = 1024
    vae: str = ""  # diffusers AutoencoderKL folder for latent space (256 px); empty = pixel space
    vae_scale: float = 0.0  # latent scale; 0 = the VAE config's scaling_factor (SD VAE: 0.18215)
    tokenizer: str = "models/tokenizer"  # the VQ tokenizer folder a MAGE arch works in (`rcg tokenizer`)
    # Diffusion (rcg.diffusion): ADM's linear 1e-4..0.02 over 1000 steps as the reference DiT.
    timesteps: int = 1000
    beta_schedule: Literal["sqrt_linear", "linear", "cosine"] = "linear"
    # v-prediction (Salimans & Ho 2022): with eps the short-trained U-Net's small eps errors at high
    # noise are amplified ~150x into x0 (saturated, noisy samples); v keeps them bounded. The
    # reference DiT predicts eps (imagenet256 preset), its learned sigma dropped.
    parameterization: Literal["eps", "x0", "v"] = "v"
    # Where the representation of each training crop comes from. `cache` looks up the encode
    # stage's orig/flip views: exact when the only augmentation is a flip (square images at
    # data.image_size) and much cheaper than running the encoder; `encoder` runs it on the fly
    # (needed for random crops, e.g. ImageNet).
    rep_source: Literal["cache", "encoder"] = "cache"
    # Check the first batch's cached reps against the encoder once (and a MAGE's cached token ids,
    # tokenizer.cache_ids, against the tokenizer).
    verify_cache: bool = True
    hflip: bool = True  # random horizontal flip (reference: RandomCrop + HFlip)
    # Optimisation (reference DiT: AdamW lr 1e-4 constant, betas (0.9, 0.95), wd 0, EMA 0.9999).
    steps: int = 1000  # unet_fmnist: ~0.8 CPU-s per step at batch 128, ~800 CPU-s (~8 min on 2 quiet cores)
    batch_size: int = 128  # per process, per micro-batch
    # Gradient accumulation: batches per optimiser step, so the global batch is batch_size x processes
    # x accum_steps (the reference's global batch on fewer or smaller GPUs). 1: one batch per step.
    accum_steps: int = 1
    lr: float = 1e-3  # a small model learns faster with a larger lr; warm-up keeps it stable
    warmup_steps: int = 100  # linear warm-up, then constant (so extending `steps` can resume)
    # After the warm-up: `constant` (the reference DiT) or a half cosine to 0 (the reference MAGE).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Reference DiT: 0. MAGE's 0.05 skips biases and 1-D weights (norms), as timm's add_weight_decay.
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables (the reference DiT does not clip)
    ema_decay: float = 0.999  # 0.9999 needs far more steps than a CPU run takes; 0: no EMA (MAGE)
    amp: bool = True  # bf16 autocast: measured faster than fp32 on CPU (AVX512-bf16) and on GPU
    threads: int = 0  # torch CPU threads; 0 = torch's default (1 is faster on a busy shared CPU)
    ckpt_every: int = 250  # optimiser steps between resumable checkpoints (~200 CPU-s of U-Net training)
    log_every: int = 50  # steps between MLflow loss/throughput metrics
    sample_every: int = 500  # steps between sample grids (<out_dir>/<condition>/samples.png, MLflow)
    # Sampling (the grids here and `rcg generate`)
    sampler: Literal["ddim", "ddpm"] = "ddim"  # ddpm = ancestral over respaced steps (reference)
    sample_steps: int = 50  # MAGE: iterations of parallel decoding (reference: 20)
    sample_eta: float = 0.0  # DDIM eta for images: 0 = deterministic given the noise
    # MAGE's re-masking temperature (the reference's --temp: 6.0 for MAGE-B, 11.0 for MAGE-L)
    choice_temperature: float = 6.0
    # Clamp each sampling step's x0 estimate to [-c, c] in pixel space (ADM's clip_denoised; never on
    # VAE latents, whose range is open). Keeps early high-noise errors of a short CPU run from
    # saturating whole images; 0 = off (the reference DiT, latent space).
    sample_clip_x0: float = 1.0
    grid_size: int = 64  # images in each sample grid
    seed: int = 0
    checkpoint_dir: str = "checkpoints/train_generator"  # + /<condition>/checkpoint-last.pt
    metrics_dir: str = "metrics"  # metrics/generator_<condition>.json: the headline numbers
    details_dir: str = "metrics/details"  # + /generator_<condition>.json: everything the stage measured
    curves_dir: str = "metrics/curves"  # + /generator_<condition>.tsv: the training curve (`dvc plots show`)
    out_dir: str = "models/generator"  # + /<condition>/generator.{safetensors,json}, samples.png

    RANGES: ClassVar[dict[str, Range | None]] = {
        "arch": FREE, "rep_drop_prob": PROBABILITY, "vae": FREE, "vae_scale": NON_NEGATIVE, "tokenizer": PATH,
        "clusters": Range(ge=2, zero_ok=True, why="0 chooses k from the data; one cluster is no condition"),
        "cluster_iters": NON_NEGATIVE, "rep_posterior": FREE, "posterior_temperature": POSITIVE,
        "posterior_bank": Range(ge=2, why="a choice needs at least two samples"),
        "timesteps": COUNT,
        "beta_schedule": FREE, "parameterization": FREE, "rep_source": FREE, "verify_cache": FREE, "hflip": FREE,
        "steps": COUNT, "batch_size": COUNT, "accum_steps": COUNT, "lr": POSITIVE, "warmup_steps": NON_NEGATIVE,
        "lr_schedule": FREE,
        "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
        "ema_decay": Range(ge=0, lt=1, why="0 means no EMA; 1 would never move"), "amp": FREE,
        "threads": NON_NEGATIVE, "ckpt_every": COUNT, "log_every": COUNT, "sample_every": NON_NEGATIVE,
        "sampler": FREE, "sample_steps": COUNT, "sample_eta": Range(ge=0, le=1, why="DDIM eta"),
        "choice_temperature": NON_NEGATIVE,
        "sample_clip_x0": NON_NEGATIVE, "grid_size": COUNT, "seed": SEED,
        "checkpoint_dir": PATH, "metrics_dir": PATH, "details_dir": PATH, "curves_dir": PATH, "out_dir": PATH,
    }


@dataclass
class EvalNetConfig:
    """`rcg evalnet`: the domain classifier whose features score generated images.

    Without Inception weights (no network here), a small CNN trained on the labelled train split
    stands in as the feature extractor (docs/design.md, "The embedded default"). Its Frechet distance is
    reported as `fd` under extractor `evalnet`, never as FID.
    """

    width: int = 32  # channels of the first conv block (doubled in the second): ~0.3M params, fast on CPU
    feature_dim: int = 128  # penultimate width: the features FD/KID/precision/recall are computed on
    epochs: float = 3.0  # >= 0.92 test accuracy on Fashion-MNIST in minutes (docs/measurements.md#evalnet)
    batch_size: int = 256  # large enough for stable BatchNorm statistics, small enough for CPU
    lr: float = 2e-3  # AdamW with cosine decay; robust for small CNNs
    weight_decay: float = 1e-4  # light regularisation; the classifier must generalise to val, not memorise
    label_smoothing: float = 0.0  # none: smoothing would cap the softmax confidence that IS reads
    # Without labels the same CNN trains by SimCLR (rcg.metrics.evalnet): its view crops and loss temperature.
    ssl_crop_min_scale: float = 0.3  # smallest random-resized-crop area; SimCLR's 0.08 is too harsh at 28 px
    ssl_temperature: float = 0.2  # NT-Xent temperature (SimCLR: 0.1-0.5 depending on batch size)
    ckpt_every: int = 200  # optimiser steps between resumable checkpoints
    log_every: int = 50  # optimiser steps between loss logs (progress bar, MLflow)
    seed: int = 0
    out_dir: str = "models/evalnet"
    checkpoint_dir: str = "checkpoints/evalnet"
    metrics_file: str = "metrics/evalnet.json"  # the headline numbers (`dvc metrics show`)
    details_file: str = "metrics/details/evalnet.json"  # everything the stage measured: per class
    curves_file: str = "metrics/curves/evalnet.tsv"  # the training curve (`dvc plots show`)

    RANGES: ClassVar[dict[str, Range | None]] = {
        "width": COUNT, "feature_dim": COUNT, "epochs": POSITIVE,
        "batch_size": Range(ge=2, why="BatchNorm needs two samples; SimCLR needs negatives"),
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "label_smoothing": Range(ge=0, lt=1, why="1 would leave no signal"),
        "ssl_crop_min_scale": Range(gt=0, le=1, why="a share of the image area"), "ssl_temperature": POSITIVE,
        "ckpt_every": COUNT, "log_every": COUNT, "seed": SEED,
        "out_dir": PATH, "checkpoint_dir": PATH, "metrics_file": PATH, "details_file": PATH, "curves_file": PATH,
    }


@dataclass
class TokenizerConfig:
    """`rcg tokenizer`: the VQGAN whose codebook ids MAGE generates (paper section 3.3,
    docs/paper.md#image-generators; rcg.tokenizers).

    With `checkpoint` set, the official MaskGIT VQGAN file (`vqgan_jax_strongaug.ckpt`, arch
    `maskgit_f16`, RGB) is loaded strictly; otherwise the `arch` is trained on the train shards, since
    a new domain needs its own codebook. Either way models/tokenizer/ (with the train split's ids when
    `cache_ids`), metrics/details/tokenizer.json (reconstruction error, Frechet distance of
    reconstructions, codebook usage on val, the training summary) and its headline in
    metrics/tokenizer.json are written.
    """

    checkpoint: str = ""  # official tokenizer file; empty = train `arch` on the train shards
    # rcg.tokenizers.vqgan.VQ_ARCHS: maskgit_f16 (the official, 16x16 ids at 256 px), vq_fmnist
    # (7x7 ids at 28 px, 256 codes: measured against larger sizes on 2 CPU cores), vq_tiny (tests)
    arch: str = "vq_fmnist"
    steps: int = 1500  # optimiser steps; ~0.2 s each for vq_fmnist at batch 128 on 2 cores
    batch_size: int = 128  # images per step (one process: codebook restarts are per-process state)
    lr: float = 2e-3  # peak AdamW lr: a small conv net trained briefly takes a large lr
    warmup_steps: int = 50  # linear warm-up, then a half cosine to 0
    weight_decay: float = 0.0  # none on the codebook ever; the convolutions have GroupNorm after them
    recon_loss: Literal["l2", "l1"] = "l2"  # pixel loss; l2 matches the MSE/PSNR the stage reports
    beta: float = 0.25  # commitment weight (VQ-VAE, taming's VQGAN)
    # Codebook usage (rcg.tokenizers.train): k-means of the first batch's encoder outputs as the
    # initial codebook (0 iterations: random outputs), and dead-code restarts every `restart_every`
    # steps (0: off) of codes used less than `restart_below` x the average code.
    kmeans_iters: int = 10
    restart_every: int = 100
    restart_below: float = 0.03
    amp: bool = True  # bf16 autocast where it measures faster here (rcg.precision)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    eval_images: int = 10000  # val images scored in metrics/tokenizer.json (0: the whole val split)
    eval_batch_size: int = 500  # images per encode/decode batch when scoring (and for the ids pass)
    # For a MAGE arch whose training crops are fixed per image (train_generator.rep_source cache: the
    # flip is the only augmentation), tokenize the train split once, both views when
    # train_generator.hflip, into <out_dir>/ids.parquet; training then reads each batch's ids there
    # instead of running the tokenizer per step (rcg.generators.tokens; docs/measurements.md#token-id-cache).
    cache_ids: bool = True
    ckpt_every: int = 250  # optimiser steps between resumable checkpoints
    log_every: int = 50  # optimiser steps between loss logs (progress bar, MLflow)
    seed: int = 0
    out_dir: str = "models/tokenizer"
    checkpoint_dir: str = "checkpoints/tokenizer"  # resumable training state (dvc: persist, no cache)
    metrics_file: str = "metrics/tokenizer.json"  # the headline numbers (`dvc metrics show`)
    details_file: str = "metrics/details/tokenizer.json"  # everything the stage measured

    RANGES: ClassVar[dict[str, Range | None]] = {
        "checkpoint": FREE, "arch": Range(nonempty=True, why="a name in rcg.tokenizers.vqgan.VQ_ARCHS"),
        "steps": COUNT, "batch_size": COUNT, "lr": POSITIVE, "warmup_steps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE, "recon_loss": FREE, "beta": NON_NEGATIVE, "kmeans_iters": NON_NEGATIVE,
        "restart_every": NON_NEGATIVE, "restart_below": Range(ge=0, le=1, why="a share of the average code's use"),
        "amp": FREE, "threads": NON_NEGATIVE,
        "eval_images": Range(ge=2, zero_ok=True, why="0 means the whole val split; the distance needs 2"),
        "eval_batch_size": COUNT, "cache_ids": FREE, "ckpt_every": COUNT, "log_every": COUNT, "seed": SEED,
        "out_dir": PATH, "checkpoint_dir": PATH, "metrics_file": PATH, "details_file": PATH,
    }


# The generation modes of docs/design.md (rcg.metrics.evaluation.MODES, which a test compares).
EVAL_MODES = ("uncond", "label", "rcg", "rcg_cfg", "rcg_class", "oracle", "oracle_val", "cluster", "hypersphere",
              "contrastive")


@dataclass
class EvaluateConfig:
    """`rcg evaluate`: every generation mode scored with torch-fidelity (docs/paper.md#evaluation)."""

    extractor: Literal["evalnet", "inception"] = "evalnet"  # no Inception weights offline
    inception_weights: str = ""  # local Inception weights file; empty: torch's hub cache, else error
    modes: list[str] = field(default_factory=lambda: list(EVAL_MODES))  # every generation mode of docs/design.md
    n_samples: int = 2000  # generated images per mode (and real train images for the floor);
    # sampling dominates the stage (~450 s per 2k images on 2 cores); the paper uses 50k
    n_reference: int = 0  # real val images in the reference statistics (0: the whole val split)
    # ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: mu/sigma of Inception pool features and
    # arr_0, 10k reference images) or MAR's adm_in256_stats.npz (mu/sigma only): FID against its
    # mu/sigma, KID and precision/recall against arr_0's features (docs/paper.md#evaluation). Empty:
    # the val split is the reference.
    reference_stats: str = ""
    # How the class modes ask for classes: the train split's frequencies, or exactly n / K each
    # (the reference's 50 per class at 50k; with it, n_samples must be a multiple of the classes).
    class_balance: Literal["train", "uniform"] = "train"
    # Generated images written to disk as they are scored, to check with other tools (ADM's
    # evaluator reads the npz): lossless PNGs, an ADM-format npz (arr_0, NHWC uint8), or none.
    save_samples: Literal["none", "png", "npz", "both"] = "none"
    samples_dir: str = "outputs/samples"  # + /<mode>/
    batch_size: int = 250  # images per generator call; bounded by memory, not by speed on CPU
    feature_batch_size: int = 200  # images per feature-extractor batch (features are taken as images come)
    sample_steps: int = 50  # generator sampling steps (the step count dominates the stage's time)
    cfg: float = 1.0  # guidance scale of mode `rcg_cfg` (MAGE-B's 1.0 in the reference)
    cfg_schedule: Literal["constant", "linear"] = "linear"  # the reference grows guidance linearly
    kid_subset_size: int = 1000  # torch-fidelity's default; clipped to the sample count
    prc_neighborhood: int = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019's default)
    grid_size: int = 64  # images in each mode's sample grid under plots/
    seed: int = 0
    # One scored draw of every mode per entry, with seed `seed + entry` (its images, class or cluster
    # ids and oracle reps): the rows keep the first draw's numbers, and with more than one entry add
    # fd_mean, fd_std and fd_seed_<entry>. [0]: one draw, the table as before.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # The modes drawn again for every further seed ([]: all of `modes`); the others are drawn once.
    # By default the rows of the paper's Table 9a ordering and the prior that replaces the RDM.
    seed_modes: list[str] = field(default_factory=lambda: ["oracle", "rcg", "label", "cluster", "hypersphere"])
    # Classification Accuracy Score (Ravuri & Vinyals 2019): the evaluation classifier's architecture
    # trained on the first `cas_samples` generated images of each class-conditional mode (label,
    # rcg_class, cluster; at most n_samples; 0: off) with their asked-for classes, tested on the real
    # val split; beside it the same training on as many real train images. ~1 min per mode on 2 cores.
    cas_samples: int = 2000
    cas_steps: int = 500  # optimiser steps of each CAS classifier (AdamW, cosine decay)
    cas_batch_size: int = 128
    cas_lr: float = 2e-3  # the evaluation classifier's own lr (evalnet.lr)
    metrics_file: str = "metrics/eval.json"  # headline: each mode's fd and the floor (`dvc metrics show`)
    details_file: str = "metrics/details/eval.json"  # the whole table (what `rcg report` and promote read)
    plots_dir: str = "plots"
    cache_dir: str = "data/fidelity_cache"  # reference features/statistics, reused across runs

    RANGES: ClassVar[dict[str, Range | None]] = {
        "extractor": FREE, "inception_weights": FREE,
        "modes": Range(nonempty=True, unique=True, item=Range(choices=EVAL_MODES)),
        "n_samples": Range(ge=2, why="a Frechet distance needs a covariance"),
        "n_reference": Range(ge=2, zero_ok=True, why="0 means the whole val split"),
        "reference_stats": FREE, "class_balance": FREE, "save_samples": FREE, "samples_dir": PATH,
        "batch_size": COUNT, "feature_batch_size": COUNT, "sample_steps": COUNT, "cfg": NON_NEGATIVE,
        "cfg_schedule": FREE, "kid_subset_size": Range(ge=2, why="KID's unbiased estimate needs pairs"),
        "prc_neighborhood": COUNT, "grid_size": COUNT, "seed": SEED,
        "seeds": Range(nonempty=True, unique=True, item=SEED),
        "seed_modes": Range(unique=True, item=Range(choices=EVAL_MODES)),
        "cas_samples": Range(ge=2, zero_ok=True, why="0 turns CAS off; a classifier needs examples"),
        "cas_steps": COUNT, "cas_batch_size": Range(ge=2, why="the classifier has BatchNorm"), "cas_lr": POSITIVE,
        "metrics_file": PATH, "details_file": PATH, "plots_dir": PATH, "cache_dir": PATH,
    }


@dataclass
class DistConfig:
    """How the training stages run: processes (torchrun; rcg/launch.py) and GPU settings (rcg.training)."""

    # 1: a plain single process; N > 1: the CLI re-executes the stage under
    # `torchrun --standalone --nproc_per_node N`; 0: one process per visible GPU.
    nproc_per_node: int = 1
    # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions (rcg.training.use_tf32), what the
    # parts of a step outside bf16 autocast run in. No effect on CPU.
    tf32: bool = True
    # torch.compile the model for the training steps (rcg.training.compiled). Off: compiling costs
    # minutes at start and its gain depends on the model and the device (benchmarks/bench_compile.py,
    # benchmarks/bench_gpu_train.py --compile; docs/measurements.md#gpu).
    compile: bool = False

    RANGES: ClassVar[dict[str, Range | None]] = {"nproc_per_node": NON_NEGATIVE, "tf32": FREE, "compile": FREE}


@dataclass
class TrackingConfig:
    """MLflow: where runs go. The default is a local file store inside the project (git-ignored)."""

    # MLflow 3's file store is in maintenance mode, so the local default is SQLite (+ artifact folder).
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_dir: str = "mlruns/artifacts"  # for experiments this project creates (local URIs only)
    enabled: bool = True
    experiment_prefix: str = "rcg"
    registered_model: str = "rcg-generator"
    # When the tracking store cannot be reached or written (rcg.tracking): "fail" stops the stage with
    # one line naming the URI; "continue" warns once and runs the stage without tracking.
    on_error: Literal["fail", "continue"] = "fail"

    RANGES: ClassVar[dict[str, Range | None]] = {
        "uri": Range(nonempty=True, why="MLflow's store"), "artifact_dir": PATH, "enabled": FREE,
        "experiment_prefix": Range(nonempty=True, why="names the experiments"),
        "registered_model": Range(nonempty=True, why="the registry name"), "on_error": FREE,
    }


@dataclass
class Config:
    """The whole resolved configuration: one attribute per params.yaml block."""

    # The preset the values were made from (params.yaml's `# preset:` header line, or a one-off
    # `--preset`), recorded in MLflow tags; it fills in only keys that params.yaml lacks.
    preset: str = "default"
    shard: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train_rdm: RDMConfig = field(default_factory=RDMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    evalnet: EvalNetConfig = field(default_factory=EvalNetConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        (inner,) = get_args(tp)
        return f"list[{_type_name(inner)}]"
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key` and the expected type."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = get_args(tp)
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in config dataclasses")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML reads `1e-4` as a string (YAML 1.1), so accept numeric strings for floats.
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _bound(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _bounds_text(r: Range) -> str:
    """`> 0`, `in [0, 1]`, `0 or >= 2`, ... (empty when `r` has no bounds)."""
    lo = (">=", "[", r.ge) if r.ge is not None else (">", "(", r.gt) if r.gt is not None else None
    hi = ("<=", "]", r.le) if r.le is not None else ("<", ")", r.lt) if r.lt is not None else None
    if lo and hi:
        text = f"in {lo[1]}{_bound(lo[2])}, {_bound(hi[2])}{hi[1]}"
    elif lo or hi:
        op, _, v = lo or hi  # type: ignore[misc]
        text = f"{op} {_bound(v)}"
    else:
        return ""
    return f"0 or {text}" if r.zero_ok else text


def _number_ok(value: float, r: Range) -> bool:
    if r.zero_ok and value == 0:
        return True
    return not (
        (isinstance(value, float) and not math.isfinite(value))
        or (r.ge is not None and not value >= r.ge) or (r.gt is not None and not value > r.gt)
        or (r.le is not None and not value <= r.le) or (r.lt is not None and not value < r.lt)
        or (r.multiple_of and value % r.multiple_of) or (r.choices is not None and value not in r.choices)
    )


def _out_of_range(key: str, value: Any, r: Range, need: str, what: str = "is out of range") -> ConfigError:
    return ConfigError(f"{key}: {value!r} {what} (must {need}{': ' + r.why if r.why else ''})")


def _check_range(key: str, value: Any, r: Range) -> None:
    """Raise a ConfigError naming `key`, the value and what is allowed when `value` is outside `r`."""
    if isinstance(value, list):
        if r.nonempty and not value:
            raise _out_of_range(key, value, r, "not be empty", "is not allowed")
        if r.length is not None and len(value) != r.length:
            raise _out_of_range(key, value, r, f"have {r.length} items", "is not allowed")
        if r.unique and len(set(map(repr, value))) < len(value):
            raise _out_of_range(key, value, r, "name each item once", "is not allowed")
        for i, v in enumerate(value):
            _check_range(f"{key}[{i}]", v, r.item or Range())
    elif isinstance(value, str):
        if r.nonempty and not value.strip():
            raise _out_of_range(key, value, r, "not be empty", "is not allowed")
        if r.choices is not None and value not in r.choices:
            raise _out_of_range(key, value, r, "be one of " + ", ".join(map(repr, r.choices)), "is not allowed")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not _number_ok(value, r):
        if r.choices is not None:
            need = "be one of " + ", ".join(map(str, r.choices))
        else:
            parts = [_bounds_text(r)] + ([f"a multiple of {r.multiple_of}"] if r.multiple_of else [])
            bounded = (r.ge is not None or r.gt is not None) and (r.le is not None or r.lt is not None)
            if isinstance(value, float) and not bounded:
                parts.append("finite")
            need = "be " + " and ".join(p for p in parts if p)
        raise _out_of_range(key, value, r, need)


def _require(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range (must be {need})")


def _cross_checks(cfg: Config) -> None:
    """What two fields decide together (each field has passed its own Range)."""
    for block in ("train_rdm", "train_generator"):
        b = getattr(cfg, block)
        _require(b.sample_steps <= b.timesteps, f"{block}.sample_steps", b.sample_steps,
                 f"<= {block}.timesteps, {b.timesteps}: the sampler takes a subset of the diffusion's steps")
    steps, t = cfg.evaluate.sample_steps, cfg.train_generator.timesteps
    _require(steps <= t, "evaluate.sample_steps", steps, f"<= train_generator.timesteps, {t}")
    enc = cfg.encoder
    _require(enc.blur_sigma[0] <= enc.blur_sigma[1], "encoder.blur_sigma", enc.blur_sigma, "[min, max] with min <= max")
    if enc.arch:  # a named architecture brings its own size and normalisation
        return
    _require(enc.img_size % enc.patch_size == 0, "encoder.patch_size", enc.patch_size,
             f"a divisor of encoder.img_size, {enc.img_size}")
    _require(enc.embed_dim % enc.num_heads == 0, "encoder.num_heads", enc.num_heads,
             f"a divisor of encoder.embed_dim, {enc.embed_dim}")
    if not enc.checkpoint:  # a converted checkpoint's normalisation is checked against its 3 channels
        n = cfg.data.channels
        for key in ("mean", "std"):
            v = getattr(enc, key)
            _require(len(v) in (0, n), f"encoder.{key}", v,
                     f"empty (measured on the shards) or one value per channel (data.channels: {n})")
        _require(bool(enc.mean) == bool(enc.std), "encoder.std", enc.std,
                 "set together with encoder.mean, or both left empty")


def check_ranges(cfg: Config) -> None:
    """Check every value of `cfg` against its block's RANGES, then the cross-field rules."""
    for block in _block_names():
        obj = getattr(cfg, block)
        table = type(obj).RANGES
        for f in dataclasses.fields(obj):
            if f.name not in table:
                raise TypeError(f"{block}.{f.name}: no entry in {type(obj).__name__}.RANGES (a Range or FREE)")
            if table[f.name] is not None:
                _check_range(f"{block}.{f.name}", getattr(obj, f.name), table[f.name])
    _cross_checks(cfg)


SWITCH_PRESET = (
    "switch presets with `rcg params --preset NAME` (rewrites every value of params.yaml), or run "
    "one stage with `rcg <stage> --preset NAME`"
)
PRESET_KEY_ERROR = "preset: not a value of params.yaml; " + SWITCH_PRESET


def _apply(obj: Any, overrides: dict[str, Any], prefix: str) -> None:
    """Set `overrides` on dataclass `obj` in place, validating every key and type."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {overrides!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    if isinstance(obj, Config):
        names.discard("preset")  # set by whoever picks the values, never as a value itself
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(obj, Config) and key == "preset":
            raise ConfigError(PRESET_KEY_ERROR)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{dotted}: unknown key (known keys here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, dotted + ".")
        else:
            setattr(obj, key, _check_value(dotted, value, tp))


def _block_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "preset"]


def preset_overrides(name: str) -> dict[str, Any]:
    """The overrides a preset applies on top of the dataclass defaults (`default` has none)."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"preset: expected one of {', '.join(PRESET_NAMES)}, got {name!r}")
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage blocks")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """Turn `["train_rdm.lr=1e-4", "shard.workers=1"]` into a nested dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train_rdm.lr=1e-4")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set to a value by another --set, not a block")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _preset_values(name: str, overrides: dict[str, Any] | None = None) -> Config:
    cfg = Config()
    _apply(cfg, preset_overrides(name), "")
    _apply(cfg, overrides or {}, "")
    cfg.preset = name
    return cfg


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> Config:
    """The values of preset `name` then `overrides`, params.yaml left out (`--preset`, `rcg params`);
    every value checked against its range."""
    cfg = _preset_values(name, overrides)
    check_ranges(cfg)
    return cfg


def missing_keys(params: dict[str, Any]) -> list[str]:
    """Dotted keys of the config that a params.yaml mapping does not hold (in field order)."""
    missing = []
    for block in _block_names():
        values = params.get(block) or {}
        fields = dataclasses.fields(getattr(Config(), block))
        missing += [f"{block}.{f.name}" for f in fields if f.name not in values]
    return missing


def resolve(
    params: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    source: str = "params.yaml",
) -> Config:
    """Build a validated Config from a params.yaml mapping and optional `--set` overrides.

    Order: dataclass defaults < preset < the mapping < overrides. The mapping normally holds every
    value (`rcg params` writes it so), and `preset`, the one its header records, only names where
    the values came from. A key the mapping lacks (a file older than the key) takes the preset's
    value, with a warning. A top-level `preset` key (files from before complete params.yaml, or
    `Config.to_dict()`) names the preset the same way; `load` refuses it in a complete params.yaml.
    """
    if not isinstance(params, dict):
        raise ConfigError(
            f"{source}: not a params file: expected a mapping of stage blocks at the top, got "
            f"{type(params).__name__} {str(params)[:40]!r}"
        )
    params = dict(params)
    legacy = params.pop("preset", None)
    if legacy is not None:
        legacy = _check_value("preset", legacy, str)
        if preset is not None and preset != legacy:
            raise ConfigError(f"preset: {source} says {legacy!r} but its header says {preset!r}")
    name = legacy or preset or "default"
    cfg = _preset_values(name)
    _apply(cfg, {k: ({} if v is None else v) for k, v in params.items()}, "")
    missing = missing_keys(params)
    if missing:
        log.warning(
            "%s lacks %d keys (%s%s): preset %s's values are used; `rcg params` writes them in",
            source, len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "", name,
        )
    _apply(cfg, overrides or {}, "")
    check_ranges(cfg)
    return cfg


def recorded_preset(text: str) -> str | None:
    """The preset named by a `# preset: NAME` line in the leading comments of params.yaml text."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return None
        m = re.fullmatch(r"#\s*preset:\s*(\S+)\s*", line.strip())
        if m:
            return m.group(1)
    return None


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate params.yaml (see `resolve`; its preset is the header's `# preset:`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{path}: params file not found (run from the project root, pass --params, or write "
            "one with `rcg params --preset default`)"
        )
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a params file (pass --params path/to/params.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a params file: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file ({e.strerror or e})") from None
    return load_text(text, overrides, str(path))


def load_text(
    text: str, overrides: dict[str, Any] | None = None, source: str = "params.yaml"
) -> Config:
    """`load` for params.yaml text already in memory."""
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({yaml_problem(e)})") from None
    cfg = resolve(params, overrides, recorded_preset(text), source)
    if "preset" in params and not missing_keys(params):
        # Every value is in the file, so the key would silently change nothing (this is what
        # `dvc exp run -S ++preset=tiny` makes); an older file with missing keys still uses it.
        raise ConfigError(
            f"preset: {source} holds every value, so `preset: {params['preset']}` would change "
            "nothing; remove the key, or " + SWITCH_PRESET
        )
    return cfg


# --------------------------------------------------------------------------------------------------
# Writing params.yaml: every value, so that DVC sees the values that run (`rcg params`)
# --------------------------------------------------------------------------------------------------

PARAMS_HEADER = """\
# rcg parameters: every value the pipeline stages run with; each key is documented in rcg/config.py.
# DVC tracks them: `dvc params diff` and `dvc exp show` show the values that ran.
# preset: {preset}
# made by: {made_by}
# Switch preset (rewrites every value below): rcg params --preset {choices}
# Change a value: edit it here, `dvc exp run -S train_rdm.lr=1e-4`, or `rcg params --set KEY=VALUE`.
"""


def params_values(cfg: Config) -> dict[str, dict[str, Any]]:
    """{block: {key: value}} of every params.yaml block of `cfg`."""
    return {block: dataclasses.asdict(getattr(cfg, block)) for block in _block_names()}


def render_params(values: dict[str, Any], preset: str, made_by: str) -> str:
    """params.yaml text: the header recording `preset` and `made_by`, then one block per stage."""
    header = PARAMS_HEADER.format(preset=preset, made_by=made_by, choices="|".join(PRESET_NAMES))
    # Block style throughout, as DVC writes the file back after `dvc exp run -S` (no diff noise).
    blocks = [yaml.safe_dump({k: v}, sort_keys=False, width=1000) for k, v in values.items()]
    return header + "\n" + "\n".join(blocks)


def write_params(
    path: str | Path = "params.yaml", preset: str | None = None, sets: list[str] | None = None
) -> Config:
    """`rcg params`: write every value to params.yaml (atomically) and return the Config written.

    With `preset`: that preset's values then `sets` (`key=value`), whatever the file held. Without:
    the file's own values (missing keys filled in from its recorded preset) then `sets`.
    """
    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a folder, not a params file (pass --params path/to/params.yaml)")
    sets = list(sets or [])
    overrides = parse_set(sets)
    cfg = preset_config(preset, overrides) if preset else load(path, overrides)
    args = ["rcg", "params", *(["--preset", preset] if preset else [])]
    made_by = shlex.join(args + [a for s in sets for a in ("--set", s)])
    if not preset:
        made_by += f" (on the previous {Path(path).name})"
    text = render_params(params_values(cfg), cfg.preset, made_by)
    if load_text(text, source=str(path)) != cfg:  # YAML must carry every value unchanged
        raise RuntimeError(f"{path}: the rendered params do not read back as the values written")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return cfg
