"""The `rcg` command: one subcommand per pipeline stage, plus generation and model tools.

Every stage subcommand reads params.yaml (`--params`), or a preset's values instead (`--preset`, a
one-off run), and takes `--set key=value` overrides; the resolved config is validated before any
work starts. Stage code lives in `rcg.stages.<name>.run`; this file only parses arguments and wires
them through. Two tools prepare the pipeline: `rcg params` writes params.yaml, `rcg code` the code
digests DVC's stages depend on (rcg.provenance).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rcg import config as config_mod
from rcg.io import PipelineError

# Telemetry off unless the user says otherwise: nothing may wait on the network.
for _k, _v in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_k, _v)

EPILOG = """\
examples:
  rcg params --preset tiny                  # params.yaml <- every value of the tiny preset
  rcg params --preset imagenet256 --set shard.folder=/data/imagenet
  rcg shard                                 # Fashion-MNIST -> data/shards (the values of params.yaml)
  rcg train-rdm --preset tiny --set train_rdm.steps=50   # one-off run, params.yaml left out
  dvc repro                                 # the whole pipeline, only what is stale
"""

# subcommand -> (module under rcg.stages, one-line help, longer description)
STAGES: dict[str, tuple[str, str, str]] = {
    "shard": (
        "shard",
        "image source -> WebDataset shards + manifest",
        "Read the source named by shard.source (Fashion-MNIST idx files, or an image folder in "
        "ImageNet layout or flat) and write data/shards/{train,val}/*.tar and manifest.json. "
        "Unusable files are skipped and listed with their reason in the manifest.",
    ),
    "encoder": (
        "encoder",
        "convert an official SSL checkpoint, or pretrain MoCo v3 on the train shards",
        "With encoder.checkpoint set, load it strictly (MoCo v3, DINO, iBOT or DeiT format) and "
        "write models/encoder/; otherwise pretrain MoCo v3 on the train shards (resumable). "
        "Writes metrics/encoder.json with kNN accuracy against a random init and raw pixels.",
    ),
    "encode": (
        "encode",
        "shards -> representations (orig + flip views) in Parquet",
        "Run the frozen encoder over every train and val sample and its horizontal flip, and "
        "write data/features/{train,val}.parquet and summary.json.",
    ),
    "train-rdm": (
        "train_rdm",
        "train the representation diffusion model (and its class-conditional twin)",
        "Train the RDM on the cached train representations; writes models/rdm/ and "
        "metrics/rdm.json (Frechet distances of RDM samples against train and val reps).",
    ),
    "sample-reps": (
        "sample_reps",
        "sample representations from the trained RDM to Parquet",
        "Draw --n representations from the RDM (class-conditional with --class) and write them "
        "to a Parquet file.",
    ),
    "tokenizer": (
        "tokenizer",
        "load the official MaskGIT VQGAN, or train a VQ tokenizer on the train shards",
        "The VQGAN whose codebook ids MAGE generates: with tokenizer.checkpoint set, load the "
        "official vqgan_jax_strongaug.ckpt strictly (weights-only); otherwise train tokenizer.arch "
        "on the train shards (resumable). Writes models/tokenizer/ and metrics/tokenizer.json "
        "(val reconstruction error, Frechet distance of reconstructions, codebook usage).",
    ),
    "train-generator": (
        "train_generator",
        "train the image generator conditioned on reps, labels, clusters or nothing",
        "Train the pixel generator with --condition rep (RCG), none (unconditional baseline), "
        "label (class-label baseline), cluster (k-means cluster labels of the train reps) or "
        "contrastive (reps drawn by the contrastive posterior); resumable checkpoints in "
        "models/generator/<condition>/.",
    ),
    "generate": (
        "generate",
        "generate images: RDM samples -> image generator (optionally guided)",
        "Sample representations from the RDM and decode them with the representation-conditioned "
        "generator; or condition on given images / interpolate between two images.",
    ),
    "evalnet": (
        "evalnet",
        "train the domain classifier used as an evaluation feature extractor",
        "Train a small classifier on the labelled train split; its features score generated "
        "images when Inception weights are not available. Writes metrics/evalnet.json.",
    ),
    "evaluate": (
        "evaluate",
        "score every generation mode with torch-fidelity",
        "Generate evaluate.n_samples images per mode and compute Frechet distance, IS, KID, "
        "precision and recall; writes metrics/eval.json (headline), metrics/details/eval.json (the table) and plots/.",
    ),
    "report": (
        "report",
        "print the evaluation table as Markdown beside the paper's numbers",
        "Read metrics/details/eval.json and print one row per generation mode.",
    ),
    "promote": (
        "promote",
        "move the @champion alias to a registered generator version if its fd is better",
        "Compare the fd of a registered model version with the current @champion and move the "
        "alias only when the new one is better.",
    ),
}


# Tools that prepare the pipeline rather than run a stage: (one-line help, longer description).
TOOLS: dict[str, tuple[str, str]] = {
    "params": (
        "write params.yaml: every value of a preset, or fill in the current file",
        "Write every value each stage runs with to params.yaml (atomically), so that DVC tracks "
        "values: with --preset, that preset's values (the file's current values are replaced); "
        "without, the file's own values with any missing key filled in. --set overrides either.",
    ),
    "code": (
        "write the code digest of each pipeline stage for DVC (.rcg/code/<stage>.txt)",
        "For each STAGE (a module of rcg.stages), list the rcg modules it runs, each with a hash of "
        "its syntax tree without docstrings, so that DVC reruns a stage on code changes but not on "
        "comment edits (rcg.provenance). The first stage of dvc.yaml.",
    ),
}

# Stages that train and therefore run under torchrun when dist.nproc_per_node asks for it.
TRAINING_COMMANDS = ("encoder", "train-rdm", "train-generator", "evalnet")
# Stages that never open an MLflow run: no tracking store is checked before them.
UNTRACKED_COMMANDS = ("generate", "report")


def _number(kind: type, low: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` >= `low`, or a one-line usage error saying so."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


COUNT = _number(int, 1, "an integer >= 1")
INDEX = _number(int, 0, "an integer >= 0")
SCALE = _number(float, 0.0, "a finite number >= 0")


def _add_common(p: argparse.ArgumentParser, preset_help: str = "") -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--preset",
        choices=config_mod.PRESET_NAMES,
        help=preset_help or "one-off run with this preset's values; params.yaml is not read",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train_rdm.lr=1e-4 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_stage_options(name: str, p: argparse.ArgumentParser) -> None:
    """Options that only one subcommand has; everything else comes from params.yaml."""
    if name == "sample-reps":
        p.add_argument("--n", type=COUNT, default=1000, help="how many representations")
        p.add_argument("--class", dest="class_id", type=INDEX, default=None,
                       help="class index for the class-conditional RDM (default: unconditional)")
        p.add_argument("--seed", type=INDEX, default=0)
        p.add_argument("--out", default="data/samples/reps.parquet", help="output Parquet file")
    elif name == "tokenizer":
        p.add_argument("--if-needed", action="store_true",
                       help="only when train_generator.arch is a MAGE arch; otherwise record a skip (dvc.yaml)")
    elif name == "train-generator":
        p.add_argument("--condition", choices=["rep", "none", "label", "cluster", "contrastive"], default="rep",
                       help="rep: RCG; none: unconditional baseline; label: class-label baseline; cluster: "
                            "k-means cluster-label baseline; contrastive: RCG through the contrastive posterior")
    elif name == "generate":
        p.add_argument("--n", type=COUNT, default=64, help="how many images")
        p.add_argument("--class", dest="class_id", type=INDEX, default=None,
                       help="class index, through the class-conditional RDM")
        p.add_argument("--cfg", dest="cfg_scale", type=SCALE, default=0.0,
                       help="guidance scale w: cond + w (cond - uncond) (0: none)")
        p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="linear",
                       help="constant scale, or the reference's linearly increasing one")
        p.add_argument("--steps", type=COUNT, default=None, help="sampling steps (default: params)")
        p.add_argument("--from-image", default=None,
                       help="condition on this image's representation (paper Fig. 6)")
        p.add_argument("--interpolate", nargs=2, default=None, metavar=("IMG_A", "IMG_B"),
                       help="interpolate between two images' representations (paper Fig. 7)")
        p.add_argument("--seed", type=INDEX, default=0)
        p.add_argument("--out", default="outputs/generate", help="output folder for PNGs + grid")
    elif name == "promote":
        p.add_argument("--version", default=None, help="model version (default: the latest)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcg",
        description="RCG: self-supervised representation generation for unconditional image "
        "generation (Li, Katabi & He, NeurIPS 2024), as a DVC/Prefect/MLflow pipeline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, short, long) in STAGES.items():
        p = sub.add_parser(name, help=short, description=long)
        _add_common(p)
        _add_stage_options(name, p)
    p = sub.add_parser("params", help=TOOLS["params"][0], description=TOOLS["params"][1])
    _add_common(p, "start from this preset's values (default: the values in --params)")
    p = sub.add_parser("code", help=TOOLS["code"][0], description=TOOLS["code"][1])
    p.add_argument("stages", nargs="+", metavar="STAGE", help="pipeline stage, e.g. train_rdm")
    p.add_argument("--package", default="rcg", help="the package folder to analyse (default: %(default)s)")
    p.add_argument("--out-dir", default=".rcg/code", help="where the digests go (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The stage's config: params.yaml, or with --preset that preset's values; then --set."""
    overrides: dict[str, Any] = config_mod.parse_set(args.overrides)
    if args.preset:
        return config_mod.preset_config(args.preset, overrides)
    return config_mod.load(args.params, overrides)


