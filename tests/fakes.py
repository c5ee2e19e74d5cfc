"""Stand-ins for the files the project downloads for real runs, built by the tests with random weights.

Each has the layout of the real file, so the project's own loaders read it exactly as they read the
released one, at a size that loads and runs in seconds on a CPU:

- `official_checkpoint`: an official SSL encoder checkpoint (MoCo v3 `.pth.tar`, DINO, iBOT, DeiT);
- `random_inception_weights`: torch-fidelity's Inception-v3 weights file;
- `tiny_vae`: a diffusers AutoencoderKL folder (what `save_pretrained` writes for the SD VAE);
- `adm_reference_npz`: ADM's reference statistics `.npz` (mu/sigma of the FID features, arr_0 images);
- `official_vqgan`: MAGE's MaskGIT VQGAN checkpoint (`vqgan_jax_strongaug.ckpt`), whose layout
  (`vqgan_layout`) is written out here from the network's description, independently of
  rcg.tokenizers, so that a test comparing the two can fail.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rcg.encoders import EncoderSpec, RepEncoder


def official_checkpoint(fmt: str, path: Path, spec: EncoderSpec | None = None,
                        seed: int = 11) -> tuple[Path, EncoderSpec, RepEncoder]:
    """A checkpoint of `fmt` in the official layout, with the extras the released files carry
    (optimizer state, epoch, an argparse Namespace of the training arguments). `spec`: the encoder
    it holds (default: a small ViT with the head of `fmt`). Returns (path, spec, the encoder saved)."""
    from tests.test_encoders import _prefixed, small_spec, source_encoder

    if spec is None:
        head = {"mocov3": "mocov3", "dino": "dino", "ibot": "dino", "deit": "linear"}[fmt]
        spec = small_spec(head=head, **({} if fmt == "mocov3" else {"pos_embed": "learn"}),
                          **({"rep_dim": 1000} if fmt == "deit" else {}))
    src = source_encoder(spec, seed=seed)
    sd = src.vit.state_dict()
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]}
    args = argparse.Namespace(arch="vit_base", patch_size=16, lr=1.5e-4, output_dir="/out")
    if fmt == "mocov3":
        ckpt = {"epoch": 300, "arch": "vit_base", "state_dict": _prefixed(sd, "module.base_encoder."),
                "optimizer": optimizer}
    elif fmt in ("dino", "ibot"):
        teacher = {(k if k.startswith("head.") else "backbone." + k): v.clone() for k, v in sd.items()}
        teacher["head.last_layer.weight_g"] = torch.ones(100, 1)
        ckpt = {"teacher": teacher, "student": teacher, "optimizer": optimizer, "epoch": 100, "args": args,
                "dino_loss": {"center": torch.zeros(1, 100)}}
    else:
        ckpt = {"model": sd, "optimizer": optimizer, "epoch": 300, "args": args, "scaler": {"scale": 65536.0}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path, spec, src


def random_inception_weights(path: Path) -> Path:
    """A weights file in the format torch-fidelity's inception-v3-compat loads (a torch.save'd
    state dict), with random weights: built by constructing the extractor without loading any."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe_mod

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fe_mod, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
        m.setattr(fe_mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        m.setattr(fe_mod.torch, "load", lambda *a, **k: {})
        torch.manual_seed(0)
        net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    for mod in net.modules():  # He init, so activations survive ~90 random layers instead of vanishing
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def tiny_vae(folder: Path, block_out_channels: tuple[int, ...] = (8, 16)) -> Path:
    """A diffusers AutoencoderKL folder (config.json + safetensors weights, as save_pretrained writes
    the SD VAE) with random weights: one down/up block per width, so 2 ** (len - 1) is its factor
    (the SD VAE's four blocks: 8); 4 latent channels and the SD scaling factor, as the SD VAE."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels, layers_per_block=1, norm_num_groups=4, sample_size=32,
    ).save_pretrained(folder)
    return folder


def adm_reference_npz(path: Path, images: torch.Tensor, featurizer: Any, with_images: bool = True) -> Path:
    """An ADM-format reference file of uint8 `images` [N, C, H, W]: mu/sigma of their features under
    `featurizer` (rcg.metrics.fidelity.Featurizer; ADM's file holds Inception's 2048-d pool
    features), mu_s/sigma_s (ADM's spatial statistics; unused here) and, optionally, the images as
    arr_0 (NHWC uint8)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(featurizer.features([images])[featurizer.layers["fid"]])
    arrays = {"mu": stats["mu"], "sigma": stats["sigma"], "mu_s": stats["mu"][:2], "sigma_s": stats["sigma"][:2, :2]}
    if with_images:
        arrays["arr_0"] = images.permute(0, 2, 3, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# The size of vqgan_jax_strongaug.ckpt (MaskGIT's VQGAN: width 128, multipliers 1, 1, 2, 2, 4, two
# residual blocks per level, 256-d codes, 1024 of them), as `vqgan_layout` keyword arguments.
MASKGIT_VQGAN = dict(in_ch=3, ch=128, mult=(1, 1, 2, 2, 4), blocks=2, z=256, codes=1024)


def _vqgan_block(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    keys = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
            f"{prefix}.conv1.weight": (c_out, c_in, 3, 3),
            f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
            f"{prefix}.conv2.weight": (c_out, c_out, 3, 3)}
    if c_in != c_out:
        keys[f"{prefix}.nin_shortcut.weight"] = (c_out, c_out, 1, 1)  # acts on h, so out x out
    return keys


def vqgan_layout(in_ch: int, ch: int, mult: tuple[int, ...], blocks: int, z: int,
                 codes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a MaskGIT VQGAN state dict (the layout of vqgan_jax_strongaug.ckpt at
    `MASKGIT_VQGAN`; smaller sizes of the same network with other arguments)."""
    w = [ch * m for m in mult]
    out: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (ch, in_ch, 3, 3)}
    c = ch
    for i, wi in enumerate(w):
        for j in range(blocks):
            out |= _vqgan_block(f"encoder.down.{i}.block.{j}", c, wi)
            c = wi
    out |= _vqgan_block("encoder.mid.block_1", c, c) | _vqgan_block("encoder.mid.block_2", c, c)
    out |= {"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
            "encoder.conv_out.weight": (z, c, 1, 1), "encoder.conv_out.bias": (z,),
            "decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)}
    out |= _vqgan_block("decoder.mid.block_1", c, c) | _vqgan_block("decoder.mid.block_2", c, c)
    for i in reversed(range(len(w))):
        for j in range(blocks):
            out |= _vqgan_block(f"decoder.up.{i}.block.{j}", c, w[i])
            c = w[i]
        if i > 0:
            out |= {f"decoder.up.{i}.upsample.conv.weight": (c, c, 3, 3), f"decoder.up.{i}.upsample.conv.bias": (c,)}
    out |= {"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,),
            "decoder.conv_out.weight": (in_ch, c, 3, 3), "decoder.conv_out.bias": (in_ch,),
            "quantize.embedding.weight": (codes, z)}
    return out


def random_vqgan_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of `layout`: convolutions scaled by fan-in, norms around (1, 0), codes N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        t = torch.randn(shape, generator=g)
        if len(shape) == 4:
            t /= math.sqrt(shape[1] * shape[2] * shape[3])
        elif k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm_out.weight"):
            t = 1.0 + 0.1 * t
        elif not k.startswith("quantize."):
            t = 0.1 * t
        state[k] = t
    return state


def official_vqgan(path: Path, seed: int = 0, wrapped: bool = False,
                   size: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """An official-layout VQGAN checkpoint at `path` with random weights, saved with torch.save as
    the released file is (a bare state dict; `wrapped`: under `state_dict`, as some copies are);
    `size`: `vqgan_layout` arguments (default `MASKGIT_VQGAN`, ~218 MB). Returns the state saved."""
    state = random_vqgan_state(vqgan_layout(**(size or MASKGIT_VQGAN)), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state} if wrapped else state, path)
    return state
