"""Image generators of RCG (method step 3, docs/design.md): a registry of architectures, saving, loading.

Each family keeps its named sizes in one dict, name -> constructor kwargs (``DIT_ARCHS``,
``UNET_ARCHS``, ``MAGE_ARCHS``), built by ``build_dit`` / ``build_unet`` / ``build_mage``;
``build_generator(arch, **kwargs)`` picks the family by name, and ``REGISTRY`` maps every name to its
constructor. The diffusion generators' kwargs are ``input_size``, ``in_channels``, ``condition``,
``rep_dim``, ``num_classes``, ``rep_drop_prob``; MAGE's take ``num_tokens`` and ``codebook_size`` (from
its tokenizer) in place of the first two. DiT sizes follow the DiT paper ('DiT-S/2' ... 'DiT-XL/8'),
MAGE's the MAGE paper ('MAGE-B', 'MAGE-L'); the small presets ('dit_tiny', 'dit_fmnist', 'unet_tiny',
'unet_fmnist', 'mage_tiny', 'mage_fmnist') are sized for tests and for Fashion-MNIST on a CPU.
``arch_kind(arch)`` says what an arch generates: ``diffusion`` (pixels or VAE latents) or ``tokens``.

A trained generator lives in ``<model_dir>/generator.safetensors`` (EMA weights, or the trained ones
for a recipe without EMA) beside ``generator.json`` (architecture, kwargs, diffusion schedule for
the diffusion kinds, codec = pixel, VAE or tokenizer, data shape), and ``load_generator(model_dir)``
rebuilds (model, diffusion or None, meta) from those two files alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rcg.diffusion import Diffusion
from rcg.generators.dit import DIT_ARCHS, DiT, build_dit
from rcg.generators.mage import MAGE_ARCHS, build_mage
from rcg.generators.unet import UNET_ARCHS, build_unet
from rcg.io import PipelineError, atomic_path, read_json, write_json
from rcg.layers import lookup_arch

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(build_dit, name) for name in DIT_ARCHS},
    **{name: functools.partial(build_unet, name) for name in UNET_ARCHS},
    **{name: functools.partial(build_mage, name) for name in MAGE_ARCHS},
}

WEIGHTS, META = "generator.safetensors", "generator.json"


def arch_kind(arch: str) -> str:
    """`tokens` for MAGE (token ids of a VQ tokenizer), `diffusion` for the DiT and U-Net sizes."""
    lookup_arch(REGISTRY, arch, "generator arch")  # an unknown name is an error here too
    return "tokens" if arch in MAGE_ARCHS else "diffusion"


def build_generator(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate registry entry `arch` with model kwargs (see the module docstring)."""
    return lookup_arch(REGISTRY, arch, "generator arch")(**kwargs)


def save_generator(model_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write `generator.safetensors` (weights) and `generator.json` (meta) atomically."""
    model_dir = Path(model_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"arch": str(meta.get("arch", ""))})
    write_json(model_dir / META, meta)


def load_generator(model_dir: str | Path,
                   device: torch.device | str = "cpu") -> tuple[nn.Module, Diffusion | None, dict[str, Any]]:
    """Rebuild a trained generator: (model in eval mode, its Diffusion or None for a token
    generator, the generator.json meta)."""
    model_dir = Path(model_dir)
    if not (model_dir / META).exists() or not (model_dir / WEIGHTS).exists():
        raise PipelineError(f"{model_dir}: no {WEIGHTS} + {META} (run `rcg train-generator` first)")
    meta = read_json(model_dir / META)
    try:
        model = build_generator(meta["arch"], **meta["kwargs"])
        diffusion = None if arch_kind(meta["arch"]) == "tokens" else Diffusion.from_meta(meta["diffusion"])
    except KeyError as e:
        raise PipelineError(f"{model_dir / META}: missing key {e}") from None
    state = load_file(str(model_dir / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(
            f"{model_dir / WEIGHTS}: weights do not match {meta['arch']} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.to(device).eval().requires_grad_(False)
    return model, diffusion, meta


__all__ = [
    "DIT_ARCHS", "MAGE_ARCHS", "REGISTRY", "UNET_ARCHS", "DiT", "arch_kind", "build_dit", "build_generator",
    "build_mage", "build_unet", "load_generator", "save_generator",
]
