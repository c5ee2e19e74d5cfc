"""RCG generation: the sampler, guidance schedules, the loaded generators (Fig. 6/7), `rcg generate`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rcg.diffusion import Diffusion, make_betas
from rcg.generation import ImageGenerator, RCGGenerator
from rcg.generators import build_generator
from rcg.generators.vae import PixelCodec
from rcg.io import PipelineError
from rcg.metrics.evaluation import CLASS_MODES, ModeGenerators
from rcg.priors import hypersphere
from rcg.rdm import sample_reps
from rcg.sampling import GuidedDenoiser, load_image, sample_images, save_grid, save_pngs
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


def _folder(root: Path, condition: str) -> Path:
    return root / "models" / "generator" / condition


def test_image_generator_samples_seeded_images_in_range(ws: Path) -> None:
    none = ImageGenerator.load(_folder(ws, "none"), device="cpu")
    assert none.condition == "none" and none.shape == (1, 28, 28)
    images = none.sample(5, steps=3, batch_size=3)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    assert torch.equal(images, none.sample(5, steps=3, batch_size=3))
    assert not torch.equal(images, none.sample(5, steps=3, batch_size=3, seed=1))
    label = ImageGenerator.load(_folder(ws, "label"), device="cpu")
    assert label.sample(4, label=torch.tensor([0, 1, 2, 3]), steps=3).shape == (4, 1, 28, 28)
    assert torch.equal(label.sample(3, label=7, steps=3), label.sample(3, label=torch.tensor([7, 7, 7]), steps=3))


def test_image_generator_rejects_a_condition_that_does_not_fit(ws: Path) -> None:
    rep, label, none = (ImageGenerator.load(_folder(ws, c), device="cpu") for c in ("rep", "label", "none"))
    with pytest.raises(PipelineError, match="pass rep="):
        rep.sample(2, steps=3)
    with pytest.raises(PipelineError, match=r"rep must be \[2, 256\]"):
        rep.sample(2, rep=torch.zeros(3, 256), steps=3)
    with pytest.raises(PipelineError, match="pass label="):
        label.sample(2, steps=3)
    with pytest.raises(PipelineError, match=r"class ids must be in \[0, 10\)"):
        label.sample(2, label=10, steps=3)
    with pytest.raises(PipelineError, match="2 class ids for 3 samples"):
        label.sample(3, label=torch.tensor([1, 2]), steps=3)
    with pytest.raises(PipelineError, match="no condition"):
        none.sample(2, rep=torch.zeros(2, 256), steps=3)


def test_generator_json_sets_the_x0_clamp(ws: Path, tmp_path: Path) -> None:
    """The sampler's settings are generator.json's (the x0 clamp here); absent means off."""
    cfg = load_cfg()
    clamped = ImageGenerator.load(_folder(ws, "none"), device="cpu")
    assert clamped.settings()["clip_x0"] == cfg.train_generator.sample_clip_x0 > 0
    assert clamped.settings(steps=7)["steps"] == 7 and clamped.settings()["steps"] == cfg.train_generator.sample_steps
    copy = tmp_path / "none"
    shutil.copytree(_folder(ws, "none"), copy)
    meta = json.loads((copy / "generator.json").read_text())
    del meta["sampling"]["clip_x0"]
    (copy / "generator.json").write_text(json.dumps(meta))
    free = ImageGenerator.load(copy, device="cpu")
    assert free.settings()["clip_x0"] == 0.0
    # the clamp changes what a 6-step tiny model samples
    assert not torch.equal(clamped.sample(4, steps=3), free.sample(4, steps=3))


@pytest.fixture(scope="module")
def rcg_gen(trained: Path) -> RCGGenerator:
    return RCGGenerator.load(trained / "models" / "rdm", _folder(trained, "rep"), trained / "models" / "encoder",
                             device="cpu")


def test_rcg_is_the_image_generator_on_rdm_samples(rcg_gen: RCGGenerator) -> None:
    """sample(seed) is exactly from_reps(sample_reps(seed), seed), and guidance changes it."""
    a = rcg_gen.sample(4, steps=3, seed=5, batch_size=3)
    reps = rcg_gen.sample_reps(4, seed=5)
    assert reps.shape == (4, 256) and a.shape == (4, 1, 28, 28) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, rcg_gen.from_reps(reps, steps=3, seed=5, batch_size=3))
    assert torch.equal(a, rcg_gen.sample(4, steps=3, seed=5, batch_size=3))
    assert not torch.equal(a, rcg_gen.sample(4, steps=3, seed=6, batch_size=3))
    assert not torch.equal(a, rcg_gen.sample(4, steps=3, seed=5, batch_size=3, cfg=1.0))


def test_class_ids_go_through_the_class_conditional_rdm(rcg_gen: RCGGenerator, trained: Path, tmp_path: Path) -> None:
    assert rcg_gen.class_conditional
    reps = rcg_gen.sample_reps(3, class_ids=2, seed=1)
    assert not torch.equal(reps, rcg_gen.sample_reps(3, seed=1))  # not the unconditional RDM
    images = rcg_gen.sample(3, class_ids=torch.tensor([2, 2, 2]), steps=3, seed=1)
    assert torch.equal(images, rcg_gen.from_reps(reps, steps=3, seed=1))
    with pytest.raises(PipelineError, match="class ids must be in"):
        rcg_gen.sample_reps(2, class_ids=99)
    uncond_only = tmp_path / "rdm"
    uncond_only.mkdir()
    for f in (trained / "models" / "rdm").glob("rdm.*"):
        shutil.copy(f, uncond_only / f.name)
    plain = RCGGenerator.load(uncond_only, _folder(trained, "rep"), device="cpu")
    assert not plain.class_conditional
    with pytest.raises(PipelineError, match=re.escape(str(uncond_only)) + ".*no class-conditional RDM"):
        plain.sample(2, class_ids=1, steps=3)


def test_missing_folders_are_errors_naming_the_path(trained: Path, tmp_path: Path) -> None:
    rdm_dir, rep_dir = trained / "models" / "rdm", _folder(trained, "rep")
    with pytest.raises(PipelineError, match=re.escape(str(tmp_path / "nope"))):
        ImageGenerator.load(tmp_path / "nope")
    with pytest.raises(PipelineError, match=re.escape(str(tmp_path / "nope"))):
        RCGGenerator.load(tmp_path / "nope", rep_dir)
    with pytest.raises(PipelineError, match=re.escape(str(tmp_path / "enc"))):
        RCGGenerator.load(rdm_dir, rep_dir, tmp_path / "enc")
    with pytest.raises(PipelineError, match="rep-conditioned generator"):
        RCGGenerator.load(rdm_dir, _folder(trained, "none"))
    with pytest.raises(PipelineError, match="encoder_dir"):
        RCGGenerator.load(rdm_dir, rep_dir, device="cpu").encode(torch.rand(1, 1, 28, 28))


def test_interpolation_rows_share_noise_and_end_at_from_reps(rcg_gen: RCGGenerator) -> None:
    """Fig. 7: a row's end points are from_reps of its end points (same seed, same noise)."""
    rep_a, rep_b = rcg_gen.sample_reps(3, seed=2), rcg_gen.sample_reps(3, seed=3)
    strip = rcg_gen.interpolate(rep_a, rep_b, points=4, seed=7, steps=3)
    assert strip.shape == (12, 1, 28, 28)
    rows = strip.view(3, 4, 1, 28, 28)
    # the saved sampler is deterministic DDIM here, so from_reps starts from the same noise
    assert rcg_gen.image.settings()["sampler"] == "ddim" and rcg_gen.image.settings()["eta"] == 0.0
    assert torch.equal(rows[:, 0], rcg_gen.from_reps(rep_a, seed=7, steps=3))
    assert torch.equal(rows[:, -1], rcg_gen.from_reps(rep_b, seed=7, steps=3))
    assert not torch.equal(rows[:, 0], rows[:, 1])
    # one pair over two rows: a row per starting noise
    pair = rcg_gen.interpolate(rep_a[0], rep_b[0], points=4, rows=2, seed=7, steps=3)
    assert pair.shape == (8, 1, 28, 28) and not torch.equal(pair[0], pair[4])
    assert torch.equal(pair[0], rows[0, 0])
    with pytest.raises(PipelineError, match="end points"):
        rcg_gen.interpolate(rep_a, rep_b[:2])


