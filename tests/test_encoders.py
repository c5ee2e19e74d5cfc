"""The encoder, its representation function and the strict official-checkpoint loaders.

Checkpoints of every format are built here with random weights, in the layout the official files
use, loaded back through `rcg.encoders.checkpoints`, and compared with the model they came from.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from rcg.encoders import EncoderSpec, RepEncoder, load_encoder, save_encoder
from rcg.encoders.checkpoints import load_checkpoint, load_strict
from rcg.encoders.vit import build_vit, encoder_spec
from rcg.io import PipelineError
from rcg.layers import sincos_pos_embed_2d


def small_spec(**kw) -> EncoderSpec:
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, head_hidden_dim=96)
    base.update(kw)
    return EncoderSpec(**base)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every float parameter and buffer (BN running stats too, so eval matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            r = torch.randn(t.shape, generator=g) * 0.2
            t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)
    return module


def source_encoder(spec: EncoderSpec, seed: int = 0) -> RepEncoder:
    return RepEncoder(spec, randomize(build_vit(spec), seed))


def images(b: int = 4, c: int = 1, h: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, c, h, h, generator=torch.Generator().manual_seed(seed))


def test_representation_follows_reference_recipe():
    spec = small_spec()
    enc = source_encoder(spec)
    x = images(c=1, h=40)
    # docs/paper.md#representation, written out by hand.
    x3 = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    xn = F.interpolate((x3 - mean) / std, size=32, mode="bicubic", align_corners=False)
    h = enc.vit.norm(enc.vit.blocks(enc.vit._pos_embed(enc.vit.patch_embed(xn))))[:, 0]
    r = enc.vit.head(h)
    want = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True, unbiased=True)
    got = enc(x)
    assert got.shape == (4, 256) and enc.rep_dim == 256
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(got.std(1), torch.ones(4), atol=1e-5)
    # Unbiased std: the norm of each vector is sqrt(D - 1), not sqrt(D).
    assert torch.allclose(got.norm(dim=1), torch.full((4,), 255.0**0.5), atol=1e-3)


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = source_encoder(small_spec())
    enc.train()
    assert not enc.training and not enc.vit.head[1].training
    assert not any(p.requires_grad for p in enc.parameters())
    x = images(b=3, c=3, h=32)
    # Eval-mode BatchNorm: a sample's representation does not depend on the rest of the batch.
    torch.testing.assert_close(enc(x)[:1], enc(x[:1]), rtol=1e-5, atol=1e-5)


def test_channel_mismatch_is_an_error():
    enc = source_encoder(small_spec(in_chans=1, mean=(0.5,), std=(0.5,)))
    assert enc(images(c=1)).shape == (4, 256)
    with pytest.raises(ValueError, match="channels"):
        enc(images(c=3))


def test_sincos_position_embedding_is_fixed_and_zero_for_cls():
    vit = build_vit(small_spec())
    assert not vit.pos_embed.requires_grad
    pe = vit.pos_embed.data
    assert pe.shape == (1, 17, 64)
    assert torch.equal(pe[0, 0], torch.zeros(64))  # the CLS token has no position
    # The patches: the shared embedding, computed in float32 as MoCo v3's torch code does.
    assert torch.equal(pe[0, 1:], sincos_pos_embed_2d(4, 64, dtype=torch.float32))
    learned = build_vit(small_spec(pos_embed="learn"))
    assert learned.pos_embed.requires_grad and not torch.equal(learned.pos_embed.data[0, 1:], pe[0, 1:])


def test_encoder_sizes_registry():
    base = encoder_spec("mocov3_vit_base")
    assert (base.embed_dim, base.depth, base.num_heads, base.rep_dim, base.head) == (768, 12, 12, 256, "mocov3")
    assert encoder_spec("mocov3_vit_small", rep_dim=128).rep_dim == 128
    dino = encoder_spec("ibot_vit_base")
    assert (dino.head, dino.head_hidden_dim, dino.pos_embed) == ("dino", 2048, "learn")
    assert encoder_spec("deit_vit_base", rep_dim=256).rep_dim == 1000  # its classifier is the representation
    with pytest.raises(PipelineError, match=r"unknown encoder arch 'vit_huge' \(known: mocov3_vit_small, "):
        encoder_spec("vit_huge")


def test_save_and_load_encoder_round_trip(tmp_path):
    spec = small_spec(in_chans=1, mean=(0.3,), std=(0.4,))
    enc = source_encoder(spec)
    save_encoder(enc, spec, tmp_path / "encoder", extra={"source": "test"})
    assert (tmp_path / "encoder" / "encoder.safetensors").exists()
    back = load_encoder(tmp_path / "encoder")
    assert back.spec == spec and not back.training
    x = images(c=1, h=28)
    torch.testing.assert_close(back(x), enc(x))


@pytest.mark.parametrize("img_size,patch_size,grid", [(28, 7, 4), (32, 8, 4), (224, 16, 14)])
def test_conv_stem_keeps_the_patch_grid(img_size, patch_size, grid):
    """A conv stem gives the tokens a patch projection would (same grid, same width)."""
    spec = small_spec(in_chans=1, img_size=img_size, patch_size=patch_size, stem="conv", mean=(0.3,), std=(0.4,))
    vit = build_vit(spec)
    tokens = vit.patch_embed(torch.rand(2, 1, img_size, img_size))
    assert tokens.shape == (2, grid * grid, spec.embed_dim)
    assert isinstance(vit.patch_embed.proj, torch.nn.Sequential)


def test_conv_stem_rejects_a_grid_it_cannot_make():
    with pytest.raises(ValueError, match="5-token side"):
        build_vit(small_spec(img_size=36, patch_size=6, stem="conv"))


def test_conv_stem_encoder_round_trips_and_trains_its_stem(tmp_path):
    from rcg.encoders.moco import init_patch_embed

    spec = small_spec(in_chans=1, img_size=28, patch_size=7, stem="conv", mean=(0.3,), std=(0.4,))
    enc = source_encoder(spec)
    save_encoder(enc, spec, tmp_path / "encoder")
    back = load_encoder(tmp_path / "encoder")
    assert back.spec.stem == "conv"
    x = images(c=1, h=28)
    torch.testing.assert_close(back(x), enc(x))  # BN running stats of the stem are saved too
    vit = build_vit(spec)
    init_patch_embed(vit, freeze=True)  # freezing applies to a linear patch projection only
    assert all(p.requires_grad for p in vit.patch_embed.parameters())


def test_load_encoder_names_missing_dir(tmp_path):
    with pytest.raises(PipelineError, match="encoder.json"):
        load_encoder(tmp_path / "nowhere")


# ------------------------------------------------------------------ official checkpoint formats


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in sd.items()}


def test_mocov3_checkpoint_drops_momentum_encoder_and_predictor(tmp_path):
    spec = small_spec()
    src = source_encoder(spec, seed=3)
    other = randomize(build_vit(spec), seed=4)  # the momentum encoder differs from the base encoder
    state = _prefixed(src.vit.state_dict(), "module.base_encoder.")
    state.update(_prefixed(other.state_dict(), "module.momentum_encoder."))
    state["module.predictor.0.weight"] = torch.randn(96, 256)
    state["module.predictor.1.running_mean"] = torch.randn(96)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {}}, path)
    enc = load_checkpoint(path, "mocov3", spec)
    x = images(c=3, h=48)
    torch.testing.assert_close(enc(x), src(x))


def test_mocov3_vit_l_key_names_are_fixed(tmp_path):
    spec = small_spec(depth=15, embed_dim=32, num_heads=2, head_hidden_dim=64)
    src = source_encoder(spec, seed=5)
    state = _prefixed(src.vit.state_dict(), "module.base_encoder.")
    # The released ViT-L has these four names wrong (docs/paper.md#encoder-checkpoints).
    for bad, good in [
        ("blocks.13.norm13", "blocks.13.norm1"),
        ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
        ("blocks.14.norm14", "blocks.14.norm2"),
        ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2"),
    ]:
        for suffix in ("weight", "bias"):
            state[f"module.base_encoder.{bad}.{suffix}"] = state.pop(f"module.base_encoder.{good}.{suffix}")
    path = tmp_path / "vitl.pth.tar"
    torch.save({"state_dict": state}, path)
    enc = load_checkpoint(path, "mocov3", spec)
    x = images(c=3, h=32)
    torch.testing.assert_close(enc(x), src(x))


@pytest.mark.parametrize("fmt", ["dino", "ibot"])
def test_dino_and_ibot_teacher_checkpoints(tmp_path, fmt):
    spec = small_spec(head="dino", head_hidden_dim=80, pos_embed="learn")
    src = source_encoder(spec, seed=6)
    teacher = {}
    for k, v in src.vit.state_dict().items():
        teacher[k if k.startswith("head.") else "backbone." + k] = v.clone()
    # The weight-normalised prototype layers that follow the bottleneck.
    teacher["head.last_layer.weight_g"] = torch.ones(1000, 1)
    teacher["head.last_layer.weight_v"] = torch.randn(1000, 256)
    if fmt == "ibot":
        teacher["head.last_layer2.weight_g"] = torch.ones(1000, 1)
        teacher["head.last_layer2.weight_v"] = torch.randn(1000, 256)
    else:
        teacher["head.last_layer.weight"] = torch.randn(1000, 256)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    path = tmp_path / f"{fmt}_checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 100,
                "args": argparse.Namespace(arch="vit_base", patch_size=16)}, path)
    enc = load_checkpoint(path, fmt, spec)
    x = images(c=1, h=32)
    torch.testing.assert_close(enc(x), src(x))


def test_deit_checkpoint(tmp_path):
    spec = small_spec(head="linear", rep_dim=1000, pos_embed="learn")
    src = source_encoder(spec, seed=7)
    path = tmp_path / "deit_base_patch16_224.pth"
    torch.save({"model": src.vit.state_dict()}, path)
    enc = load_checkpoint(path, "deit", spec)
    assert enc.rep_dim == 1000
    x = images(c=3, h=32)
    torch.testing.assert_close(enc(x), src(x))
    assert enc(x).shape == (4, 1000)


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    spec = small_spec()
    state = _prefixed(source_encoder(spec).vit.state_dict(), "module.base_encoder.")
    del state["module.base_encoder.blocks.1.attn.qkv.weight"]
    state["module.base_encoder.blocks.1.attn.extra.weight"] = torch.zeros(1)
    state["module.base_encoder.head.6.weight"] = torch.zeros(128, 96)  # wrong projector width
    path = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(PipelineError) as err:
        load_checkpoint(path, "mocov3", spec)
    msg = str(err.value)
    assert "bad.pth.tar" in msg
    assert "missing keys (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.1.attn.extra.weight" in msg
    assert "head.6.weight: checkpoint (128, 96) vs model (256, 96)" in msg


def test_wrong_format_is_named(tmp_path):
    path = tmp_path / "deit.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(PipelineError, match="expected a top-level 'state_dict'"):
        load_checkpoint(path, "mocov3", small_spec())
    with pytest.raises(PipelineError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth", "dino", small_spec())


def test_load_strict_accepts_exact_match():
    vit = build_vit(small_spec())
    load_strict(vit, {k: v.clone() for k, v in vit.state_dict().items()}, source="self")


def test_spec_from_config_checks_channels_and_names():
    from rcg.config import EncoderConfig
    from rcg.encoders.vit import spec_from_config

    fmnist = EncoderConfig(mean=[0.286], std=[0.353])
    spec = spec_from_config(fmnist, channels=1)
    assert (spec.in_chans, spec.img_size, spec.patch_size, spec.rep_dim) == (1, 28, 7, 256)
    assert spec.head == "mocov3" and spec.pos_embed == "sincos" and spec.mean == (0.286,)
    with pytest.raises(PipelineError, match="need 3 values"):
        spec_from_config(fmnist, channels=3)
    # Empty mean/std: the normalisation measured on the shards is used, one value per channel.
    measured = spec_from_config(EncoderConfig(), channels=3, measured=([0.4, 0.5, 0.6], [0.2, 0.2, 0.3]))
    assert measured.mean == (0.4, 0.5, 0.6) and measured.std == (0.2, 0.2, 0.3)
    with pytest.raises(PipelineError, match="leave both empty"):
        spec_from_config(EncoderConfig(), channels=3)
    base = spec_from_config(EncoderConfig(arch="mocov3_vit_base"), channels=3)
    assert (base.embed_dim, base.depth, base.num_heads, base.head_hidden_dim) == (768, 12, 12, 4096)
    with pytest.raises(PipelineError, match="unknown 'vit_huge'"):
        spec_from_config(EncoderConfig(arch="vit_huge"), channels=3)
