"""A MAGE image generator (paper section 3.3) through the served path: `rcg promote` registers the RDM
and the MAGE as the MLflow pyfunc (rcg.serving), the registered model draws images through its
tokenizer, also loaded in another folder and over HTTP (`mlflow models serve`), and `rcg generate`
draws them from the project's folders.

The project is test_serving's tiny one (tracking in a SQLite store in the folder, a tiny RDM and
class-conditional RDM with weights), with the DiT swapped for a `mage_tiny` on the ids of a
`vq_tiny` tokenizer in models/tokenizer, both with random weights, written as the tokenizer and
train_generator stages write them (generator.json names the tokenizer by the relative path the
project trained with, and the digest of its weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rcg import config
from rcg.generators import build_generator, save_generator
from rcg.generators.tokens import TokenCodec, mage_kwargs
from rcg.generators.training import sampling_settings
from rcg.io import PipelineError
from rcg.tokenizers import build_vqgan, save_tokenizer
from tests.test_serving import MODEL, N_CLASSES, _new_project, _perturb, _post, _promote, _serve

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3  # MAGE decoding iterations saved in generator.json (tiny preset: train_generator.sample_steps)


def _make_mage(cfg: config.Config) -> None:
    """A random `vq_tiny` tokenizer in train_generator.tokenizer and a rep-conditioned `mage_tiny` on
    its ids in <out_dir>/rep, replacing the DiT there; generator.json as train_generator writes it."""
    torch.manual_seed(0)
    gcfg = cfg.train_generator
    vq = build_vqgan("vq_tiny", in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    _perturb(vq)  # codebook entries apart, so different ids decode to different images
    save_tokenizer(vq, gcfg.tokenizer, "vq_tiny", {"source": "random weights (tests)"})
    codec = TokenCodec(gcfg.tokenizer)
    kwargs = mage_kwargs(codec, "rep", 256, N_CLASSES, gcfg.rep_drop_prob)
    gen = build_generator("mage_tiny", **kwargs)
    _perturb(gen)
    gcfg.sample_steps, gcfg.amp = STEPS, False
    meta = {"arch": "mage_tiny", "kwargs": kwargs, "condition": "rep", "codec": codec.meta(),
            "classes": [str(c) for c in range(N_CLASSES)], "params": sum(p.numel() for p in gen.parameters()),
            "step": 0, "sampling": sampling_settings(gcfg, codec),
            "data": {"image_size": cfg.data.image_size, "channels": cfg.data.channels}}
    out = Path(gcfg.out_dir) / "rep"
    shutil.rmtree(out)
    save_generator(out, gen, meta)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    """tmp_path/project with the RDMs and the MAGE, as the working directory."""
    folder = tmp_path / "project"
    folder.mkdir()
    cfg = _new_project(folder, monkeypatch)
    _make_mage(cfg)
    return cfg


def _u8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], rounded as the pyfunc rounds."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _local(cfg: config.Config) -> object:
    from rcg.generation import RCGGenerator

    return RCGGenerator.load(cfg.train_rdm.out_dir, Path(cfg.train_generator.out_dir) / "rep", device="cpu")


def test_a_mage_generator_is_registered_and_draws_images_in_its_project(project: config.Config) -> None:
    """The registered pyfunc is RCGGenerator over the MAGE: the same images for a seed, guidance and
    a class through the class-conditional RDM, and `steps` bounded by the token count (49)."""
    import mlflow

    from rcg.serving import RCGPyfunc, RequestError, decode_images

    decision = _promote(project, fd=10.0)
    assert decision["promoted"] and decision["version"] == "1"
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    pyfunc = model.unwrap_python_model()
    assert isinstance(pyfunc, RCGPyfunc) and pyfunc.limits.timesteps == 49 and pyfunc.limits.num_classes == N_CLASSES
    images = decode_images(model.predict(pd.DataFrame([{"n": 2, "seed": 0}, {"n": 1, "class": 2, "seed": 1}])))
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8 and images.std() > 0
    local = _local(project)
    want = local.sample(2, cfg=1.0, cfg_schedule=project.evaluate.cfg_schedule, seed=0)  # the table's cfg
    assert np.array_equal(images[:2], _u8(want))
    assert np.array_equal(images[2:], _u8(local.sample(1, class_ids=2, cfg=1.0,
                                                       cfg_schedule=project.evaluate.cfg_schedule, seed=1)))
    more = decode_images(model.predict(pd.DataFrame([{"n": 2, "seed": 0, "cfg": 0}]), params={"steps": 49}))
    assert more.shape == (2, 28, 28, 1) and not np.array_equal(more, images[:2])
    with pytest.raises(RequestError, match=r"params: steps must be an integer in \[1, 49\], got 50"):
        model.predict(pd.DataFrame([{"n": 1}]), params={"steps": 50})


def test_rcg_generate_draws_images_with_a_mage(project: config.Config) -> None:
    """`rcg generate` (the CLI): RDM samples -> the MAGE, guided, written as PNGs and a grid."""
    from PIL import Image

    from rcg import cli

    assert cli.main(["generate", "--n", "3", "--cfg", "1.0", "--seed", "4", "--out", "outputs/gen"]) == 0
    files = sorted(Path("outputs/gen").glob("0000*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"] and Path("outputs/gen/grid.png").exists()
    written = np.stack([np.asarray(Image.open(f)) for f in files])
    want = _local(project).sample(3, cfg=1.0, cfg_schedule="linear", seed=4)
    assert np.array_equal(written, (want.clamp(0, 1) * 255).to(torch.uint8)[:, 0].numpy())  # PNGs truncate
    assert cli.main(["generate", "--n", "2", "--class", "1", "--steps", "5", "--out", "outputs/cls"]) == 0
    assert len(list(Path("outputs/cls").glob("0000*.png"))) == 2


def test_the_registered_mage_carries_its_tokenizer(project: config.Config, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """generator.json names the tokenizer by the project's relative path: the registered model must
    carry a copy, so it loads, draws and serves from another folder with the project's tokenizer
    gone, as a generator on VAE latents does with its VAE; a missing tokenizer stops `promote`."""
    import mlflow

    from rcg.serving import decode_images

    request = [{"n": 2, "seed": 3}, {"n": 1, "class": 0, "cfg": 0, "seed": 1}]
    local = _local(project)
    want = np.concatenate([_u8(local.sample(2, cfg=1.0, cfg_schedule=project.evaluate.cfg_schedule, seed=3)),
                           _u8(local.sample(1, class_ids=0, seed=1))])
    _promote(project, fd=10.0)
    tokenizer = Path(project.train_generator.tokenizer)
    shutil.move(tokenizer, tmp_path / "tokenizer-aside")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert np.array_equal(decode_images(model.predict(pd.DataFrame(request))), want)
    with _serve(project, elsewhere) as url:  # `mlflow models serve`, started in the tokenizer-less folder
        status, answer = _post(url, request)
        assert status == 200, answer
        assert np.array_equal(decode_images(answer["predictions"]), want)
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(PipelineError, match="^models/tokenizer: not found"):
        _promote(project, fd=9.0)
