"""Strict loaders for official SSL checkpoints (docs/paper.md#encoder-checkpoints).

Each format is a pure function from the loaded file to the state dict of our `build_vit` model:

- MoCo v3 `.pth.tar`: `state_dict`, keep `module.base_encoder.*` (prefix stripped), drop the momentum
  encoder and predictor, fix the released ViT-L's misnamed keys in blocks 13 and 14.
- DINO / iBOT: the `teacher` weights, `backbone.` stripped, the weight-normalised last layer(s) of the
  head dropped (the representation is the 256-d bottleneck before them).
- DeiT: `model`.

Loading is strict: any missing, unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcg.encoders.vit import EncoderSpec, RepEncoder
from rcg.io import PipelineError, weights_only_reason

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# The released MoCo v3 ViT-L checkpoint names four keys wrongly (docs/paper.md#encoder-checkpoints).
VIT_L_KEY_FIXES = {
    "blocks.13.norm13.": "blocks.13.norm1.",
    "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
    "blocks.14.norm14.": "blocks.14.norm2.",
    "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2.",
}


def _section(ckpt: Any, key: str, fmt: str) -> StateDict:
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise PipelineError(f"not a {fmt} checkpoint: expected a top-level {key!r} entry, found {found}")
    return dict(ckpt[key])


def convert_mocov3(ckpt: Any) -> StateDict:
    """MoCo v3 `.pth.tar` -> base-encoder state dict (momentum encoder and predictor dropped)."""
    prefix = "module.base_encoder."
    out: StateDict = {}
    for k, v in _section(ckpt, "state_dict", "MoCo v3").items():
        if not k.startswith(prefix):
            continue  # module.momentum_encoder.*, module.predictor.*
        name = k[len(prefix):]
        for bad, good in VIT_L_KEY_FIXES.items():
            name = name.replace(bad, good)
        out[name] = v
    if not out:
        raise PipelineError(f"MoCo v3 checkpoint has no {prefix!r} keys")
    return out


def _convert_teacher(ckpt: Any, fmt: str) -> StateDict:
    out: StateDict = {}
    for k, v in _section(ckpt, "teacher", fmt).items():
        # DDP-saved teachers carry `module.`; the backbone is under `backbone.`.
        k = k.removeprefix("module.")
        k = k.removeprefix("backbone.")
        # The weight-normalised prototype layer(s) after the bottleneck are not part of the
        # representation: DINO's head.last_layer, iBOT's head.last_layer and head.last_layer2.
        if k.startswith("head.last_layer"):
            continue
        out[k] = v
    return out


def convert_dino(ckpt: Any) -> StateDict:
    """DINO full checkpoint -> teacher backbone + head MLP."""
    return _convert_teacher(ckpt, "DINO")


def convert_ibot(ckpt: Any) -> StateDict:
    """iBOT full checkpoint -> teacher backbone + head MLP."""
    return _convert_teacher(ckpt, "iBOT")


def convert_deit(ckpt: Any) -> StateDict:
    """DeiT checkpoint -> its `model` state dict (classifier head included)."""
    return _section(ckpt, "model", "DeiT")


CONVERTERS: dict[str, Callable[[Any], StateDict]] = {
    "mocov3": convert_mocov3,
    "dino": convert_dino,
    "ibot": convert_ibot,
    "deit": convert_deit,
}


def load_strict(module: nn.Module, state: StateDict, source: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists every missing/unexpected/mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not match the encoder architecture"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
        raise PipelineError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def read_checkpoint(path: str | Path) -> Any:
    """torch.load an official checkpoint on CPU, unpickling only tensors and plain data.

    The official files also hold an argparse Namespace (`args`); it is allowed explicitly.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: encoder checkpoint not found")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code or other classes, or a broken file
            raise PipelineError(
                f"{path}: cannot read as a weights-only torch checkpoint ({weights_only_reason(e)}); "
                "nothing in it was run. If you trust the file, re-save its tensors with torch.save "
                "(as a plain dict)."
            ) from None


def load_checkpoint(path: str | Path, fmt: str, spec: EncoderSpec) -> RepEncoder:
    """Read an official checkpoint of format `fmt`, convert it and load it strictly into `spec`."""
    if fmt not in CONVERTERS:
        raise PipelineError(f"encoder.checkpoint_format: expected one of {sorted(CONVERTERS)}, got {fmt!r}")
    state = CONVERTERS[fmt](read_checkpoint(path))
    enc = RepEncoder(spec)
    load_strict(enc.vit, state, source=f"{path} ({fmt})")
    log.info("loaded %s checkpoint %s (%d tensors)", fmt, path, len(state))
    return enc.freeze()


__all__ = [
    "CONVERTERS", "VIT_L_KEY_FIXES", "convert_deit", "convert_dino", "convert_ibot",
    "convert_mocov3", "load_checkpoint", "load_strict", "read_checkpoint", "weights_only_reason",
]
