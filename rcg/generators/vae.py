"""The space the image generator works in: pixels for small images, VAE latents for 256 px.

RCG's DiT (docs/paper.md#image-generators) trains on SD VAE latents: images in [-1, 1] are encoded
by ``AutoencoderKL`` (``stabilityai/sd-vae-ft-ema``), a latent is *sampled* from the posterior and
scaled by 0.18215; generation decodes ``z / 0.18215`` and maps back with ``(x + 1) / 2``. Here the
VAE is read from a local diffusers folder (``config.json`` + weights, as ``save_pretrained`` writes
it; nothing is downloaded). Only safetensors weights are read: a folder with only a pickle
``diffusion_pytorch_model.bin`` (which could run code when unpickled) is refused. For
Fashion-MNIST-sized images the generator works on pixels instead, through the same two-method
interface (``PixelCodec``). MAGE works on the ids of a VQ tokenizer instead
(``rcg.generators.tokens.TokenCodec``, codec type ``tokens``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rcg.io import PipelineError, read_json

SD_VAE_SCALE = 0.18215  # the DiT/LDM latent scale for the SD VAE (docs/paper.md#image-generators)


class Codec(Protocol):
    """Images in [0, 1] <-> the tensors the generator is trained on."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]: ...

    def to(self, device: torch.device | str) -> Codec: ...

    def meta(self) -> dict[str, Any]: ...


class PixelCodec:
    """Pixel space: [0, 1] -> [-1, 1] and back (the generator sees the image itself)."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images * 2.0 - 1.0

    def decode(self, z: Tensor) -> Tensor:
        return ((z.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        return channels, image_size

    def to(self, device: torch.device | str) -> PixelCodec:
        return self

    def meta(self) -> dict[str, Any]:
        return {"type": "pixel"}


VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes (safe_serialization)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that unpickle


def check_vae_weights(path: Path) -> None:
    """A PipelineError unless the folder's weights are safetensors: one file, or an index whose
    shards all are (diffusers would otherwise fall back to a pickle `.bin`)."""
    index = path / f"{VAE_WEIGHTS}.index.json"
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        pickled = [s for s in shards if not s.endswith(".safetensors")]
        if pickled or not shards:
            raise PipelineError(f"{index}: shards must be safetensors files, found {pickled or 'none'}")
        return
    if (path / VAE_WEIGHTS).is_file():
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    found = f"only {', '.join(pickles)}, a pickle format that could run code when loaded; " if pickles else ""
    raise PipelineError(
        f"{path}: no {VAE_WEIGHTS} ({found}re-save a trusted VAE with "
        "AutoencoderKL.save_pretrained(folder, safe_serialization=True))"
    )


class VAECodec:
    """Latent space of a diffusers AutoencoderKL (frozen, eval mode), scaled as DiT does."""

    def __init__(self, path: str | Path, scale: float | None = None) -> None:
        from diffusers import AutoencoderKL

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise PipelineError(
                f"{self.path}: not a diffusers AutoencoderKL folder (no config.json); save one with "
                "AutoencoderKL.save_pretrained, e.g. stabilityai/sd-vae-ft-ema"
            )
        check_vae_weights(self.path)
        try:
            # use_safetensors=True: diffusers never falls back to unpickling a .bin
            self.vae = AutoencoderKL.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise PipelineError(f"{self.path}: cannot load AutoencoderKL ({e})") from None
        self.vae.eval().requires_grad_(False)
        cfg_scale = getattr(self.vae.config, "scaling_factor", None)
        self.scale = float(scale if scale is not None else (cfg_scale or SD_VAE_SCALE))
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[0, 1] images -> scaled latents, sampled from the posterior as the reference DiT does."""
        x = images.to(self.vae.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator=generator) * self.scale  # (N, 4, H/8, W/8) for the SD VAE

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        x = self.vae.decode(z.to(self.vae.dtype) / self.scale).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        if image_size % self.factor:
            raise PipelineError(f"image size {image_size} is not a multiple of the VAE's factor {self.factor}")
        return self.latent_channels, image_size // self.factor

    def to(self, device: torch.device | str) -> VAECodec:
        self.vae.to(device)
        return self

    def meta(self) -> dict[str, Any]:
        return {"type": "vae", "path": str(self.path), "scale": self.scale}


def make_codec(meta: dict[str, Any] | None) -> Codec:
    """The codec described by generator.json's `codec` entry ({"type": "pixel"}, a VAE folder, or a
    tokenizer folder with the digest of its weights)."""
    meta = meta or {"type": "pixel"}
    if meta.get("type", "pixel") == "pixel":
        return PixelCodec()
    if meta["type"] == "vae":
        return VAECodec(meta["path"], meta.get("scale"))
    if meta["type"] == "tokens":
        from rcg.generators.tokens import TokenCodec

        return TokenCodec(meta["path"], meta.get("digest"))
    raise PipelineError(f"unknown codec type {meta['type']!r} (expected pixel, vae or tokens)")


def codec_for(vae_path: str, scale: float | None = None) -> Codec:
    """From config: an empty path means pixel space, otherwise a diffusers AutoencoderKL folder."""
    return PixelCodec() if not vae_path else VAECodec(vae_path, scale)
