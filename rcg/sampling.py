"""RCG generation (DESIGN.md step 4): RDM samples -> image generator, with optional guidance.

Modes of `generate_images` (the evaluation table's rows):
- ``uncond``: the unconditional baseline generator (models/generator/none);
- ``label``: the class-label baseline (models/generator/label) for the given class ids;
- ``rcg``: RDM samples (models/rdm/rdm) -> the representation-conditioned generator (models/generator/rep);
- ``rcg_class``: the class-conditional RDM's samples for the given classes -> the same generator
  (the paper: class-conditional generation needs only a class-conditional RDM);
- ``oracle``: representations given by the caller (e.g. of real images; paper Table 9a).

Guidance (``cfg_scale`` w > 0) mixes ``cond + w (cond - uncond)`` with the learned ``fake_latent``
(or null class) as the negative; ``cfg_schedule="linear"`` grows w linearly from ~0 at the first
(noisiest) step to w at the last, the diffusion analogue of the reference MAGE's ``cfg (s+1)/N``
(REFERENCE.md 3.1); ``constant`` uses w throughout (the reference DiT). Also here: conditioning on
given images (paper Fig. 6), interpolation between two images' representations (Fig. 7), grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.config import Config
from rcg.diffusion import Diffusion, ddim_sample, ddpm_sample
from rcg.generators import load_generator
from rcg.generators.vae import Codec, make_codec
from rcg.io import PipelineError, atomic_path, get_logger
from rcg.training import autocast

log = get_logger(__name__)

MODES = ("uncond", "label", "rcg", "rcg_cfg", "rcg_class", "oracle")
CONDITION_OF = {"uncond": "none", "label": "label", "rcg": "rep", "rcg_cfg": "rep", "rcg_class": "rep", "oracle": "rep"}


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
    cond = cond or {}
    for k, v in cond.items():
        if v.shape[0] != n:
            raise ValueError(f"condition {k!r} has {v.shape[0]} rows, expected {n}")
    denoiser = GuidedDenoiser(model, diffusion.num_timesteps, cfg_scale, cfg_schedule, amp)
    clip = clip_x0 if clip_x0 > 0 else None
    out = []
    starts = range(0, n, batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for b, i in enumerate(starts):
        j = min(n, i + batch_size)
        kw = {k: v[i:j].to(device) for k, v in cond.items()}
        g = batch_generator(seed, b)
        xt = None if x_T is None else x_T[i:j]
        if sampler == "ddim":
            z = ddim_sample(denoiser, diffusion, (j - i, *shape), steps, eta=eta, model_kwargs=kw, generator=g,
                            device=device, progress=progress and len(starts) == 1, x_T=xt, clip_x0=clip)
        elif sampler == "ddpm":
            z = ddpm_sample(denoiser, diffusion, (j - i, *shape), steps, model_kwargs=kw, generator=g,
                            device=device, progress=progress and len(starts) == 1, x_T=xt, clip_x0=clip)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        out.append(codec.decode(z).cpu())
    return torch.cat(out) if out else torch.zeros(0, *shape)


# --------------------------------------------------------------------------------------------------
# Loading (cached: evaluation calls generate_images once per mode)
# --------------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, ...], Any] = {}


def _stamp(path: Path) -> str:
    return str(path.stat().st_mtime_ns) if path.exists() else "missing"


def _generator(cfg: Config, condition: str, device: torch.device) -> tuple[nn.Module, Diffusion, dict[str, Any], Codec]:
    d = Path(cfg.train_generator.out_dir) / condition
    key = ("gen", str(d.resolve()), _stamp(d / "generator.safetensors"), str(device))
    if key not in _CACHE:
        model, diffusion, meta = load_generator(d, device)
        _CACHE[key] = (model, diffusion, meta, make_codec(meta.get("codec")).to(device))
    return _CACHE[key]


def _rdm(cfg: Config, class_cond: bool, device: torch.device) -> Any:
    from rcg.rdm import artifact_name, load_rdm

    d = Path(cfg.train_rdm.out_dir)
    key = ("rdm", str(d.resolve()), str(class_cond), _stamp(d / f"{artifact_name(class_cond)}.safetensors"), str(device))
    if key not in _CACHE:
        _CACHE[key] = load_rdm(d, class_cond=class_cond, device=device)
    return _CACHE[key]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------


def generate_images(
    cfg: Config,
    mode: str,
    n: int,
    *,
    class_ids: Tensor | None = None,
    reps: Tensor | None = None,
    cfg_scale: float = 0.0,
    cfg_schedule: str = "linear",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
) -> Tensor:
    """n images [n, C, H, W] in [0, 1] for one generation mode (module docstring).

    `class_ids` (n,) are needed for `label` and `rcg_class`; `reps` (n, D) for `oracle`. `steps`
    defaults to the generator's sampling steps (train_generator.sample_steps when it was trained).
    RDM samples use `seed`, the image noise `seed + 1`, so modes with the same seed are comparable.
    """
    if mode not in MODES:
        raise PipelineError(f"generation mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = _device()
    model, diffusion, meta, codec = _generator(cfg, CONDITION_OF[mode], device)
    cond: dict[str, Tensor] = {}
    if mode in ("label", "rcg_class"):
        if class_ids is None:
            raise PipelineError(f"mode {mode!r} needs class_ids")
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        if class_ids.numel() == 1 and n > 1:
            class_ids = class_ids.expand(n).clone()
        if class_ids.numel() != n:
            raise PipelineError(f"mode {mode!r}: got {class_ids.numel()} class ids for {n} images")
    if mode == "label":
        cond["label"] = class_ids
    elif mode in ("rcg", "rcg_cfg", "rcg_class"):
        from rcg.rdm import sample_reps

        bundle = _rdm(cfg, mode == "rcg_class", device)
        cond["rep"] = sample_reps(bundle, n, class_ids=class_ids if mode == "rcg_class" else None, seed=seed,
                                  batch_size=max(batch_size, 1000), progress=progress)
    elif mode == "oracle":
        if reps is None or reps.shape[0] != n:
            raise PipelineError(f"mode 'oracle' needs reps with {n} rows")
        cond["rep"] = reps.float()
    shape, saved = saved_sampling(meta, steps)
    return sample_images(model, diffusion, codec, n, cond, shape=shape, **saved, cfg_scale=cfg_scale,
                         cfg_schedule=cfg_schedule, seed=seed + 1, device=device, batch_size=batch_size,
                         progress=progress)


def saved_sampling(meta: dict[str, Any], steps: int | None = None) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """The image shape [C, H, W] and the sampler settings a generator was saved with (its
    `generator.json`, written by train_generator): sampler, steps (`steps` overrides), eta, amp, clip_x0."""
    saved, size = meta.get("sampling", {}), meta["kwargs"]["input_size"]
    return (meta["kwargs"]["in_channels"], size, size), {
        "steps": int(steps or saved.get("steps", 50)), "sampler": saved.get("sampler", "ddim"),
        "eta": float(saved.get("eta", 0.0)), "amp": bool(saved.get("amp", True)),
        "clip_x0": float(saved.get("clip_x0", 0.0)),
    }


# --------------------------------------------------------------------------------------------------
# Conditioning on given images (Fig. 6) and interpolation (Fig. 7)
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path, cfg: Config) -> Tensor:
    """An image file -> [C, H, W] in [0, 1] at data.image_size, prepared as the shards are read."""
    from rcg.data.images import decode, resize_crop, to_tensor

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: image not found")
    try:
        img = decode(path.read_bytes(), cfg.data.channels)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read image ({e})") from None
    return to_tensor(resize_crop(img, cfg.data.image_size))


def image_reps(cfg: Config, images: Tensor) -> Tensor:
    """Representations [N, D] of images [N, C, H, W] in [0, 1] from the frozen encoder."""
    from rcg.encoders import load_encoder

    key = ("enc", str(Path(cfg.encoder.out_dir).resolve()), _stamp(Path(cfg.encoder.out_dir) / "encoder.safetensors"))
    if key not in _CACHE:
        _CACHE[key] = load_encoder(cfg.encoder.out_dir)
    with torch.no_grad():
        return _CACHE[key](images.float()).float()


def generate_from_images(cfg: Config, images: Tensor, per_image: int, *, cfg_scale: float = 0.0,
                         cfg_schedule: str = "linear", steps: int | None = None, seed: int = 0,
                         progress: bool = True) -> Tensor:
    """`per_image` samples conditioned on each image's representation (paper Fig. 6): [N*per_image, ...]."""
    reps = image_reps(cfg, images).repeat_interleave(per_image, dim=0)
    return generate_images(cfg, "oracle", reps.shape[0], reps=reps, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                           steps=steps, seed=seed, progress=progress)


