"""Strict loading of the official MaskGIT VQGAN checkpoint MAGE uses (`vqgan_jax_strongaug.ckpt`).

The file is a torch pickle of the tokenizer's state dict (the reference loads it with `torch.load`,
takes its `state_dict` entry when there is one, and loads it strictly): `encoder.*`, `decoder.*` and
`quantize.embedding.weight`, under the names rcg.tokenizers.vqgan's modules carry, so no renaming is
needed. Here it is read weights-only (tensors and plain data; a pickle that would run code is refused
before anything in it runs), and every missing, unexpected or mis-shaped key is listed in one error
naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcg.io import PipelineError, weights_only_reason
from rcg.tokenizers.vqgan import VQGAN, build_vqgan

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

OFFICIAL_ARCH = "maskgit_f16"  # the size of vqgan_jax_strongaug.ckpt


def read_official(path: str | Path) -> StateDict:
    """The tensors of an official tokenizer file (a bare state dict, or one under `state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: tokenizer checkpoint not found (tokenizer.checkpoint)")
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code or foreign classes, or a damaged file
        raise PipelineError(
            f"{path}: cannot read as a weights-only torch checkpoint ({weights_only_reason(e)}); nothing in "
            "it was run. If you trust the file, re-save its state dict with torch.save (as a plain dict)."
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in ckpt.items()):
        raise PipelineError(f"{path}: not a tokenizer state dict (expected a dict of tensors, or one "
                            f"under 'state_dict'; found {type(ckpt).__name__})")
    return dict(ckpt)


def layout_problems(model: nn.Module, state: StateDict) -> list[str]:
    """Every way `state` does not fit `model` strictly, one line per kind (empty when it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    out = []
    if missing:
        out.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        out.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        out.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
    return out


def load_state_strict(model: VQGAN, state: StateDict, source: str, arch: str) -> VQGAN:
    """Load `state` into `model` if every key and shape matches; else one error listing them all."""
    problems = layout_problems(model, state)
    if problems:
        raise PipelineError("\n  ".join([f"{source}: does not match the {arch} tokenizer (tokenizer.arch)",
                                         *problems]))
    model.load_state_dict(state, strict=True)
    return model


def load_official(path: str | Path, arch: str = OFFICIAL_ARCH, image_size: int = 256,
                  in_channels: int = 3) -> VQGAN:
    """The official tokenizer file at `path`, loaded strictly into the `arch` network, frozen."""
    model = build_vqgan(arch, in_channels=in_channels, image_size=image_size)
    load_state_strict(model, read_official(path), str(path), arch)
    log.info("tokenizer: loaded %s into %s (%d tensors)", path, arch, len(model.state_dict()))
    return model.freeze()


def official_tokenizer(path: str | Path, arch: str, image_size: int, channels: int) -> tuple[VQGAN, dict[str, Any]]:
    """The official checkpoint at `path` (`tokenizer.checkpoint`) for images of `channels` x
    `image_size`, and its provenance (file and digest)."""
    from rcg.io import file_digest

    vq = load_official(path, arch, image_size=image_size, in_channels=3)
    if channels != vq.in_channels:
        raise PipelineError(f"tokenizer.checkpoint: {path} tokenizes {vq.in_channels}-channel images, "
                            f"but data.channels is {channels}")
    return vq, {"source": "checkpoint", "file": str(path), "sha256_12": file_digest(path)}


__all__ = ["OFFICIAL_ARCH", "layout_problems", "load_official", "load_state_strict", "official_tokenizer",
           "read_official"]
