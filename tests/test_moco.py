"""MoCo v3 pretraining: loss, momentum encoder, schedules, augmentations, and the `encoder` stage
(resume from checkpoints/encoder/, torchrun) on a few hundred Fashion-MNIST images."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcg import config as config_mod
from rcg.encoders import load_encoder
from rcg.encoders.augment import ViewRecipe, augment, two_view_recipes
from rcg.encoders.moco import MoCoV3, init_patch_embed, momentum_at, training_fingerprint
from rcg.encoders.vit import EncoderSpec, RepEncoder, build_vit, preprocess
from rcg.io import PipelineError
from rcg.metrics.knn import knn_top1
from rcg.training import Checkpointer, lr_at
from tests.interrupt import Interrupted, interrupt_after

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec() -> EncoderSpec:
    return EncoderSpec(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                       head_hidden_dim=64, mean=(0.286,), std=(0.353,))


def tiny_moco(temperature: float = 0.2) -> MoCoV3:
    torch.manual_seed(0)
    vit = build_vit(tiny_spec())
    init_patch_embed(vit, freeze=True)
    return MoCoV3(vit, 256, 64, temperature)


def test_contrastive_loss_matches_infonce_formula():
    model = tiny_moco(temperature=0.5)
    q, k = torch.randn(8, 256), torch.randn(8, 256)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.5
    want = F.cross_entropy(logits, torch.arange(8)) * 2 * 0.5
    torch.testing.assert_close(model.contrastive_loss(q, k), want)
    # Perfectly matching, well separated pairs give a much smaller loss than random pairs.
    model.temperature = 0.1
    e = torch.eye(8, 256) * 10
    assert model.contrastive_loss(e, e) < 0.1 * model.contrastive_loss(q, k)


def test_momentum_encoder_is_an_ema_without_gradients():
    model = tiny_moco()
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model.update_momentum_encoder(0.9)
    for b, q, k in zip(before, model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
    model.update_momentum_encoder(0.0)
    for q, k in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        torch.testing.assert_close(k, q)


def test_patch_projection_is_frozen():
    model = tiny_moco()
    assert not model.base_encoder.patch_embed.proj.weight.requires_grad
    assert not model.base_encoder.pos_embed.requires_grad
    assert model.base_encoder.blocks[0].attn.qkv.weight.requires_grad


def test_schedules():
    # MoCo v3's lr: linear warm-up, then a half cosine to 0 (the loop's `cosine` schedule)
    assert lr_at(0, 100, 1.0, 10, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, "cosine") == pytest.approx(0.0)
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_augment_views():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g)
    v1, v2 = two_view_recipes(0.2, 1.0, 0.2, 0.4)
    a, b = augment(x, 28, v1, g), augment(x, 28, v2, g)
    assert a.shape == b.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and b.min() >= 0 and b.max() <= 1
    assert not torch.allclose(a, b)
    # The whole image, always flipped, no photometric change: exactly the mirror image.
    flip_only = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, blur_p=0.0)
    torch.testing.assert_close(augment(x, 28, flip_only, g), x.flip(-1), atol=1e-5, rtol=0)
    # Blur sigma is in output pixels: 1 px visibly smooths a 28 px image (the old 224 px scaling
    # made MoCo v3's 0.1-2.0 a no-op); a tiny sigma leaves it as it is.
    only_blur = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=1.0)
    def roughness(t: torch.Tensor) -> float:
        return float((t[..., 1:] - t[..., :-1]).abs().mean())
    blurred = augment(x, 28, ViewRecipe(blur_sigma=(1.0, 1.0), **only_blur), g)
    assert roughness(blurred) < 0.5 * roughness(x)
    torch.testing.assert_close(blurred.mean(), x.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(augment(x, 28, ViewRecipe(blur_sigma=(0.01, 0.01), **only_blur), g), x,
                               atol=1e-5, rtol=0)
    # RGB batches at another output size.
    rgb = augment(torch.rand(4, 3, 32, 32, generator=g), 16, v1, g)
    assert rgb.shape == (4, 3, 16, 16)


def test_moco_steps_reduce_the_loss_on_a_fixed_batch():
    model = tiny_moco()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 28, 28, generator=g)
    spec = tiny_spec()
    v1, v2 = preprocess(x, spec), preprocess(x.flip(-1), spec)
    losses = []
    for _ in range(15):
        loss = model(v1, v2, 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_knn_top1():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    assert knn_top1(train, labels, query, torch.tensor([0, 1, 1]), k=2) == 1.0
    assert knn_top1(train, labels, query, torch.tensor([1, 1, 1]), k=2) == pytest.approx(2 / 3)


# -------------------------------------------------------------------------- the encoder stage

BLOCKS = [f.name for f in dataclasses.fields(config_mod.Config) if f.name != "preset"]


def tiny_config(shards: Path, **sets) -> config_mod.Config:
    params = {"preset": "tiny", **{b: {} for b in BLOCKS}}
    overrides = config_mod.parse_set([f"{k}={v}" for k, v in sets.items()])
    cfg = config_mod.resolve(params, overrides)
    cfg.data.shards_dir = str(shards)
    return cfg


@pytest.fixture(scope="module")
def shards(tiny_workspace: Path) -> Path:
    """The session's tiny-preset Fashion-MNIST shards (tests/conftest.py), read-only here."""
    return tiny_workspace / "data" / "shards"