def interpolate(cfg: Config, image_a: Tensor, image_b: Tensor, n_steps: int = 8, rows: int = 1, *,
                cfg_scale: float = 0.0, cfg_schedule: str = "linear", steps: int | None = None,
                seed: int = 0) -> Tensor:
    """Images along t r_a + (1 - t) r_b, t from 1 to 0 (paper Fig. 7; linear as in [issue #20]).

    Each of `rows` rows shares one starting noise across its `n_steps` columns and samples with
    deterministic DDIM (eta 0), so only the representation changes along a row. [rows*n_steps, C, H, W].
    """
    device = _device()
    model, diffusion, meta, codec = _generator(cfg, "rep", device)
    r = image_reps(cfg, torch.stack([image_a, image_b]))
    t = torch.linspace(1.0, 0.0, n_steps)[:, None]
    line = t * r[0] + (1 - t) * r[1]  # (n_steps, D)
    shape, saved = saved_sampling(meta, steps)
    saved.update(sampler="ddim", eta=0.0)  # deterministic, whatever the generator samples with
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(rows, *shape, generator=g).repeat_interleave(n_steps, dim=0)
    return sample_images(model, diffusion, codec, rows * n_steps, {"rep": line.repeat(rows, 1)}, shape=shape,
                         **saved, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, seed=seed, device=device,
                         progress=False, x_T=x_T)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


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


def save_pngs(images: Tensor, folder: str | Path, prefix: str = "") -> list[Path]:
    """One lossless PNG per image, named {prefix}{index:05d}.png (truncation to uint8 as the reference)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    arr = (images.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        p = folder / f"{prefix}{i:05d}.png"
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        with atomic_path(p) as tmp:
            img.save(tmp, format="PNG")
        paths.append(p)
    return paths
