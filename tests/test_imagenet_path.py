"""The ImageNet path end to end at miniature size: the imagenet256 preset through the whole dvc.yaml.

A user of the paper's setting (rcg/presets/imagenet256.yaml) points `shard.folder` at ImageNet,
puts the files the preset names beside the project (the official MoCo v3 checkpoint, the SD VAE
saved with `save_pretrained`, ADM's reference statistics, torch-fidelity's Inception weights, and
for MAGE the MaskGIT VQGAN) and runs `dvc exp run`. This test does exactly that with a miniature
ImageNet (3 classes with wnid names, train/<wnid>/ and val/<wnid>/, photographs of 256-400 px a side
cropped and rescaled from scikit-image's, as ImageNet's are larger than the training size: JPEGs,
and every third file a PNG, one of them grayscale and one with an alpha channel) and files of the
real layouts with random weights (tests/fakes.py), keeping every choice of the preset that makes it
the ImageNet path and shrinking only sizes, steps and counts (`OVERRIDES`), with one exception: the
training stages run as 2 torchrun processes (gloo), as on a GPU node, not as one (the encoder's
conversion, which trains nothing, stays one process). Every stage runs,
through DVC, offline: conversion of the checkpoint, encoding, the RDMs, the DiT on VAE latents for
the five conditions, evaluation with Inception against the reference file, registration in
MLflow. The registered model is then loaded the way a server loads it (from another folder) and
draws images. No GPU is needed, and nothing is downloaded (the caches torch and Hugging Face would
download into stay empty).

The slow test then switches the same project to the imagenet256_mage_b preset (MAGE on the
official VQGAN's ids, shrunk to `mage_tiny`), as a user would with `rcg params --preset`: only the
tokenizer, the generators, evaluation and promotion rerun.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from rcg import config
from rcg.encoders import RepEncoder
from tests.fakes import adm_reference_npz, official_checkpoint, official_vqgan, random_inception_weights, tiny_vae
from tests.mlflow_view import EVERY_STAGE, check_pipeline_run, store
from tests.test_pipeline import _expected_outputs

ROOT = Path(__file__).resolve().parents[1]
# ImageNet's first three classes (tench, goldfish, great white shark); each class's images are
# crops of one photograph, so the classes differ as classes do and the class modes mean something.
CLASSES = {"n01440764": "astronaut", "n01443537": "coffee", "n01484850": "chelsea"}
TRAIN_PER_CLASS, VAL_PER_CLASS, REFERENCE_IMAGES = 12, 3, 12
IMAGE_SIZE = 64  # a multiple of the SD VAE's factor 8 (8 x 8 latents) and the VQGAN's 16 (4 x 4 ids)
SOURCE_SIDES = (256, 400)  # the photographs' width and height range in px: never below the preset's 256
PNG_EVERY = 3  # every third file of a class is a PNG, the others JPEGs
# PNGs of other modes than RGB (file index in its class): grayscale, and RGBA, which the shard stage
# converts (alpha over white); both reach the models as RGB.
ODD_PNGS = {("n01443537", PNG_EVERY - 1): "L", ("n01484850", PNG_EVERY - 1): "RGBA"}
NPROC = 2  # torchrun processes per training stage (dist.nproc_per_node)
# The training stages (rcg.cli.TRAINING_COMMANDS): their command, and how often one pipeline runs it.
# The training stages and how often each runs (train_generator: once per condition); the encoder
# stage converts the official checkpoint, which trains nothing, so it runs as one process.
TRAINING = {"train_rdm": ("train-rdm", 1), "evalnet": ("evalnet", 1), "train_generator": ("train-generator", 5)}
N_SAMPLES = 6  # per mode: a multiple of the 3 classes, as class_balance uniform requires
# Where the files the preset names go, relative to the project: the preset's own paths, except the
# encoder's (ViT-S, MoCo v3's smallest released size, instead of ViT-B) and Inception's (the preset
# leaves it empty and asks for a local file).
ENCODER_FILE = "pretrained_enc_ckpts/mocov3/vit-s-300ep.pth.tar"
VAE_DIR = "models/vae/sd-vae-ft-ema"
REFERENCE_FILE = "fid_stats/VIRTUAL_imagenet256_labeled.npz"
INCEPTION_FILE = "pretrained/weights-inception-2015-12-05-6726825d.pth"
VQGAN_FILE = "vqgan_jax_strongaug.ckpt"  # the MAGE presets' tokenizer.checkpoint

OVERRIDES = [
    # Data: 64 px, decoded in the stage's own process (no loader workers, one shard writer: 2 cores).
    f"data.image_size={IMAGE_SIZE}", "data.num_workers=0", "encode.num_workers=0", "shard.workers=1",
    # The official MoCo v3 checkpoint of the smallest released size: same layout and conversion,
    # a quarter of ViT-B's cost per image on a CPU.
    "encoder.arch=mocov3_vit_small", f"encoder.checkpoint={ENCODER_FILE}",
    # The RDM: the tiny net, a few steps, a few samples in its check; the paper's recipe (x0, uniform
    # timesteps, constant lr, fp32, 250 DDIM steps at eta 1) stays.
    "train_rdm.arch=tiny", "train_rdm.steps=6", "train_rdm.n_eval=16",
    # The generators: the tiny DiT on the same SD-VAE latents (eps, crops encoded on the fly, DDPM
    # sampling stay), two steps of four images, a 2-step grid of four.
    "train_generator.arch=dit_tiny", "train_generator.steps=2", "train_generator.batch_size=4",
    "train_generator.sample_steps=2", "train_generator.grid_size=4",
    # Evaluation: Inception (weights from this file) against ADM's statistics stays; six samples per
    # mode (a multiple of the classes, as class_balance uniform needs) drawn in 2 steps.
    f"evaluate.inception_weights={INCEPTION_FILE}", f"evaluate.n_samples={N_SAMPLES}", "evaluate.sample_steps=2",
    # Every training stage as 2 gloo processes under torchrun (rcg.launch), as on a node of GPUs
    # (the preset's 0 means one per GPU: one here). dist is one block for all training stages.
    f"dist.nproc_per_node={NPROC}",
    # CAS: two steps of each classifier on the six samples of a class mode.
    "evaluate.cas_steps=2", "evaluate.cas_batch_size=4",
]
# The imagenet256_mage_b preset with OVERRIDES (the DiT's budget; 2 decoding iterations), and MAGE-B
# shrunk to the tiny MAGE: its sequence length and codebook come from the VQGAN (4 x 4 of 1024 at 64 px).
MAGE_OVERRIDES = ["train_generator.arch=mage_tiny"]
# What the switch to MAGE reruns; every other stage is up to date (its params and inputs unchanged).
MAGE_STAGES = {"tokenizer", "evaluate", "promote",
               *(f"train_generator@{c}" for c in ("rep", "none", "label", "cluster", "contrastive"))}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """`n` random crops of `photo`, each rescaled to its own width and height in `SOURCE_SIDES`
    (ImageNet's photographs come in every size and aspect; the loader resizes and crops them square)."""
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(min(h, w) // 3, min(h, w) * 4 // 5))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        lo, hi = SOURCE_SIDES
        size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
        out.append(Image.fromarray(photo[y : y + side, x : x + side]).resize(size, Image.BICUBIC))
    return out


def _save(img: Image.Image, path: Path, mode: str | None) -> None:
    """A JPEG as ImageNet's (quality 90), or a PNG of `mode` (RGB, L, or RGBA with a gradient alpha)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".JPEG":
        img.save(path, "JPEG", quality=90)
    elif mode == "RGBA":
        alpha = np.linspace(64, 255, img.width, dtype=np.uint8)[None].repeat(img.height, 0)
        Image.fromarray(np.dstack([np.asarray(img), alpha]), "RGBA").save(path, "PNG")
    else:
        img.convert(mode or "RGB").save(path, "PNG")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature ImageNet in the real layout: train/<wnid>/<wnid>_<n>.JPEG,
    val/<wnid>/ILSVRC2012_val_*.JPEG, every `PNG_EVERY`-th file a .png instead."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    val_id = 0
    for wnid, photo in CLASSES.items():
        crops = _crops(getattr(skdata, photo)(), TRAIN_PER_CLASS + VAL_PER_CLASS, rng)
        for i, img in enumerate(crops):
            ext = "png" if i % PNG_EVERY == PNG_EVERY - 1 else "JPEG"
            if i < TRAIN_PER_CLASS:
                path = root / "train" / wnid / f"{wnid}_{1000 + i}.{ext}"
            else:
                val_id += 1
                path = root / "val" / wnid / f"ILSVRC2012_val_{val_id:08d}.{ext}"
            _save(img, path, ODD_PNGS.get((wnid, i)))
    return root


def _external_files(repo: Path) -> RepEncoder:
    """The files the preset names, of their real layouts with random weights, where it names them;
    returns the encoder the checkpoint holds."""
    from rcg.encoders.vit import encoder_spec
    from rcg.metrics.extractors import INCEPTION
    from rcg.metrics.fidelity import Featurizer

    _, _, encoder = official_checkpoint("mocov3", repo / ENCODER_FILE, encoder_spec("mocov3_vit_small"))
    tiny_vae(repo / VAE_DIR, block_out_channels=(8, 16, 16, 16))  # four blocks: factor 8, as the SD VAE
    weights = random_inception_weights(repo / INCEPTION_FILE)
    # ADM's reference batch: photographs of the same classes (not the val images), at the image size.
    rng = np.random.default_rng(1)
    crops = [c.resize((IMAGE_SIZE, IMAGE_SIZE)) for photo in CLASSES.values()
             for c in _crops(getattr(skdata, photo)(), REFERENCE_IMAGES // len(CLASSES), rng)]
    images = torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2).contiguous()
    adm_reference_npz(repo / REFERENCE_FILE, images, Featurizer(INCEPTION, weights, 16))
    return encoder


def _project(repo: Path, imagenet: Path, env: dict[str, str]) -> None:
    """The project's files in a fresh git + DVC repository, params.yaml of the imagenet256 preset."""
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    sets = [a for kv in [f"shard.folder={imagenet}", *OVERRIDES] for a in ("--set", kv)]
    _run(["rcg", "params", "--preset", "imagenet256", *sets], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "imagenet256 preset"], repo, env)


def _finite(row: dict, keys: tuple[str, ...]) -> bool:
    return all(isinstance(row.get(k), float) and math.isfinite(row[k]) for k in keys)


@pytest.fixture(scope="module")
def dit_run(imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The project with the imagenet256 preset after one `dvc exp run` of every stage: its folder,
    the environment the stages ran in, what DVC and the stages printed, and the encoder the MoCo v3
    checkpoint holds."""
    tmp = tmp_path_factory.mktemp("imagenet-project")
    repo = tmp / "project"
    # Empty caches: Inception must come from the configured file, the VAE from its folder.
    homes = (tmp / "torch-home", tmp / "hf-home")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo), "TORCH_HOME": str(homes[0]), "HF_HOME": str(homes[1]),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    _project(repo, imagenet, env)
    encoder = _external_files(repo)
    r = _run([sys.executable, "-m", "dvc", "exp", "run"], repo, env)
    return SimpleNamespace(repo=repo, imagenet=imagenet, env=env, ran=r.stdout, log=r.stdout + r.stderr, homes=homes,
                           encoder=encoder)


def _ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_imagenet_preset_runs_every_stage_end_to_end(
    dit_run: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, env, ran = dit_run.repo, dit_run.env, dit_run.ran
    cfg = config.load(repo / "params.yaml")
    assert cfg.preset == "imagenet256"
    # What stays of the paper's setting (the preset's values, not overridden).
    assert (cfg.shard.source, cfg.encoder.checkpoint_format, cfg.train_generator.vae, cfg.evaluate.extractor,
            cfg.evaluate.reference_stats, cfg.evaluate.class_balance) == (
        "folder", "mocov3", VAE_DIR, "inception", REFERENCE_FILE, "uniform")
    rdm, gen = cfg.train_rdm, cfg.train_generator
    assert (rdm.parameterization, rdm.timestep_power, rdm.lr_decay_frac, rdm.amp, rdm.sample_steps, rdm.eta) == (
        "x0", 1.0, 0.0, False, 250, 1.0)
    assert (gen.parameterization, gen.rep_source, gen.sampler) == ("eps", "encoder", "ddpm")

    # Every stage of dvc.yaml ran (each condition of train_generator) and wrote every output it
    # declares; nothing is stale afterwards, and nothing was downloaded.
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    every = {f"{name}@{item}" if "foreach" in st else name
             for name, st in dvc_yaml["stages"].items() for item in st.get("foreach", [None])}
    assert _ran_stages(ran) == every, ran
    missing = [p for p in _expected_outputs(dvc_yaml, yaml.safe_load((repo / "params.yaml").read_text()))
               if not (repo / p).exists()]
    assert not missing, f"stage outputs missing after dvc exp run: {missing}"
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env).stdout
    assert "changed" not in status, status
    for home in dit_run.homes:
        assert not home.exists() or not any(home.rglob("*")), f"something was downloaded into {home}"

    _check_shards(repo, dit_run.imagenet)
    _check_world_size(dit_run.log)
    _check_encoder(repo, dit_run.encoder)
    _check_generators(repo)
    _check_evaluation(repo, cfg)
    check_pipeline_run(repo, EVERY_STAGE)  # what MLflow shows of the run (tests/mlflow_view.py)
    monkeypatch.chdir(tmp_path)  # as a server loads it: from another folder than the project
    _check_served_model(repo)


def _check_shards(repo: Path, imagenet: Path) -> None:
    """The manifest counts every file of the miniature ImageNet per split, JPEGs and PNGs, and names
    its classes; the shards hold the JPEGs and plain PNGs byte for byte, and the RGBA PNG converted
    to an 8-bit PNG (the one conversion, with its reason)."""
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == sorted(CLASSES)
    rgba = [f"{wnid}/{wnid}_{1000 + i}" for (wnid, i), mode in ODD_PNGS.items() if mode == "RGBA"]
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        paths = sorted((imagenet / split).rglob("*.*"))
        pngs = [p for p in paths if p.suffix == ".png"]
        assert len(paths) == per_class * len(CLASSES) and 0 < len(pngs) < len(paths)
        info = manifest["splits"][split]
        assert (info["written"], info["skipped"]) == (len(paths), 0), (split, info)
        members = _shard_members(repo / "data" / "shards" / split)
        assert sorted(members) == sorted((f"{p.parent.name}/{p.stem}", "png" if p in pngs else "jpg") for p in paths)
        for (key, ext), data in members.items():  # the files' own bytes, but for the converted one
            source = imagenet / split / f"{key}.{'png' if ext == 'png' else 'JPEG'}"
            assert (data == source.read_bytes()) == (key not in rgba), key
    assert [(c["split"], c["key"]) for c in manifest["converted"]] == [("train", k) for k in rgba]
    assert all("alpha" in c["reason"] for c in manifest["converted"]), manifest["converted"]


def _check_world_size(log: str, stages: tuple[str, ...] = tuple(TRAINING)) -> None:
    """Each run of a training stage of `stages` re-executed itself under torchrun with `NPROC`
    processes (rcg.launch), and each process finished the stage; the RDM split its global batch
    over them; the encoder stage, converting a checkpoint, stayed one process."""
    for stage in stages:
        command, runs = TRAINING[stage]
        launched = re.findall(rf"relaunching under torchrun with (\d+) processes: .* -m rcg\.cli {command}\b", log)
        assert launched == [str(NPROC)] * runs, (stage, launched)
        assert len(re.findall(rf" rcg: {command}: done in", log)) == NPROC * runs, (stage, log[-3000:])
    if "train_rdm" in stages:  # the first run; the encoder's conversion in it was one process
        assert re.search(rf"rdm: \w+, \d+ reps of dim 256, global batch \d+ on {NPROC} rank\(s\)", log), log[-3000:]
        assert not re.search(r"relaunching under torchrun .* -m rcg\.cli encoder\b", log)
        assert len(re.findall(r" rcg: encoder: done in", log)) == 1, log[-3000:]


def _shard_members(split_dir: Path) -> dict[tuple[str, str], bytes]:
    """(key, extension) -> bytes of every image in the split's tar shards."""
    out = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "png"):
                    out[(key, ext)] = tar.extractfile(m).read()
    return out


def _check_encoder(repo: Path, source: RepEncoder) -> None:
    """models/encoder is the converted official checkpoint: its record says so, and it computes
    what the encoder inside the checkpoint computes."""
    from rcg.encoders import load_encoder
    from rcg.encoders.vit import encoder_spec

    meta = json.loads((repo / "models" / "encoder" / "encoder.json").read_text())
    assert meta["source"] == ENCODER_FILE and meta["format"] == "mocov3", meta
    encoder = load_encoder(repo / "models" / "encoder")
    assert encoder.spec == encoder_spec("mocov3_vit_small")
    probe = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(encoder(probe), source(probe))
    curve = (repo / "metrics" / "curves" / "encoder.tsv").read_text().splitlines()
    assert len(curve) <= 1  # nothing was pretrained


def _check_generators(repo: Path) -> None:
    """Each condition trained a DiT on the SD VAE's latents (8 x 8 x 4 at 64 px)."""
    for condition in ("rep", "none", "label"):
        meta = json.loads((repo / "models" / "generator" / condition / "generator.json").read_text())
        assert meta["arch"] == "dit_tiny" and meta["condition"] == condition
        assert meta["codec"]["type"] == "vae" and meta["codec"]["path"] == VAE_DIR
        assert meta["codec"]["scale"] == pytest.approx(0.18215)
        assert (meta["kwargs"]["in_channels"], meta["kwargs"]["input_size"]) == (4, IMAGE_SIZE // 8)
        details = json.loads((repo / "metrics" / "details" / f"generator_{condition}.json").read_text())
        assert (details["arch"], details["steps"]) == ("dit_tiny", 2) and math.isfinite(details["final_loss"])


def _check_evaluation(repo: Path, cfg: config.Config) -> None:
    """FID with Inception against ADM's mu/sigma; KID, precision and recall against its arr_0; every
    number finite; the class modes asked for exactly n / K images of each class."""
    from rcg.metrics import evaluation

    table = json.loads((repo / "metrics" / "details" / "eval.json").read_text())
    assert table["extractor"] == "inception-v3-compat" and "FID" in table["fd_is"], table["fd_is"]
    assert table["reference"] == f"reference statistics {Path(REFERENCE_FILE).name}"
    assert table["n_reference"] == REFERENCE_IMAGES  # arr_0's images: what KID and precision/recall used
    assert not table["skipped"], table["skipped"]
    assert table["n_samples"] == N_SAMPLES and set(table["modes"]) == set(config.EVAL_MODES)
    for name, row in [*table["modes"].items(), ("floor", table["floor"])]:
        assert _finite(row, ("fd", "is", "kid", "precision", "recall")), (name, row)
    assert set(table["class_accuracy"]) == {"label", "rcg_class", "cluster"}  # cluster: its majority classes
    assert set(table["cas"]["modes"]) == {"label", "rcg_class", "cluster"}
    # The class modes: every class asked for, equally often (the overall accuracy is then the mean of
    # the per-class ones).
    for acc in (table["class_accuracy"][m] for m in evaluation.CLASS_MODES):
        assert set(acc["per_class"]) == set(CLASSES)
        assert acc["overall"] == pytest.approx(sum(acc["per_class"].values()) / len(CLASSES))
    # The class ids those modes were given: the stage's own choice, on this project's shards.
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    ref = SimpleNamespace(classes=manifest["classes"], n=table["n_samples"], manifest=manifest)
    ids, classifier = evaluation.class_targets(cfg.evaluate, ref, repo / cfg.evalnet.out_dir / "evalnet.safetensors",
                                               repo / cfg.encode.out_dir / "train.parquet")
    assert classifier is not None and torch.bincount(ids).tolist() == [N_SAMPLES // len(CLASSES)] * len(CLASSES)


def _check_served_model(repo: Path) -> None:
    """The promoted version loads through MLflow (the pyfunc around rcg.generation) and draws
    64 px RGB images, unconditional and of a class."""
    import mlflow

    from rcg.serving import decode_images
    from rcg.tracking import use_store

    client = store(repo)
    mv = client.get_model_version_by_alias("rcg-generator", "champion")
    assert str(mv.version) == "1" and mv.tags["extractor"] == "inception-v3-compat"
    use_store(client.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/rcg-generator@champion")
    out = model.predict([{"n": 2, "seed": 3}, {"n": 1, "class": 2}], params={"steps": 2})
    images = decode_images(out)
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert list(out["class"]) == [-1, -1, 2]


@pytest.mark.slow  # the official VQGAN (54.5M weights) on a CPU: about 2 CPU-minutes after the DiT run
def test_mage_preset_on_the_official_vqgan_reruns_only_the_generator_side(dit_run: SimpleNamespace) -> None:
    """The same project switched to the imagenet256_mage_b preset, as a user would (`rcg params
    --preset`, the same overrides, MAGE-B shrunk), with the official VQGAN file where the preset
    looks for it: the tokenizer stage converts it, MAGE trains on its ids for each condition (still
    2 processes each), evaluation scores FID against ADM's file, promote registers a version. Every
    stage upstream of them is up to date and does not run."""
    from rcg.tokenizers import load_tokenizer

    repo, env = dit_run.repo, dit_run.env
    dvc = [sys.executable, "-m", "dvc"]
    state = official_vqgan(repo / VQGAN_FILE)
    sets = [a for kv in [f"shard.folder={dit_run.imagenet}", *OVERRIDES, *MAGE_OVERRIDES] for a in ("--set", kv)]
    _run(["rcg", "params", "--preset", "imagenet256_mage_b", *sets], repo, env)
    cfg = config.load(repo / "params.yaml")
    assert (cfg.preset, cfg.tokenizer.checkpoint, cfg.tokenizer.arch, cfg.train_generator.tokenizer) == (
        "imagenet256_mage_b", VQGAN_FILE, "maskgit_f16", "models/tokenizer")
    changed = set(json.loads(_run(dvc + ["params", "diff", "--json"], repo, env).stdout)["params.yaml"])
    assert changed and all(k.startswith("train_generator.") for k in changed), changed  # the generator's recipe

    r = _run(dvc + ["exp", "run"], repo, env)
    assert _ran_stages(r.stdout) == MAGE_STAGES, r.stdout
    kept = set(re.findall(r"Stage '([^']+)' didn't change, skipping", r.stdout))
    assert kept == {"code", "shard", "encoder", "encode", "train_rdm", "evalnet"}, r.stdout
    assert json.loads(_run(dvc + ["status", "--json"], repo, env).stdout) == {}
    _check_world_size(r.stdout + r.stderr, ("train_generator",))

    # The tokenizer is the checkpoint's weights, unchanged, at the data's size: 4 x 4 ids of 1024 codes.
    vq = load_tokenizer(repo / "models" / "tokenizer")
    assert vq.meta["arch"] == "maskgit_f16" and vq.meta["provenance"]["source"] == "checkpoint"
    assert vq.meta["provenance"]["file"] == VQGAN_FILE
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())
    tok = json.loads((repo / "metrics" / "details" / "tokenizer.json").read_text())
    assert (tok["token_grid"], tok["codebook_size"], tok["input_size"]) == ([4, 4], 1024, IMAGE_SIZE), tok
    assert tok["val_images"] == VAL_PER_CLASS * len(CLASSES) and math.isfinite(tok["mse"])
    for condition in ("rep", "none", "label"):
        meta = json.loads((repo / "models" / "generator" / condition / "generator.json").read_text())
        assert meta["arch"] == "mage_tiny" and meta["codec"]["type"] == "tokens", meta
        assert (meta["kwargs"]["num_tokens"], meta["kwargs"]["codebook_size"]) == (16, 1024)
        assert meta["sampling"]["sampler"] == "mage" and meta["sampling"]["choice_temperature"] == 6.0
    _check_evaluation(repo, cfg)  # FID against ADM's file, every mode finite, the class modes balanced
    check_pipeline_run(repo, {"tokenizer", "train_generator (rep)", "train_generator (none)",
                              "train_generator (label)", "evaluate", "promote"})
