"""The image generator's sampler (paper section 3): guidance, seeded batches, saved settings, files.

`sample_images` draws images from any diffusion generator network in batches, `sample_tokens` from
a MAGE by its iterative decoding; `rcg.generation` wraps them in the loaded generator objects every
caller uses (`rcg generate`, `rcg evaluate`, the MLflow model).

Guidance (``cfg_scale`` w > 0) mixes ``cond + w (cond - uncond)`` with the learned ``fake_latent``
(or null class) as the negative; ``cfg_schedule="linear"`` grows w linearly from ~0 at the first
(noisiest) step to w at the last, the diffusion analogue of the reference MAGE's ``cfg (s+1)/N``
(docs/paper.md#guidance); ``constant`` uses w throughout (the reference DiT). Also here: reading an image
file the way the shards are read (the input of paper Fig. 6 / Fig. 7), PNG files and grids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.diffusion import Diffusion, ddim_sample, ddpm_sample
from rcg.generators.vae import Codec
from rcg.io import PipelineError, atomic_path
from rcg.training import autocast


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The noise stream of batch `batch` of a `sample_images` call with `seed` (CPU, any device)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch)


class GuidedDenoiser:
    """The `model(x, t, **cond)` callable the samplers use: autocast, float32 out, optional guidance."""

    def __init__(self, model: nn.Module, num_timesteps: int, cfg_scale: float = 0.0,
                 cfg_schedule: str = "linear", amp: bool = True) -> None:
        if cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")
        self.model, self.T, self.cfg_scale, self.schedule, self.amp = model, num_timesteps, cfg_scale, cfg_schedule, amp

    def scale_at(self, t: Tensor) -> Tensor:
        """Guidance weight per sample: constant w, or w (T - t) / T (linear in the denoising progress)."""
        w = torch.full(t.shape, float(self.cfg_scale), dtype=torch.float32, device=t.device)
        if self.schedule == "linear":
            w = w * (self.T - t.float()) / self.T
        return w

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        device = x.device
        with autocast(device, self.amp and device.type in ("cpu", "cuda")):
            if self.cfg_scale > 0 and getattr(self.model, "condition", "none") != "none":
                out = self.model.forward_with_cfg(x, t, self.scale_at(t), **cond)
            else:
                out = self.model(x, t, **cond)
        return out.float()


@torch.no_grad()
def sample_images(
    model: nn.Module,
    diffusion: Diffusion,
    codec: Codec,
    n: int,
    cond: dict[str, Tensor] | None = None,
    *,
    shape: tuple[int, int, int],
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    cfg_scale: float = 0.0,
    cfg_schedule: str = "linear",
    seed: int = 0,
    amp: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 250,
    progress: bool = True,
    x_T: Tensor | None = None,
    clip_x0: float = 0.0,
) -> Tensor:
    """n images [n, C, H, W] in [0, 1] from a generator, in batches; `cond` tensors have n rows.

    Batch b draws its noise from `batch_generator(seed, b)`, so a given (seed, batch_size) is reproducible.
    `x_T` (n, *shape) fixes the starting noise (interpolations share it across rows).
    `clip_x0` > 0 clamps each step's x0 estimate to [-clip_x0, clip_x0] (ADM's clip_denoised; only
    meaningful in pixel space, where the data range is known).
    """
    device = torch.device(device)
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    denoiser = GuidedDenoiser(model, diffusion.num_timesteps, cfg_scale, cfg_schedule, amp)
    clip = clip_x0 if clip_x0 > 0 else None
    out = []
    for b, i, j, kw, single in _batches(n, cond, batch_size, progress, device):
        g = batch_generator(seed, b)
        xt = None if x_T is None else x_T[i:j]
        if sampler == "ddim":
            z = ddim_sample(denoiser, diffusion, (j - i, *shape), steps, eta=eta, model_kwargs=kw, generator=g,
                            device=device, progress=progress and single, x_T=xt, clip_x0=clip)
        else:
            z = ddpm_sample(denoiser, diffusion, (j - i, *shape), steps, model_kwargs=kw, generator=g,
                            device=device, progress=progress and single, x_T=xt, clip_x0=clip)
        out.append(codec.decode(z).cpu())
    return torch.cat(out) if out else torch.zeros(0, *shape)


def _batches(n: int, cond: dict[str, Tensor] | None, batch_size: int, progress: bool,
             device: torch.device) -> Iterator[tuple[int, int, int, dict[str, Tensor], bool]]:
    """(batch index, start, end, its condition rows on `device`, whether it is the only batch) for
    n samples in batches; a progress bar over the batches when there are several."""
    cond = cond or {}
    for k, v in cond.items():
        if v.shape[0] != n:
            raise ValueError(f"condition {k!r} has {v.shape[0]} rows, expected {n}")
    starts: Iterable[int] = range(0, n, batch_size)
    single = len(starts) <= 1
    if progress and not single:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for b, i in enumerate(starts):
        j = min(n, i + batch_size)
        yield b, i, j, {k: v[i:j].to(device) for k, v in cond.items()}, single


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    codec: Codec,
    n: int,
    cond: dict[str, Tensor] | None = None,
    *,
    steps: int = 20,
    choice_temperature: float = 6.0,
    cfg_scale: float = 0.0,
    cfg_schedule: str = "linear",
    seed: int = 0,
    amp: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 250,
    progress: bool = True,
) -> Tensor:
    """n images [n, C, H, W] in [0, 1] from a MAGE (paper section 3.3): `steps` iterations of its
    parallel decoding, re-masking temperature `choice_temperature`, guidance `cfg_scale` on the
    logits (0: none), then the tokenizer's decoder. Batch b draws its decoding noise from
    `batch_generator(seed, b)`, as `sample_images` draws its starting noise."""
    device = torch.device(device)
    out = []
    for b, i, j, kw, _ in _batches(n, cond, batch_size, progress, device):
        with autocast(device, amp and device.type in ("cpu", "cuda")):
            ids = model.generate(j - i, **kw, num_iter=steps, choice_temperature=choice_temperature, cfg=cfg_scale,
                                 cfg_schedule=cfg_schedule, generator=batch_generator(seed, b))  # (B, T)
        out.append(codec.decode(ids).cpu())
    return torch.cat(out)


def saved_sampling(meta: dict[str, Any], steps: int | None = None) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The shape the sampler draws and the sampler settings a generator was saved with (its
    `generator.json`, written by train_generator), `steps` overriding the saved step count. A
    diffusion generator draws [C, H, W] (sampler, steps, eta, amp, clip_x0); a MAGE draws [T]
    token ids (steps = decoding iterations, choice_temperature, amp)."""
    saved = meta.get("sampling", {})
    if meta.get("codec", {}).get("type") == "tokens":
        return (int(meta["kwargs"]["num_tokens"]),), {
            "steps": int(steps or saved.get("steps", 20)), "amp": bool(saved.get("amp", True)),
            "choice_temperature": float(saved.get("choice_temperature", 6.0)),
        }
    size = meta["kwargs"]["input_size"]
    return (meta["kwargs"]["in_channels"], size, size), {
        "steps": int(steps or saved.get("steps", 50)), "sampler": saved.get("sampler", "ddim"),
        "eta": float(saved.get("eta", 0.0)), "amp": bool(saved.get("amp", True)),
        "clip_x0": float(saved.get("clip_x0", 0.0)),
    }


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path, channels: int, image_size: int) -> Tensor:
    """An image file -> [channels, image_size, image_size] in [0, 1], prepared as the shards are read."""
    from rcg.data.images import decode, resize_crop, to_tensor

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: image not found")
    try:
        img = decode(path.read_bytes(), channels)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read image ({e})") from None
    return to_tensor(resize_crop(img, image_size))


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, upscale: int = 0) -> Path:
    """A PNG grid of images in [0, 1]; small images are upscaled (nearest) so a person can see them."""
    from torchvision.utils import save_image

    path = Path(path)
    if images.shape[0] == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    if upscale == 0:
        upscale = max(1, 96 // images.shape[-1])
    if upscale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=upscale, mode="nearest")
    with atomic_path(path) as tmp:
        save_image(images.float().clamp(0, 1), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")
    return path


def save_pngs(images: Tensor, folder: str | Path, prefix: str = "", start: int = 0) -> list[Path]:
    """One lossless PNG per image, named {prefix}{start + index:05d}.png. Float images are truncated to
    uint8 as the reference does; uint8 images are written as they are."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    u8 = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).to(torch.uint8)
    for i, a in enumerate(u8.permute(0, 2, 3, 1).cpu().numpy()):
        p = folder / f"{prefix}{start + i:05d}.png"
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        with atomic_path(p) as tmp:
            img.save(tmp, format="PNG")
        paths.append(p)
    return paths


class SampleWriter:
    """Generated images written as they come (evaluate.save_samples): PNGs and/or an ADM-format
    `samples.npz` (`arr_0`: uint8 [N, H, W, C], the array ADM's evaluator reads), streamed into the
    zip file batch by batch so memory never holds more than one batch."""

    def __init__(self, folder: str | Path, n: int, shape: tuple[int, int, int], png: bool, npz: bool) -> None:
        import zipfile

        import numpy as np

        self.folder, self.png, self.count, self.n = Path(folder), png, 0, n
        self.folder.mkdir(parents=True, exist_ok=True)
        self._zip = self._npy = None
        if npz:
            c, h, w = shape
            self._path = self.folder / "samples.npz"
            self._tmp = self.folder / ".samples.npz.tmp"
            self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
            self._npy = self._zip.open("arr_0.npy", "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (n, h, w, c)}
            np.lib.format.write_array_header_2_0(self._npy, header)

    def add(self, images: Tensor) -> None:
        """uint8 [B, C, H, W] images, in generation order."""
        if self.png:
            save_pngs(images, self.folder, start=self.count)
        if self._npy is not None:
            self._npy.write(images.permute(0, 2, 3, 1).contiguous().cpu().numpy().tobytes())
        self.count += len(images)

    def close(self) -> None:
        """Finish the npz (renamed into place only when it holds all n images)."""
        if self._npy is not None:
            self._npy.close()
            self._zip.close()
            if self.count != self.n:
                raise ValueError(f"{self._path}: {self.count} images written, {self.n} announced")
            self._tmp.replace(self._path)
