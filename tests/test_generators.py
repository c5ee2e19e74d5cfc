"""The image generators: DiT / U-Net conditioning, guidance, registry sizes, saving, the VAE codec."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rcg.generators import REGISTRY, arch_kind, build_generator, load_generator, save_generator
from rcg.generators.dit import DIT_ARCHS, DiT, build_dit
from rcg.generators.mage import MAGE, MAGE_ARCHS
from rcg.generators.unet import UNET_ARCHS, UNet, build_unet
from rcg.generators.vae import PixelCodec, VAECodec, codec_for, make_codec
from rcg.io import PipelineError
from rcg.layers import sincos_pos_embed_2d
from tests.fakes import tiny_vae

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARCHS = ["dit_tiny", "unet_tiny"]


# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _cond(condition: str, n: int) -> dict[str, torch.Tensor]:
    if condition == "rep":
        return {"rep": torch.randn(n, 256)}
    if condition == "label":
        return {"label": torch.randint(0, 10, (n,))}
    return {}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Break the zero init (adaLN-Zero, zero output layers) so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _model(arch: str, condition: str, **kw) -> torch.nn.Module:
    return build_generator(arch, input_size=28, in_channels=1, condition=condition, num_classes=10, **kw)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
@pytest.mark.parametrize("condition", ["rep", "none", "label"])
def test_output_shape_and_zero_init(arch: str, condition: str) -> None:
    model = _model(arch, condition).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.randint(0, 1000, (3,))
    out = model(x, t, **_cond(condition, 3))
    assert out.shape == x.shape
    # adaLN-Zero / zero-initialised output convolution: an untrained generator predicts exactly 0.
    assert torch.count_nonzero(out) == 0


def test_registry_has_every_dit_size_and_patch() -> None:
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"DiT-{size}/{p}" in REGISTRY
    # DiT-S/2 on 32x32x4 latents: 33.0M parameters in the DiT paper (Table 1); ours adds the
    # 256 -> 384 rep embedder and fake_latent, and drops learned sigma.
    model = build_generator("DiT-S/2", input_size=32, in_channels=4)
    n = sum(p.numel() for p in model.parameters())
    assert 32.0e6 < n < 33.5e6
    assert model.grid == 16 and model.depth == 12 and model.hidden_size == 384
    with pytest.raises(PipelineError, match=r"unknown generator arch 'DiT-XXL/3' \(known: DiT-S/2, "):
        build_generator("DiT-XXL/3")


def test_registry_is_the_union_of_the_family_tables() -> None:
    families = (set(DIT_ARCHS), set(UNET_ARCHS), set(MAGE_ARCHS))
    assert set(REGISTRY) == set.union(*families) and sum(map(len, families)) == len(REGISTRY)
    assert {arch_kind(a) for a in MAGE_ARCHS} == {"tokens"}
    assert {arch_kind(a) for a in set(DIT_ARCHS) | set(UNET_ARCHS)} == {"diffusion"}
    mage = build_generator("mage_tiny", num_tokens=49, codebook_size=32, condition="none")
    assert isinstance(mage, MAGE) and mage.num_tokens == 49 and mage.codebook_size == 32
    assert DIT_ARCHS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    unet = build_unet("unet_tiny", input_size=28, in_channels=1, channel_mult=[1, 2], attention_levels=[1])
    assert isinstance(unet, UNet)  # JSON lists for the tuple kwargs are fine
    dit = build_dit("dit_tiny", input_size=28, in_channels=1, depth=1)  # kwargs override the entry
    assert isinstance(dit, DiT) and dit.depth == 1 and dit.patch_size == 4
    with pytest.raises(PipelineError, match=r"unknown DiT size 'unet_tiny' \(known: DiT-S/2, "):
        build_dit("unet_tiny")
    with pytest.raises(PipelineError, match=r"unknown U-Net size 'dit_tiny' \(known: unet_tiny, unet_fmnist\)"):
        build_unet("dit_tiny")


def test_dit_positions_are_the_shared_sincos_embedding() -> None:
    model = build_generator("dit_fmnist", input_size=28, in_channels=1)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(4, 128))  # float64 sinusoids, as DiT's
    assert "pos_embed" not in model.state_dict()  # fixed: rebuilt, never saved


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_fake_latent_replaces_rep(arch: str) -> None:
    model = _model(arch, "rep")
    _perturb(model)
    model.eval()
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,))
    r1, r2 = torch.randn(4, 256), torch.randn(4, 256)
    drop = torch.ones(4, dtype=torch.bool)
    # Forced drop: the representation is ignored (the fake_latent is used instead).
    assert torch.allclose(model(x, t, rep=r1, drop=drop), model(x, t, rep=r2, drop=drop))
    # No drop in eval mode: the representation matters.
    assert not torch.allclose(model(x, t, rep=r1), model(x, t, rep=r2))
    # Training mode with rep_drop_prob = 1: every sample gets the fake latent.
    model.cond.rep_drop_prob = 1.0
    model.train()
    assert torch.allclose(model(x, t, rep=r1), model(x, t, rep=r2))
    # The fake latent is a learned parameter: it receives gradient when used.
    model(x, t, rep=r1).square().mean().backward()
    assert model.cond.fake_latent.grad is not None and model.cond.fake_latent.grad.abs().sum() > 0


def test_rep_drop_rate_in_training() -> None:
    model = _model("dit_tiny", "rep", rep_drop_prob=0.1).train()
    torch.manual_seed(0)
    masks = [model.cond._drop_mask(1000, torch.device("cpu"), None) for _ in range(5)]
    rate = torch.stack(masks).float().mean().item()
    assert 0.08 < rate < 0.12
    assert model.eval().cond._drop_mask(1000, torch.device("cpu"), None) is None


@pytest.mark.parametrize("arch", SMALL_ARCHS)
@pytest.mark.parametrize("condition", ["rep", "label"])
def test_forward_with_cfg_mixes_cond_and_null(arch: str, condition: str) -> None:
    model = _model(arch, condition)
    _perturb(model, 1)
    model.eval()
    x, t = torch.randn(3, 1, 28, 28), torch.randint(0, 1000, (3,))
    c = _cond(condition, 3)
    cond = model(x, t, **c)
    uncond = model(x, t, **c, drop=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(model.forward_with_cfg(x, t, 0.0, **c), cond, atol=1e-5)
    assert torch.allclose(model.forward_with_cfg(x, t, 2.0, **c), cond + 2.0 * (cond - uncond), atol=1e-4)
    w = torch.tensor([0.0, 1.0, 3.0])
    want = cond + w.view(-1, 1, 1, 1) * (cond - uncond)
    assert torch.allclose(model.forward_with_cfg(x, t, w, **c), want, atol=1e-4)


def test_unconditional_model_ignores_guidance() -> None:
    model = _model("dit_tiny", "none")
    _perturb(model)
    model.eval()
    x, t = torch.randn(2, 1, 28, 28), torch.randint(0, 1000, (2,))
    assert torch.allclose(model.forward_with_cfg(x, t, 3.0), model(x, t))
    with pytest.raises(ValueError, match="pass rep"):
        _model("dit_tiny", "rep")(x, t)


def test_label_null_class_is_extra_index() -> None:
    model = _model("dit_tiny", "label")
    assert model.cond.y_embedder.num_embeddings == 11  # 10 classes + the null class


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    kwargs = dict(input_size=28, in_channels=1, condition="rep", rep_dim=256, num_classes=10, rep_drop_prob=0.1)
    model = build_generator(arch, **kwargs)
    _perturb(model)
    meta = {"arch": arch, "kwargs": kwargs, "codec": {"type": "pixel"},
            "diffusion": {"timesteps": 1000, "beta_schedule": "linear", "parameterization": "eps"}}
    save_generator(tmp_path / "g", model, meta)
    loaded, diffusion, meta2 = load_generator(tmp_path / "g")
    assert meta2["arch"] == arch and diffusion.num_timesteps == 1000
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, t, r = torch.randn(2, 1, 28, 28), torch.randint(0, 1000, (2,)), torch.randn(2, 256)
    assert torch.equal(loaded(x, t, rep=r), model.eval()(x, t, rep=r))
    with pytest.raises(PipelineError, match="run `rcg train-generator`"):
        load_generator(tmp_path / "missing")


def test_optimised_dit_matches_straightforward_dit() -> None:
    """The benchmark's baseline is the same maths: equal outputs with the same weights."""
    spec = importlib.util.spec_from_file_location("bench_dit", ROOT / "benchmarks" / "bench_dit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fast = build_generator("dit_tiny", input_size=28, in_channels=1, condition="rep")
    _perturb(fast)
    naive = bench.NaiveDiT.from_fast(fast)
    x, t, r = torch.randn(3, 1, 28, 28), torch.randint(0, 1000, (3,)), torch.randn(3, 256)
    fast.eval(), naive.eval()
    assert torch.allclose(fast(x, t, rep=r), naive(x, t, rep=r), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# VAE latent space (256 px): real diffusers loading code on a tiny same-format checkpoint
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_vae_dir(tmp_path: Path) -> Path:
    return tiny_vae(tmp_path / "tiny-vae")  # the same folder layout as stabilityai/sd-vae-ft-ema


def test_vae_codec_loads_diffusers_folder(tiny_vae_dir: Path) -> None:
    codec = codec_for(str(tiny_vae_dir))
    assert isinstance(codec, VAECodec)
    assert codec.scale == pytest.approx(0.18215)  # diffusers' default scaling_factor
    assert codec.latent_shape(3, 32) == (4, 16)
    images = torch.rand(2, 3, 32, 32)
    z = codec.encode(images, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 16, 16)
    # The posterior mean, scaled, is what encode samples around.
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(tiny_vae_dir)
    mean = ref.encode(images * 2 - 1).latent_dist.mean * 0.18215
    assert (z - mean).abs().mean() < (mean.abs().mean() + 1.0)
    x = codec.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        want = ((ref.decode(z / 0.18215).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(x, want, atol=1e-5)
    # Round trip through generator.json's codec entry, with an explicit scale.
    again = make_codec({"type": "vae", "path": str(tiny_vae_dir), "scale": 0.5})
    assert isinstance(again, VAECodec) and again.scale == 0.5


def test_dit_trains_on_vae_latents(tiny_vae_dir: Path) -> None:
    from rcg.diffusion import Diffusion, make_betas

    codec = codec_for(str(tiny_vae_dir))
    ch, size = codec.latent_shape(3, 32)
    model = build_generator("dit_tiny", input_size=size, in_channels=ch, condition="rep")
    z = codec.encode(torch.rand(4, 3, 32, 32))
    loss = Diffusion(make_betas("linear", 1000)).training_loss(model, z, {"rep": torch.randn(4, 256)})
    loss.backward()
    assert torch.isfinite(loss)


def test_vae_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a diffusers AutoencoderKL folder"):
        codec_for(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=str(tmp_path)):
        codec_for(str(tmp_path))


def test_pixel_codec_round_trip() -> None:
    codec = make_codec({"type": "pixel"})
    assert isinstance(codec, PixelCodec)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(codec.decode(codec.encode(x)), x, atol=1e-6)
    assert codec.encode(torch.zeros(1)).item() == -1.0


def test_dit_rejects_bad_patch() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(input_size=28, patch_size=8, in_channels=1)