def test_knn_cap_at_or_above_the_split_reads_each_image_once(shards):
    """encoder.knn_max_train >= the train split's size: every image once, as without a cap (the
    shuffled train stream repeats forever and would hand over `limit` crops of the same images)."""
    from rcg.metrics.knn import labelled_images

    data = tiny_config(shards).data
    whole_x, whole_y = labelled_images(data, "train")
    assert len(whole_x) == 256
    for limit in (256, 512):
        x, y = labelled_images(data, "train", limit)
        assert torch.equal(x, whole_x) and torch.equal(y, whole_y), limit
    assert len(labelled_images(data, "train", 100)[0]) == 100  # below the size: a shuffled sample


def test_a_converted_checkpoint_writes_every_output_of_the_stage(shards, tmp_path, monkeypatch):
    """With encoder.checkpoint nothing trains, yet every output dvc.yaml declares for the stage
    exists afterwards (DVC fails the stage otherwise): the empty checkpoints/encoder too."""
    from rcg.stages import encoder as stage
    from tests.fakes import official_checkpoint

    monkeypatch.chdir(tmp_path)
    path, spec, src = official_checkpoint("mocov3", tmp_path / "vit-s-300ep.pth.tar")
    sizes = dict(img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                 num_heads=spec.num_heads, proj_hidden_dim=spec.head_hidden_dim)
    cfg = tiny_config(shards, **{"encoder.checkpoint": str(path), "encoder.mean": list(spec.mean),
                                 "encoder.std": list(spec.std), **{f"encoder.{k}": v for k, v in sizes.items()}})
    stage.run(cfg)
    e = cfg.encoder
    for out in (e.out_dir, e.checkpoint_dir, e.details_file, e.curves_file, e.metrics_file):
        assert Path(out).exists(), out
    assert not any(Path(e.checkpoint_dir).iterdir())  # nothing to resume: nothing was trained
    assert json.loads(Path(e.out_dir, "encoder.json").read_text())["source"] == str(path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_encoder(e.out_dir)(x), src(x))


