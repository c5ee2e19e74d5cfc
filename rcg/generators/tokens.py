"""MAGE as an image generator of the pipeline: it generates VQ token ids, not pixels (paper section 3.3).

RCG's main image generator is MAGE over the ids of a frozen VQGAN (docs/paper.md#image-generators).
What it needs beside the network of rcg.generators.mage:

- `TokenCodec`: images in [0, 1] <-> token ids [N, T] through the tokenizer folder that
  `rcg tokenizer` writes (models/tokenizer); generator.json records the folder and the digest of
  its weights, so a generator reloads with its own tokenizer and refuses another one;
- `mage_kwargs`: the sequence length and codebook size come from that tokenizer, not from the
  named size (MAGE-B's 256 ids of 1024 codes are the official tokenizer's at 256 px);
- `weight_decay_groups`: MAGE's AdamW recipe decays every weight but biases and 1-D parameters
  (norms), as timm's `add_weight_decay` in the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.io import PipelineError, file_digest


def tokenizer_digest(path: str | Path) -> str:
    """The digest of a tokenizer folder's weights (what generator.json and resume fingerprints
    record); a PipelineError when the tokenizer stage left only its skip marker there."""
    if (Path(path) / "skipped.json").exists():
        raise PipelineError(f"{path}: the tokenizer stage skipped it (train_generator.arch was not a MAGE arch "
                            "when it ran); rerun `dvc repro` or `rcg tokenizer`")
    return file_digest(Path(path) / "tokenizer.safetensors")


class TokenCodec:
    """A frozen VQ tokenizer folder: images [N, C, H, W] in [0, 1] <-> ids [N, h * w] (row-major)."""

    def __init__(self, path: str | Path, digest: str | None = None) -> None:
        from rcg.tokenizers import load_tokenizer

        self.path = Path(path)
        self.digest = tokenizer_digest(self.path)
        self.vq = load_tokenizer(self.path)
        if digest is not None and digest != self.digest:
            raise PipelineError(f"{self.path}: not the tokenizer this generator was trained with "
                                f"(weights digest {self.digest}, expected {digest})")
        self.grid = tuple(self.vq.token_grid)
        self.num_tokens, self.codebook_size = self.grid[0] * self.grid[1], int(self.vq.codebook_size)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[0, 1] images -> token ids [N, T] (int64): the nearest codebook entries, in fp32 whatever
        the caller's autocast, so the ids do not depend on the training precision."""
        with torch.autocast(images.device.type, enabled=False):
            return self.vq.encode(images.float()).flatten(1)  # (N, T)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """Token ids [N, T] -> images [N, C, H, W] in [0, 1] (in fp32: the decoder is not autocast)."""
        with torch.autocast(ids.device.type, enabled=False):
            return self.vq.decode(ids.view(-1, *self.grid).long())

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        """(codebook size, sequence length), after checking the tokenizer fits the data."""
        if (self.vq.in_channels, self.vq.image_size) != (channels, image_size):
            raise PipelineError(f"{self.path}: the tokenizer takes {self.vq.in_channels}-channel images of "
                                f"{self.vq.image_size} px, the data are {channels}-channel at {image_size} px "
                                "(data.channels, data.image_size)")
        return self.codebook_size, self.num_tokens

    def to(self, device: torch.device | str) -> TokenCodec:
        self.vq.to(device)
        return self

    def meta(self) -> dict[str, Any]:
        return {"type": "tokens", "path": str(self.path), "digest": self.digest}


def mage_kwargs(codec: TokenCodec, condition: str, rep_dim: int, num_classes: int,
                rep_drop_prob: float) -> dict[str, Any]:
    """The constructor arguments generator.json records for a MAGE on `codec`'s ids."""
    return dict(num_tokens=codec.num_tokens, codebook_size=codec.codebook_size, condition=condition,
                rep_dim=rep_dim, num_classes=num_classes, rep_drop_prob=rep_drop_prob)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the reference MAGE: `weight_decay` on every trained weight of two
    or more dimensions, none on biases and 1-D parameters (LayerNorms, the MLM bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["TokenCodec", "mage_kwargs", "tokenizer_digest", "weight_decay_groups"]