def test_from_images_conditions_on_the_encoders_representations(rcg_gen: RCGGenerator, ws: Path) -> None:
    """Fig. 6: per_image samples of each given image, equal to from_reps of its representation."""
    from rcg.data.loader import make_loader

    imgs = next(iter(make_loader(load_cfg().data, "val", "once", 2)))["image"]
    reps = rcg_gen.encode(imgs)
    assert reps.shape == (2, 256)
    out = rcg_gen.from_images(imgs, 3, steps=3)
    assert out.shape == (6, 1, 28, 28)
    assert torch.equal(out, rcg_gen.from_reps(reps.repeat_interleave(3, dim=0), steps=3))


def test_seeding_convention(rcg_gen: RCGGenerator) -> None:
    """RDM samples from `seed`, image noise from (seed + 1, batch): metrics/eval.json rests on it."""
    x_T = rcg_gen.image.start_noise(2, seed=3)
    assert torch.equal(x_T, torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(4 * 1_000_003)))
    reps = rcg_gen.sample_reps(2, seed=3)
    assert torch.equal(reps, sample_reps(rcg_gen.reps.rdm, 2, seed=3, batch_size=1000))
    assert torch.equal(rcg_gen.from_reps(reps, steps=3, seed=3), rcg_gen.image.sample(2, rep=reps, steps=3, x_T=x_T))