def check_tracking(command: str, cfg: config_mod.Config) -> config_mod.Config:
    """`cfg` with the tracking settings the stage runs with, its MLflow store checked first
    (rcg.tracking.preflight): on rank 0 of a stage that tracks; other ranks never open a run."""
    if command in UNTRACKED_COMMANDS or int(os.environ.get("RANK", "0")) != 0:
        return cfg
    from rcg.tracking import preflight

    return dataclasses.replace(cfg, tracking=preflight(cfg.tracking))


def run_tool(args: argparse.Namespace) -> int:
    """`rcg params` and `rcg code` (TOOLS)."""
    try:
        if args.command == "params":
            cfg = config_mod.write_params(args.params, args.preset, args.overrides)
            print(f"{args.params}: every value of preset {cfg.preset}"
                  + (f" with {len(args.overrides)} --set" if args.overrides else ""))
            return 0
        # Imported by name, like the stages: a stage's digest follows every import of rcg.cli, and
        # no stage runs the digest code itself.
        provenance = importlib.import_module("rcg.provenance")
        for path in provenance.write_digests(args.stages, args.package, args.out_dir):
            print(path)
        return 0
    except config_mod.ConfigError as e:
        print(f"rcg {args.command}: config error: {e}", file=sys.stderr)
    except (FileNotFoundError, SyntaxError) as e:
        print(f"rcg {args.command}: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log = logging.getLogger("rcg")
    if args.command in TOOLS:
        return run_tool(args)
    try:
        cfg = load_config(args)
    except config_mod.ConfigError as e:
        print(f"rcg {args.command}: config error: {e}", file=sys.stderr)
        return 2
    tracked = cfg.tracking.enabled
    try:
        cfg = check_tracking(args.command, cfg)
    except PipelineError as e:
        print(f"rcg {args.command}: error: {e}", file=sys.stderr)
        return 1
    # Converting an official encoder checkpoint trains nothing: one process does it.
    converting = args.command == "encoder" and bool(cfg.encoder.checkpoint)
    if args.command in TRAINING_COMMANDS and not converting:
        from rcg.launch import maybe_relaunch

        # dist.nproc_per_node > 1: this process becomes `torchrun ... -m rcg.cli <same args>`; a
        # store found unusable above stays off there without a second check and warning.
        relaunch_args = sys.argv[1:] if argv is None else list(argv)
        if tracked and not cfg.tracking.enabled:
            relaunch_args += ["--set", "tracking.enabled=false"]
        maybe_relaunch(cfg.dist.nproc_per_node, relaunch_args)
    module = importlib.import_module(f"rcg.stages.{STAGES[args.command][0]}")
    extra = {
        k: v
        for k, v in vars(args).items()
        if k not in {"command", "params", "preset", "overrides", "verbose"}
    }
    log.info("%s: preset=%s", args.command, cfg.preset)
    t0 = time.perf_counter()
    try:
        module.run(cfg, **extra)
    except (FileNotFoundError, PipelineError, config_mod.ConfigError) as e:
        # Expected user-facing failures (missing input, bad data): one clear line, no traceback.
        print(f"rcg {args.command}: error: {e}", file=sys.stderr)
        return 1
    log.info("%s: done in %.1fs", args.command, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