def test_encoder_stage_pretrains_and_resumes(shards, tmp_path, monkeypatch):
    from rcg.stages import encoder as stage

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(shards)
    # Interrupt the first run during step 3 (of 4), after the checkpoint at step 2.
    import rcg.encoders.moco as moco

    real_momentum = moco.momentum_at

    def slow(step, total, m0):
        time.sleep(0.1)  # the first run's 2 steps take >= 0.2 s on the training clock
        return real_momentum(step, total, m0)

    monkeypatch.setattr(moco, "momentum_at", slow)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(Interrupted):
            stage.run(cfg)
    ckpt = Checkpointer("checkpoints/encoder", _fingerprint(cfg)).load()
    assert ckpt is not None and ckpt["step"] == 2 and ckpt["train_seconds"] >= 0.2
    assert not Path("models/encoder/encoder.json").exists()

    monkeypatch.setattr(moco, "momentum_at", real_momentum)
    stage.run(cfg)
    meta = json.loads(Path("models/encoder/encoder.json").read_text())
    assert meta["source"] == "mocov3-pretrain" and meta["steps"] == 4
    assert "knn_k" not in meta["training_config"]  # evaluation settings do not define the weights
    metrics = json.loads(Path("metrics/details/encoder.json").read_text())
    assert metrics["resumed_from"] == 2 and metrics["steps"] == 4
    # The clock covers both runs: the first run's time plus this one's (steps 3-4).
    assert metrics["train_seconds_total"] == pytest.approx(
        ckpt["train_seconds"] + metrics["train_seconds_this_run"], abs=0.02)
    assert np.isfinite(metrics["final_loss"])
    for key in ("knn_top1", "knn_top1_random_init", "knn_top1_pixels"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["knn_train_samples"] == 256 and metrics["knn_val_samples"] == 256
    assert metrics["wall_time_s"] > 0
    assert metrics["knn_top1_pixels"] > 0.5  # 10 classes: far above chance even on 256 images
    enc = load_encoder("models/encoder")
    assert enc.spec.in_chans == 1 and enc.spec.embed_dim == 32
    assert enc(torch.rand(3, 1, 28, 28)).shape == (3, 256)

    # A finished run is not redone, and rerunning it (say for another knn_k) rewrites the model
    # byte for byte, so DVC sees `encode` as current; the clock and the loss carry over.
    assert Checkpointer("checkpoints/encoder", _fingerprint(cfg)).load()["step"] == 4
    files = {f.name: f.read_bytes() for f in Path("models/encoder").iterdir()}
    stage.run(tiny_config(shards, **{"encoder.knn_k": 5}))
    assert {f.name: f.read_bytes() for f in Path("models/encoder").iterdir()} == files
    again = json.loads(Path("metrics/details/encoder.json").read_text())
    assert again["resumed_from"] == 4 and again["images_per_s"] is None
    assert again["train_seconds_total"] == pytest.approx(metrics["train_seconds_total"], abs=0.02)
    assert again["final_loss"] == metrics["final_loss"] and again["knn_k"] == 5
    # A changed setting starts over instead of resuming.
    changed = tiny_config(shards, **{"encoder.temperature": 0.3})
    assert _fingerprint(changed) != _fingerprint(cfg)
    assert _fingerprint(tiny_config(shards, **{"encoder.knn_k": 5})) == _fingerprint(cfg)
    # So do other shards: the manifest names the data the checkpoint was trained on.
    resharded = tmp_path / "resharded"
    shutil.copytree(shards, resharded)
    manifest = json.loads((resharded / "manifest.json").read_text())
    manifest["fingerprint"] = "other images"
    (resharded / "manifest.json").write_text(json.dumps(manifest))
    assert _fingerprint(tiny_config(resharded)) != _fingerprint(cfg)


def test_encoder_stage_is_reproducible(shards, tmp_path, monkeypatch):
    """Two fresh runs with one seed write the same weights (`dvc repro` reproduces the encoder)."""
    from rcg.stages import encoder as stage

    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        stage.run(tiny_config(shards, **{"data.num_workers": 2}))
        weights.append(Path("models/encoder/encoder.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_encoder_stage_converts_an_official_checkpoint(shards, tmp_path, monkeypatch):
    from rcg.stages import encoder as stage

    monkeypatch.chdir(tmp_path)
    spec = EncoderSpec(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, head_hidden_dim=64)
    vit = build_vit(spec)
    state = {"module.base_encoder." + k: v for k, v in vit.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "moco.pth.tar")
    cfg = tiny_config(shards)
    # A size not in ENCODER_ARCHS: name it through the size fields with ImageNet normalisation, 3 channels.
    cfg.encoder.checkpoint = str(tmp_path / "moco.pth.tar")
    cfg.encoder.img_size, cfg.encoder.patch_size, cfg.encoder.embed_dim = 32, 8, 64
    cfg.encoder.num_heads, cfg.encoder.proj_hidden_dim = 2, 64
    cfg.encoder.mean, cfg.encoder.std = list(spec.mean), list(spec.std)
    stage.run(cfg)
    enc = load_encoder("models/encoder")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        want = RepEncoder(spec, vit)(x)
    torch.testing.assert_close(enc(x), want)
    assert json.loads(Path("metrics/encoder.json").read_text())["knn_top1"] is not None


@pytest.mark.slow
def test_encoder_stage_under_torchrun(shards, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    params = {"preset": "tiny", **{b: {} for b in BLOCKS}}
    params["shard"] = {"out_dir": str(shards)}
    params["data"] = {"shards_dir": str(shards)}
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "rcg.cli", "encoder"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/details/encoder.json").read_text())
    assert metrics["steps"] == 4 and metrics["knn_top1"] is not None


@pytest.mark.parametrize("sigma", ["[1.0]", "[2.0,1.0]", "[0.0,1.0]"])
def test_bad_blur_sigma_is_named(shards, tmp_path, monkeypatch, sigma):
    from rcg.stages import encoder as stage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="encoder.blur_sigma"):
        stage.run(tiny_config(shards, **{"encoder.blur_sigma": sigma}))


def _fingerprint(cfg: config_mod.Config) -> str:
    return training_fingerprint(cfg.encoder, cfg.data)