def test_evaluation_modes_draw_from_the_loaded_generators(trained: Path, rcg_gen: RCGGenerator) -> None:
    gens = ModeGenerators(trained / "models" / "generator", trained / "models" / "rdm", device="cpu")
    kw = dict(steps=3, seed=4, batch_size=3)
    ids = torch.tensor([0, 1, 2, 3])
    reps = rcg_gen.sample_reps(4)
    assert torch.equal(gens.sample("rcg", 4, **kw), rcg_gen.sample(4, **kw))
    assert torch.equal(gens.sample("rcg_cfg", 4, cfg=1.0, **kw), rcg_gen.sample(4, cfg=1.0, **kw))
    assert torch.equal(gens.sample("rcg_class", 4, class_ids=ids, **kw), rcg_gen.sample(4, ids, **kw))
    assert torch.equal(gens.sample("oracle", 4, reps=reps, **kw), rcg_gen.from_reps(reps, **kw))
    none, label = (ImageGenerator.load(_folder(trained, c), device="cpu") for c in ("none", "label"))
    assert torch.equal(gens.sample("uncond", 4, **kw), none.sample(4, **kw))
    assert torch.equal(gens.sample("label", 4, class_ids=ids, **kw), label.sample(4, label=ids, **kw))
    assert gens.rcg() is gens.rcg() and gens.baseline("none") is gens.baseline("none")  # loaded once, kept
    assert gens.rcg().image is gens.baseline("rep")  # the rep generator is loaded once for every mode
    # The prior modes: the rep network on hypersphere samples drawn from the seed (images from seed + 1).
    sphere = hypersphere(4, 256, seed=4)
    assert torch.equal(gens.sample("hypersphere", 4, **kw), rcg_gen.from_reps(sphere, **kw))
    for mode in CLASS_MODES:
        with pytest.raises(PipelineError, match="class_ids"):
            gens.sample(mode, 4, steps=3)
    with pytest.raises(PipelineError, match="reps"):
        gens.sample("oracle", 4, steps=3)
    with pytest.raises(PipelineError, match="dream"):
        gens.sample("dream", 4)


