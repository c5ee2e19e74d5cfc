"""The ImageNet path end to end at miniature size: the imagenet256 preset through the whole dvc.yaml.

A user of the paper's setting (rcg/presets/imagenet256.yaml) points `shard.folder` at ImageNet,
puts the files the preset names beside the project (the official MoCo v3 checkpoint, the SD VAE
saved with `save_pretrained`, ADM's reference statistics, torch-fidelity's Inception weights) and
runs `dvc exp run`. This test does exactly that with a miniature ImageNet (3 classes with wnid
names, JPEGs of varied sizes cropped from scikit-image's photographs, train/<wnid>/ and
val/<wnid>/) and files of the real layouts with random weights (tests/fakes.py), keeping every
choice of the preset that makes it the ImageNet path and shrinking only sizes, steps and counts
(`OVERRIDES`). Every stage runs, through DVC, in one process each, offline: conversion of the
checkpoint, encoding, the RDMs, the DiT on VAE latents for the three conditions, evaluation with
Inception against the reference file, registration in MLflow. The registered model is then loaded
the way a server loads it (from another folder) and draws images. No GPU is needed, and nothing is
downloaded (the caches torch and Hugging Face would download into stay empty).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
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
from tests.fakes import adm_reference_npz, official_checkpoint, random_inception_weights, tiny_vae
from tests.mlflow_view import EVERY_STAGE, check_pipeline_run, store
from tests.test_pipeline import _expected_outputs

ROOT = Path(__file__).resolve().parents[1]
# ImageNet's first three classes (tench, goldfish, great white shark); each class's images are
# crops of one photograph, so the classes differ as classes do and the class modes mean something.
CLASSES = {"n01440764": "astronaut", "n01443537": "coffee", "n01484850": "chelsea"}
TRAIN_PER_CLASS, VAL_PER_CLASS, REFERENCE_IMAGES = 12, 3, 12
IMAGE_SIZE = 64  # a multiple of the SD VAE's factor 8: the DiT sees 8 x 8 latents
N_SAMPLES = 6  # per mode: a multiple of the 3 classes, as class_balance uniform requires
# Where the files the preset names go, relative to the project: the preset's own paths, except the
# encoder's (ViT-S, MoCo v3's smallest released size, instead of ViT-B) and Inception's (the preset
# leaves it empty and asks for a local file).
ENCODER_FILE = "pretrained_enc_ckpts/mocov3/vit-s-300ep.pth.tar"
VAE_DIR = "models/vae/sd-vae-ft-ema"
REFERENCE_FILE = "fid_stats/VIRTUAL_imagenet256_labeled.npz"
INCEPTION_FILE = "pretrained/weights-inception-2015-12-05-6726825d.pth"

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
    # sampling stay), two steps of four images, a 2-step grid.
    "train_generator.arch=dit_tiny", "train_generator.steps=2", "train_generator.batch_size=4",
    "train_generator.sample_steps=2",
    # Evaluation: Inception (weights from this file) against ADM's statistics stays; six samples per
    # mode (a multiple of the classes, as class_balance uniform needs) drawn in 2 steps.
    f"evaluate.inception_weights={INCEPTION_FILE}", f"evaluate.n_samples={N_SAMPLES}", "evaluate.sample_steps=2",
    # CAS: two steps of each classifier on the six samples of a class mode.
    "evaluate.cas_steps=2", "evaluate.cas_batch_size=4",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """`n` random crops of `photo`, each resized to its own size of 80-120 px a side (ImageNet's
    photographs come in every size; the loader crops them square)."""
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(min(h, w) // 3, min(h, w) * 4 // 5))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        size = (int(rng.integers(80, 121)), int(rng.integers(80, 121)))
        out.append(Image.fromarray(photo[y : y + side, x : x + side]).resize(size, Image.BICUBIC))
    return out


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature ImageNet in the real layout: train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_*.JPEG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    val_id = 0
    for wnid, photo in CLASSES.items():
        crops = _crops(getattr(skdata, photo)(), TRAIN_PER_CLASS + VAL_PER_CLASS, rng)
        for i, img in enumerate(crops):
            if i < TRAIN_PER_CLASS:
                path = root / "train" / wnid / f"{wnid}_{1000 + i}.JPEG"
            else:
                val_id += 1
                path = root / "val" / wnid / f"ILSVRC2012_val_{val_id:08d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, "JPEG", quality=90)
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


def test_imagenet_preset_runs_every_stage_end_to_end(
    imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "project"
    # Empty caches: Inception must come from the configured file, the VAE from its folder.
    torch_home, hf_home = tmp_path / "torch-home", tmp_path / "hf-home"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo), "TORCH_HOME": str(torch_home), "HF_HOME": str(hf_home),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    _project(repo, imagenet, env)
    source_encoder = _external_files(repo)
    ran = _run([sys.executable, "-m", "dvc", "exp", "run"], repo, env).stdout

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
    assert set(re.findall(r"Running stage '([^']+)'", ran)) == every, ran
    missing = [p for p in _expected_outputs(dvc_yaml, yaml.safe_load((repo / "params.yaml").read_text()))
               if not (repo / p).exists()]
    assert not missing, f"stage outputs missing after dvc exp run: {missing}"
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env).stdout
    assert "changed" not in status, status
    for home in (torch_home, hf_home):
        assert not home.exists() or not any(home.rglob("*")), f"something was downloaded into {home}"

    _check_shards(repo)
    _check_encoder(repo, source_encoder)
    _check_generators(repo)
    _check_evaluation(repo, cfg)
    check_pipeline_run(repo, EVERY_STAGE)  # what MLflow shows of the run (tests/mlflow_view.py)
    monkeypatch.chdir(tmp_path)  # as a server loads it: from another folder than the project
    _check_served_model(repo)


def _check_shards(repo: Path) -> None:
    """The manifest counts the miniature ImageNet's images per split and names its classes."""
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == sorted(CLASSES)
    assert manifest["splits"]["train"]["written"] == TRAIN_PER_CLASS * len(CLASSES)
    assert manifest["splits"]["val"]["written"] == VAL_PER_CLASS * len(CLASSES)
    assert manifest["splits"]["train"]["skipped"] == 0 and manifest["splits"]["val"]["skipped"] == 0


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
