"""The two augmented views of MoCo v3, applied to a whole batch at once.

MoCo v3 (following BYOL) draws two views with random resized crop, horizontal flip, colour jitter,
grayscale, Gaussian blur (always on view 1, rarely on view 2) and solarisation (view 2 only).
Per-sample PIL transforms cost more than the tiny CPU encoder itself, so the same recipe runs
here on the batch tensor: one `affine_grid`/`grid_sample` for crop + flip, then vectorised
photometric changes. Colour changes that need colour (saturation, grayscale) apply to RGB only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewRecipe:
    """Probabilities and strengths of one view's augmentations (MoCo v3 defaults, scaled by config)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view (MoCo v3: of a 224 crop)
    solarize_p: float = 0.0


def two_view_recipes(crop_min_scale: float, blur_p: float, solarize_p: float, jitter: float,
                     blur_sigma: tuple[float, float] = (0.1, 2.0)) -> tuple[ViewRecipe, ViewRecipe]:
    """MoCo v3's asymmetric pair: view 1 always blurred, view 2 rarely blurred and sometimes solarised."""
    common = dict(crop_scale=(crop_min_scale, 1.0), brightness=jitter, contrast=jitter,
                  saturation=jitter / 2, blur_sigma=(float(blur_sigma[0]), float(blur_sigma[1])))
    return (ViewRecipe(blur_p=blur_p, solarize_p=0.0, **common),
            ViewRecipe(blur_p=blur_p * 0.1, solarize_p=solarize_p, **common))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def random_resized_crop(x: torch.Tensor, size: int, recipe: ViewRecipe,
                        g: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of the given area/aspect range, resized to `size`, with random flip."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *recipe.crop_scale, g, dev)
    log_r = _uniform(b, math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]), g, dev)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width kept
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (_uniform(b, -1.0, 1.0, g, dev)) * (1.0 - w)  # centre in normalised [-1, 1] coordinates
    cy = (_uniform(b, -1.0, 1.0, g, dev)) * (1.0 - h)
    flip = torch.where(torch.rand(b, generator=g, device=dev) < recipe.flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (in pixels)."""
    b, c, hgt, wid = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, (min(hgt, wid) - 1) // 2)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, K)
    kk = k.repeat_interleave(c, 0)  # one kernel per (sample, channel) for a grouped conv
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kk[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def augment(x: torch.Tensor, size: int, recipe: ViewRecipe,
            g: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of a batch in [0, 1]: [B, C, H, W] -> [B, C, size, size] in [0, 1]."""
    b, dev = x.shape[0], x.device
    y = random_resized_crop(x, size, recipe, g)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=g, device=dev) < p).view(b, 1, 1, 1)

    # Colour jitter (brightness, contrast, saturation), applied with probability jitter_p.
    jit = coin(recipe.jitter_p)
    bright = _uniform(b, 1 - recipe.brightness, 1 + recipe.brightness, g, dev).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - recipe.contrast, 1 + recipe.contrast, g, dev).view(b, 1, 1, 1)
    z = (y * bright).clamp(0, 1)
    mean = _gray(z).mean(dim=(1, 2, 3), keepdim=True)
    z = ((z - mean) * contrast + mean).clamp(0, 1)
    if y.shape[1] == 3:
        sat = _uniform(b, 1 - recipe.saturation, 1 + recipe.saturation, g, dev).view(b, 1, 1, 1)
        z = ((z - _gray(z)) * sat + _gray(z)).clamp(0, 1)
        y = torch.where(jit, z, y)
        y = torch.where(coin(recipe.gray_p), _gray(y).expand_as(y), y)
    else:
        y = torch.where(jit, z, y)
    # Gaussian blur, sigma in pixels of the output view (not rescaled from 224 px: at 28 px that
    # leaves sigma <= 0.25 px, which blurs nothing; see encoder.blur_sigma).
    blur = coin(recipe.blur_p)
    if blur.any():
        sigma = _uniform(b, *recipe.blur_sigma, g, dev)
        y = torch.where(blur, _gaussian_blur(y, sigma.clamp(min=1e-3)), y)
    if recipe.solarize_p > 0:
        y = torch.where(coin(recipe.solarize_p) & (y >= 0.5), 1.0 - y, y)
    return y


__all__ = ["ViewRecipe", "augment", "random_resized_crop", "two_view_recipes"]
