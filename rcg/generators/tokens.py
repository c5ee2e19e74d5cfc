"""MAGE as an image generator of the pipeline: it generates VQ token ids, not pixels (paper section 3.3).

RCG's main image generator is MAGE over the ids of a frozen VQGAN (docs/paper.md#image-generators).
What it needs beside the network of rcg.generators.mage:

- `TokenCodec`: images in [0, 1] <-> token ids [N, T] through the tokenizer folder that
  `rcg tokenizer` writes (models/tokenizer); generator.json records the folder and the digest of
  its weights, so a generator reloads with its own tokenizer and refuses another one;
- `mage_kwargs`: the sequence length and codebook size come from that tokenizer, not from the
  named size (MAGE-B's 256 ids of 1024 codes are the official tokenizer's at 256 px);
- `weight_decay_groups`: MAGE's AdamW recipe decays every weight but biases and 1-D parameters
  (norms), as timm's `add_weight_decay` in the reference;
- the token id cache: with MAGE's fixed-per-image augmentation (resize and centre crop, paper
  section 3.3; here square images and an optional flip) an image's ids never change, so the
  tokenizer stage encodes the train split once (both views with the flip) into
  `<tokenizer>/ids.parquet` (`write_token_ids`), and training looks a batch's ids up there
  (`TokenCache`, an rcg.views.ViewCache) instead of running the tokenizer on every batch.

ids.parquet: one row per image and view, rows in loader order.
  key   string                        the sample's WebDataset key
  view  string                        "orig" or "flip" (the horizontally flipped image)
  ids   fixed_size_list<int16|int32>  the T token ids, row-major over the token grid
with the schema metadata `rcg` (JSON): the tokenizer's weights digest (`tokenizer_digest`), the
token count, the codebook size and the views; a file of another tokenizer is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from rcg.io import PipelineError, atomic_path, file_digest
from rcg.views import VIEWS, ViewCache

log = logging.getLogger(__name__)

IDS_FILE = "ids.parquet"  # the train split's token ids, written by the tokenizer stage beside its weights
# Share of a batch's ids that may differ from the cache's: exact equality is expected, but a
# different batch size can move a float near a tie between two codes (a cuDNN algorithm choice); a
# stale file or a per-step crop changes most ids.
NEAR_TIES = 1e-3


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


def fixed_crop_reason(rep_source: str) -> str | None:
    """Why a training crop is not fixed per image (so cached ids cannot be exact), or None when it is.
    `train_generator.rep_source: cache` is the config's statement that the only per-step augmentation
    is the flip (square images at data.image_size); `encoder` is set for random crops (ImageNet)."""
    if rep_source == "cache":
        return None
    return (f"train_generator.rep_source is {rep_source!r}: the training crops are random (drawn per step), so "
            "an image's ids are not fixed")


def write_token_ids(path: str | Path, keys: list[str], views: list[str], ids: Tensor, digest: str,
                    codebook_size: int) -> None:
    """Write the ids file (module docstring) atomically; a PipelineError on a repeated (key, view)."""
    if len(set(zip(keys, views))) != len(keys):
        raise PipelineError(f"{path}: the train split repeats a sample key; every image needs its own ids")
    n, t = ids.shape
    array = ids.numpy().astype(np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32).reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(array), t)
    table = pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(views, pa.string()), column],
                                 names=["key", "view", "ids"])
    meta = {"tokenizer_digest": digest, "num_tokens": t, "codebook_size": codebook_size,
            "views": [v for v in VIEWS if v in set(views)]}
    table = table.replace_schema_metadata({"rcg": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class TokenCache(ViewCache):
    """The tokenizer stage's ids file read back for training (module docstring): a batch's ids
    [B, T] (int64) by key and flip flag; refused when another tokenizer wrote it."""

    def __init__(self, path: str | Path, digest: str) -> None:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: no token ids (rerun `rcg tokenizer`)")
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"rcg", b"{}"))
        if meta.get("tokenizer_digest") != digest:
            raise PipelineError(f"{path}: token ids of another tokenizer (weights digest "
                                f"{meta.get('tokenizer_digest')}, the tokenizer's is {digest}); rerun `rcg tokenizer` "
                                "or `dvc repro tokenizer` to rewrite them")
        column = table["ids"].combine_chunks()
        values = torch.from_numpy(column.values.to_numpy().reshape(len(table), column.type.list_size).copy())
        super().__init__(table["key"].to_pylist(), table["view"].to_pylist(), values, path, "token ids",
                         "rerun `rcg tokenizer`")
        self.digest = digest

    def lookup(self, keys: list[str], flipped: Tensor) -> Tensor:
        return super().lookup(keys, flipped).long()

    def verify(self, cached: Tensor, codec: TokenCodec, images: Tensor) -> int:
        """How many of `cached` differ from `codec.encode(images)` (the crops they stand for); a
        PipelineError past `NEAR_TIES` of them: the file is stale or the crops change per step."""
        fresh = codec.encode(images)
        diff = int((fresh != cached.to(fresh.device)).sum())
        if diff > NEAR_TIES * fresh.numel():
            raise PipelineError(
                f"{self.path}: {diff} of the first batch's {fresh.numel()} cached token ids differ from the "
                "tokenizer's; the file is stale or the training crops are not fixed per image. Rerun "
                "`rcg tokenizer`, or set tokenizer.cache_ids=false to tokenize every batch")
        return diff


__all__ = ["IDS_FILE", "NEAR_TIES", "TokenCache", "TokenCodec", "fixed_crop_reason",
           "mage_kwargs", "tokenizer_digest", "weight_decay_groups", "write_token_ids"]
