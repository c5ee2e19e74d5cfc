"""RCG generation: modes of generate_images, guidance schedules, Fig. 6/7 helpers, `rcg generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcg.diffusion import Diffusion, make_betas
from rcg.generators import build_generator
from rcg.generators.vae import PixelCodec
from rcg.io import PipelineError
from rcg.sampling import (
    GuidedDenoiser,
    generate_from_images,
    generate_images,
    interpolate,
    sample_images,
    save_grid,
    save_pngs,
)
from tests.generator_workspace import build, chdir, load_cfg


# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards, encoder, features, both RDMs and the three tiny generators."""
    from rcg.stages import train_generator

    root = build(tiny_workspace, tmp_path_factory.mktemp("sampling"))
    with chdir(root):
        for condition in ("rep", "none", "label"):
            train_generator.run(load_cfg(), condition=condition)
    return root


@pytest.fixture
def ws(trained: Path) -> Path:
    with chdir(trained):
        yield trained


def _perturbed(condition: str) -> torch.nn.Module:
    model = build_generator("dit_tiny", input_size=28, in_channels=1, condition=condition, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_guidance_schedules() -> None:
    model = _perturbed("rep")
    const = GuidedDenoiser(model, 1000, 2.0, "constant")
    linear = GuidedDenoiser(model, 1000, 2.0, "linear")
    t = torch.tensor([999, 500, 0])
    assert torch.allclose(const.scale_at(t), torch.tensor([2.0, 2.0, 2.0]))
    # Linear: ~0 at the noisiest step, w at the last one (MAGE's cfg * (s + 1) / N).
    assert torch.allclose(linear.scale_at(t), torch.tensor([0.002, 1.0, 2.0]))
    with pytest.raises(ValueError):
        GuidedDenoiser(model, 1000, 1.0, "cosine")
    x, r = torch.randn(3, 1, 28, 28), torch.randn(3, 256)
    want = model.forward_with_cfg(x, t, linear.scale_at(t), rep=r)
    with torch.no_grad():
        got = GuidedDenoiser(model, 1000, 2.0, "linear", amp=False)(x, t, rep=r)
    assert torch.allclose(got, want, atol=1e-5)


def test_sample_images_is_seeded_and_guidance_changes_it() -> None:
    model, diffusion = _perturbed("rep"), Diffusion(make_betas("linear", 1000))
    cond = {"rep": torch.randn(4, 256)}
    kw = dict(shape=(1, 28, 28), steps=4, amp=False, progress=False, batch_size=2)
    a = sample_images(model, diffusion, PixelCodec(), 4, cond, seed=3, **kw)
    b = sample_images(model, diffusion, PixelCodec(), 4, cond, seed=3, **kw)
    c = sample_images(model, diffusion, PixelCodec(), 4, cond, seed=4, **kw)
    g = sample_images(model, diffusion, PixelCodec(), 4, cond, seed=3, cfg_scale=3.0, **kw)
    assert a.shape == (4, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, g)
    d = sample_images(model, diffusion, PixelCodec(), 4, cond, seed=3, sampler="ddpm", **kw)
    assert d.shape == a.shape
    with pytest.raises(ValueError, match="rows"):
        sample_images(model, diffusion, PixelCodec(), 5, cond, **kw)


@pytest.mark.parametrize("mode", ["uncond", "rcg", "rcg_cfg"])
def test_generate_modes_without_labels(ws: Path, mode: str) -> None:
    cfg = load_cfg()
    images = generate_images(cfg, mode, 5, cfg_scale=1.0 if mode == "rcg_cfg" else 0.0, steps=3,
                             batch_size=3, progress=False)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    again = generate_images(cfg, mode, 5, cfg_scale=1.0 if mode == "rcg_cfg" else 0.0, steps=3,
                            batch_size=3, progress=False)
    assert torch.equal(images, again)


def test_generator_json_sets_the_x0_clamp(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate_images samples with the clamp recorded in generator.json (absent: off)."""
    import rcg.sampling as sampling

    seen: list[float] = []
    real = sampling.sample_images

    def spy(*a, **kw):
        seen.append(kw["clip_x0"])
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "sample_images", spy)
    cfg = load_cfg()
    meta_path = Path(cfg.train_generator.out_dir) / "none" / "generator.json"
    original = meta_path.read_text()
    clamped = generate_images(cfg, "uncond", 4, steps=3, progress=False)
    meta = json.loads(original)
    meta["sampling"]["clip_x0"] = 0.0
    try:
        meta_path.write_text(json.dumps(meta))
        sampling._CACHE.clear()
        free = generate_images(cfg, "uncond", 4, steps=3, progress=False)
    finally:  # the workspace is shared by the module's tests
        meta_path.write_text(original)
        sampling._CACHE.clear()
    assert seen == [cfg.train_generator.sample_clip_x0, 0.0]
    assert not torch.equal(clamped, free)  # the clamp changes what a 6-step tiny model samples


def test_class_modes(ws: Path) -> None:
    cfg = load_cfg()
    ids = torch.tensor([0, 1, 2, 3])
    for mode in ("label", "rcg_class"):
        out = generate_images(cfg, mode, 4, class_ids=ids, steps=3, progress=False)
        assert out.shape == (4, 1, 28, 28)
        with pytest.raises(PipelineError, match="class_ids"):
            generate_images(cfg, mode, 4, steps=3, progress=False)
    one = generate_images(cfg, "rcg_class", 3, class_ids=torch.tensor(7), steps=3, progress=False)
    assert one.shape[0] == 3


def test_rcg_uses_rdm_samples(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rcg` is exactly `oracle` fed with the RDM's samples (same seeds)."""
    import rcg.rdm as rdm

    cfg = load_cfg()
    seen = {}
    real = rdm.sample_reps

    def spy(bundle, n, **kw):
        seen["reps"] = real(bundle, n, **kw)
        seen["class_cond"] = bundle.class_cond
        return seen["reps"]

    monkeypatch.setattr(rdm, "sample_reps", spy)
    a = generate_images(cfg, "rcg", 4, steps=3, seed=5, progress=False)
    assert seen["class_cond"] is False and seen["reps"].shape == (4, 256)
    b = generate_images(cfg, "oracle", 4, reps=seen["reps"], steps=3, seed=5, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(PipelineError, match="reps"):
        generate_images(cfg, "oracle", 4, steps=3, progress=False)
    with pytest.raises(PipelineError, match="mode"):
        generate_images(cfg, "dream", 4)


def test_images_and_interpolation(ws: Path) -> None:
    cfg = load_cfg()
    from rcg.data.loader import make_loader

    imgs = next(iter(make_loader(cfg.data, "val", "once", 2)))["image"]
    out = generate_from_images(cfg, imgs, 3, steps=3, progress=False)
    assert out.shape == (6, 1, 28, 28)
    line = interpolate(cfg, imgs[0], imgs[1], n_steps=4, rows=2, steps=3)
    assert line.shape == (8, 1, 28, 28)
    assert not torch.equal(line[0], line[3])


def test_generate_cli_writes_pngs_and_grid(ws: Path, tmp_path: Path) -> None:
    from PIL import Image

    from rcg.cli import main

    out = tmp_path / "gen"
    assert main(["generate", "--n", "4", "--cfg", "1.0", "--steps", "3", "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").exists()
    assert Image.open(out / "00000.png").size == (28, 28)
    assert main(["generate", "--n", "2", "--class", "3", "--steps", "3", "--out", str(out / "c")]) == 0
    save_pngs(torch.rand(1, 1, 28, 28), tmp_path / "img")
    src = tmp_path / "img" / "00000.png"
    assert main(["generate", "--n", "2", "--from-image", str(src), "--steps", "3", "--out", str(out / "f")]) == 0
    assert len(list((out / "f").glob("0*.png"))) == 3  # the source image, then its 2 samples
    assert main(["generate", "--n", "8", "--interpolate", str(src), str(src), "--steps", "3",
                 "--out", str(out / "i")]) == 0
    assert main(["generate", "--from-image", str(tmp_path / "nope.png"), "--out", str(out / "x")]) == 1


def test_save_grid_upscales_small_images(tmp_path: Path) -> None:
    from PIL import Image

    p = save_grid(torch.rand(4, 1, 28, 28), tmp_path / "g.png")
    w, h = Image.open(p).size
    assert w > 28 * 2 * 2 and h > 28 * 2 * 2  # 2x2 grid, upscaled 3x