def test_generate_cli_writes_pngs_and_grid(ws: Path, tmp_path: Path, rcg_gen: RCGGenerator) -> None:
    from PIL import Image

    from rcg.cli import main

    def pngs(folder: Path) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(Image.open(p))) for p in sorted(folder.glob("0*.png"))])

    def as_png(images: torch.Tensor) -> torch.Tensor:  # what save_pngs writes
        return (images.clamp(0, 1) * 255).to(torch.uint8)[:, 0]

    out = tmp_path / "gen"
    assert main(["generate", "--n", "4", "--cfg", "1.0", "--steps", "3", "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").exists()
    assert Image.open(out / "00000.png").size == (28, 28)
    # the stage adds nothing to RCGGenerator
    assert torch.equal(pngs(out), as_png(rcg_gen.sample(4, cfg=1.0, steps=3)))
    assert main(["generate", "--n", "2", "--class", "3", "--steps", "3", "--out", str(out / "c")]) == 0
    assert torch.equal(pngs(out / "c"), as_png(rcg_gen.sample(2, class_ids=3, steps=3)))
    save_pngs(torch.rand(1, 1, 28, 28), tmp_path / "img")
    src = tmp_path / "img" / "00000.png"
    assert load_image(src, 1, 28).shape == (1, 28, 28)
    assert main(["generate", "--n", "2", "--from-image", str(src), "--steps", "3", "--out", str(out / "f")]) == 0
    assert len(list((out / "f").glob("0*.png"))) == 3  # the source image, then its 2 samples
    assert main(["generate", "--n", "16", "--interpolate", str(src), str(src), "--steps", "3",
                 "--out", str(out / "i")]) == 0
    strip = pngs(out / "i")  # two rows of 8 between one image and itself: constant along each row
    assert len(strip) == 16 and all(torch.equal(strip[r * 8], strip[r * 8 + 7]) for r in (0, 1))
    assert not torch.equal(strip[0], strip[8])
    assert main(["generate", "--from-image", str(tmp_path / "nope.png"), "--out", str(out / "x")]) == 1


def test_save_grid_upscales_small_images(tmp_path: Path) -> None:
    from PIL import Image

    p = save_grid(torch.rand(4, 1, 28, 28), tmp_path / "g.png")
    w, h = Image.open(p).size
    assert w > 28 * 2 * 2 and h > 28 * 2 * 2  # 2x2 grid, upscaled 3x


def test_cluster_and_contrastive_modes_draw_from_their_folders(trained: Path, tmp_path: Path) -> None:
    """`cluster` samples its folder's label network with the given cluster ids and reads its
    clustering record; `contrastive` feeds its rep network hypersphere samples (here stand-in folders:
    copies of the label and rep generators, which have the same networks)."""
    from rcg.clusters import Clusters, save_clusters

    gen_dir = tmp_path / "generator"
    gen_dir.mkdir()
    for condition in ("rep", "none", "label"):
        (gen_dir / condition).symlink_to(_folder(trained, condition))
    shutil.copytree(_folder(trained, "label"), gen_dir / "cluster")
    shutil.copytree(_folder(trained, "rep"), gen_dir / "contrastive")
    save_clusters(Clusters(torch.zeros(10, 256), [], torch.zeros(0, dtype=torch.long),
                           {"k": 10, "counts": [1] * 10, "majority_class": list(range(10))}), gen_dir / "cluster")
    gens = ModeGenerators(gen_dir, trained / "models" / "rdm", device="cpu")
    kw = dict(steps=3, seed=4, batch_size=3)
    ids = torch.tensor([9, 0, 3])
    label = ImageGenerator.load(_folder(trained, "label"), device="cpu")
    rep = ImageGenerator.load(_folder(trained, "rep"), device="cpu")
    assert torch.equal(gens.sample("cluster", 3, class_ids=ids, **kw), label.sample(3, label=ids, **kw))
    assert torch.equal(gens.sample("contrastive", 3, **kw), rep.sample(3, rep=hypersphere(3, 256, seed=4), **kw))
    assert gens.cluster_meta()["counts"] == [1] * 10
    with pytest.raises(PipelineError, match="class_ids"):
        gens.sample("cluster", 3, steps=3)
    (gen_dir / "cluster" / "clusters.json").unlink()
    with pytest.raises(PipelineError, match="clusters.json"):
        gens.cluster_meta()
