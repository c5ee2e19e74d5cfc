"""Building blocks shared by RCG's networks: the RDM, the image generators and the SSL encoder.

- `timestep_embedding`: the sinusoid of the diffusion timestep that the RDM (docs/paper.md#rdm-network)
  and the DiT / U-Net conditioning (docs/paper.md#image-generators) both feed to a small MLP.
- `sincos_pos_embed_2d`: the fixed 2-D sin-cos position embedding of the DiT's patches and of the
  MoCo v3 ViT's (docs/paper.md#representation).
- `zero_module`: the zero initialisation of the layers that make a residual branch start as the
  identity (ADM, DiT's adaLN-Zero, the RDM's blocks).
- `lookup_arch`: reads every registry of named model sizes (one dict NAME -> constructor kwargs per
  model family), with one error message for an unknown name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from rcg.io import PipelineError

M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)), of
    (possibly fractional) timesteps t [N] -> [N, dim] float32.

    Cos first, as in the reference RDM (docs/paper.md#rdm-network) and in DiT; an odd `dim` gets a zero last
    channel.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(grid: int, dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a grid x grid patch grid: [grid*grid, dim] float32.

    Patches in row-major order (as a patch projection flattens them); a quarter of the channels each
    for sin(w), cos(w), sin(h), cos(h) of the column w and row h, frequencies 1 / 10000^(k / (dim/4))
    (MAE, DiT, MoCo v3). `dtype` is the precision the sinusoids are computed in before the cast to
    float32: float64 as DiT's numpy code, float32 as MoCo v3's torch code; the two differ in the last
    bit, so each model keeps its reference's.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=dtype)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) row and column indices
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=dtype) / quarter))  # (dim/4,)
    out_w = gw.flatten()[:, None] * omega[None]  # (grid^2, dim/4)
    out_h = gh.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1).float()  # (grid^2, dim)


def zero_module(module: M) -> M:
    """Set every parameter of `module` to zero (in place) and return it.

    Zero fills draw nothing from the random generator, so where they happen does not change any
    other layer's initial weights.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def lookup_arch(table: Mapping[str, T], name: str, what: str, key: str = "") -> T:
    """`table[name]`, or a PipelineError naming what was asked for (`what`, and the config `key` it
    came from, if given) and the known names.

    Every model family keeps its named sizes in one dict, name -> constructor kwargs
    (`rcg.rdm.RDM_ARCHS`, `rcg.generators.dit.DIT_ARCHS`, `rcg.generators.unet.UNET_ARCHS`,
    `rcg.encoders.vit.ENCODER_ARCHS`), read through this one function by its `build_<family>`.
    """
    if name not in table:
        where = f"{key}: " if key else ""
        raise PipelineError(f"{where}unknown {what} {name!r} (known: {', '.join(table)})")
    return table[name]
