"""Image generators of RCG (DESIGN.md step 3): a registry of architectures, saving and loading.

``REGISTRY`` maps an architecture name to a constructor taking the model kwargs (``input_size``,
``in_channels``, ``condition``, ``rep_dim``, ``num_classes``, ``rep_drop_prob``). DiT sizes follow the
DiT paper ('DiT-S/2' ... 'DiT-XL/8'); the small presets ('dit_tiny', 'dit_fmnist', 'unet_tiny',
'unet_fmnist') are sized for tests and for Fashion-MNIST on a CPU.

A trained generator lives in ``<model_dir>/generator.safetensors`` (EMA weights) beside
``generator.json`` (architecture, kwargs, diffusion schedule, codec = pixel or VAE, data shape), and
``load_generator(model_dir)`` rebuilds (model, diffusion, meta) from those two files alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rcg.diffusion import Diffusion, make_betas
from rcg.generators.dit import DiT, dit_constructors
from rcg.generators.unet import unet_constructors
from rcg.io import PipelineError, atomic_path, read_json, write_json

REGISTRY: dict[str, Callable[..., nn.Module]] = {**dit_constructors(), **unet_constructors()}

WEIGHTS, META = "generator.safetensors", "generator.json"


def build_generator(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate registry entry `arch` with model kwargs (see the module docstring)."""
    if arch not in REGISTRY:
        raise PipelineError(f"generator arch {arch!r} is not in the registry (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[arch](**kwargs)


def make_diffusion(meta_diffusion: dict[str, Any]) -> Diffusion:
    """The generator's Diffusion from the `diffusion` entry of generator.json."""
    betas = make_betas(
        meta_diffusion["beta_schedule"],
        int(meta_diffusion["timesteps"]),
        meta_diffusion.get("linear_start"),
        meta_diffusion.get("linear_end"),
    )
    return Diffusion(betas, meta_diffusion.get("parameterization", "eps"))


def save_generator(model_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write `generator.safetensors` (weights) and `generator.json` (meta) atomically."""
    model_dir = Path(model_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"arch": str(meta.get("arch", ""))})
    write_json(model_dir / META, meta)


def load_generator(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Diffusion, dict[str, Any]]:
    """Rebuild a trained generator: (model in eval mode, its Diffusion, the generator.json meta)."""
    model_dir = Path(model_dir)
    if not (model_dir / META).exists() or not (model_dir / WEIGHTS).exists():
        raise PipelineError(f"{model_dir}: no {WEIGHTS} + {META} (run `rcg train-generator` first)")
    meta = read_json(model_dir / META)
    try:
        model = build_generator(meta["arch"], **meta["kwargs"])
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
    return model, make_diffusion(meta["diffusion"]), meta


__all__ = ["REGISTRY", "DiT", "build_generator", "load_generator", "save_generator", "make_diffusion"]
