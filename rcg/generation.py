"""Trained RCG generators, loaded from their model folders (paper section 3).

- `ImageGenerator`: one trained image generator folder (`models/generator/<condition>/`): the
  network, its diffusion (none for MAGE, which decodes tokens iteratively), its codec (pixels, VAE
  latents or tokenizer ids) and the sampler settings saved in `generator.json` (the one source of
  the image sampler's settings; callers may override the step count and guidance).
- `RepGenerator`: the RDM folder (`models/rdm/`): the RDM and, when trained, the class-conditional
  RDM (the paper's class-conditional generation needs only a class-conditional RDM). Its sampler
  settings come from the RDM's own JSON.
- `RCGGenerator`: both, plus optionally the frozen encoder: RDM samples -> images (unconditional
  RCG), given representations -> images (paper Table 9a's oracle, Fig. 6), interpolation (Fig. 7).

Callers load an object once and keep it; nothing is cached behind their back.

Seeding, shared by every caller so that generated sets are reproducible: a call with `seed` draws
RDM samples from `seed` and image noise from `seed + 1`; image batch b draws from
`rcg.sampling.batch_generator(seed + 1, b)`. So `sample(seed=s)` is exactly
`from_reps(sample_reps(seed=s), seed=s)`, and modes with the same seed start from the same noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.diffusion import Diffusion
from rcg.generators import load_generator
from rcg.generators.vae import Codec, make_codec
from rcg.io import PipelineError
from rcg.rdm import RDMBundle, artifact_name, load_rdm, sample_reps
from rcg.sampling import batch_generator, sample_images, sample_tokens, saved_sampling

RDM_BATCH = 1000  # RDM samples per DDIM batch: the RDM is cheap next to the image generator


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def class_tensor(class_ids: Tensor | int | list[int], n: int) -> Tensor:
    """Class ids as int64 [n]: one id (int or 1-element tensor) is repeated for all n samples."""
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 1 and n > 1:
        ids = ids.expand(n).clone()
    if ids.numel() != n:
        raise PipelineError(f"got {ids.numel()} class ids for {n} samples")
    return ids


class ImageGenerator:
    """A trained image generator (paper section 3): `sample` draws images given its condition."""

    def __init__(self, model: nn.Module, diffusion: Diffusion | None, codec: Codec, meta: dict[str, Any],
                 device: torch.device, model_dir: Path | None = None) -> None:
        self.model, self.diffusion, self.codec, self.meta = model, diffusion, codec, meta
        self.device, self.model_dir = device, model_dir
        # What the sampler draws: [C, H, W] (latent with a VAE), or [T] token ids for MAGE
        self.shape, _ = saved_sampling(meta)

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str | None = None) -> ImageGenerator:
        """Load `<model_dir>/generator.{safetensors,json}`; a PipelineError names a missing folder."""
        device = torch.device(device) if device is not None else default_device()
        model, diffusion, meta = load_generator(model_dir, device)
        return cls(model, diffusion, make_codec(meta.get("codec")).to(device), meta, device, Path(model_dir))

    @property
    def condition(self) -> str:
        """`rep` (RCG), `label` (class-label baseline) or `none` (unconditional baseline)."""
        return str(getattr(self.model, "condition", "none"))

    @property
    def max_steps(self) -> int:
        """The most sampling steps that mean anything: the diffusion's timesteps, or for MAGE its
        token count (every decoding iteration fixes at least one token)."""
        return int(self.diffusion.num_timesteps if self.diffusion is not None else self.shape[0])

    def settings(self, steps: int | None = None) -> dict[str, Any]:
        """The sampler settings saved in generator.json (diffusion: sampler, steps, eta, amp,
        clip_x0; MAGE: steps, choice_temperature, amp)."""
        return saved_sampling(self.meta, steps)[1]

    def start_noise(self, n: int, seed: int = 0) -> Tensor | None:
        """The starting noise [n, *shape] of `sample(n, seed=seed)` when n fits in one batch; None
        for MAGE, which starts from all-masked ids (its decoding noise comes from the seed alone)."""
        if self.diffusion is None:
            return None
        return torch.randn((n, *self.shape), generator=batch_generator(seed + 1, 0))

    def sample(
        self,
        n: int,
        rep: Tensor | None = None,
        label: Tensor | int | None = None,
        *,
        cfg: float = 0.0,
        cfg_schedule: str = "linear",
        steps: int | None = None,
        seed: int = 0,
        batch_size: int = 250,
        x_T: Tensor | None = None,
        deterministic: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """n images, float [n, C, H, W] in [0, 1], with the saved sampler (module docstring: seeds).

        `rep` [n, D] conditions the `rep` generator, `label` (n ids, or one for all) the `label`
        one; the `none` generator takes neither. `cfg` is the guidance scale w (0: none), `steps`
        overrides the saved step count, `x_T` fixes the starting noise, and `deterministic` samples
        with DDIM at eta 0 whatever the saved sampler (paper Fig. 7's interpolations). A MAGE
        decodes `steps` iterations with guidance on its logits; given the seed it is deterministic
        already, and it has no starting noise (`x_T` must be None).
        """
        settings = self.settings(steps)
        if self.diffusion is None:
            if x_T is not None:
                raise PipelineError(f"{self.model_dir or 'this generator'}: MAGE has no starting noise (x_T)")
            return sample_tokens(self.model, self.codec, n, self._condition(n, rep, label), **settings, cfg_scale=cfg,
                                 cfg_schedule=cfg_schedule, seed=seed + 1, device=self.device,
                                 batch_size=batch_size, progress=progress)
        if deterministic:
            settings.update(sampler="ddim", eta=0.0)
        return sample_images(self.model, self.diffusion, self.codec, n, self._condition(n, rep, label),
                             shape=self.shape, **settings, cfg_scale=cfg, cfg_schedule=cfg_schedule,
                             seed=seed + 1, device=self.device, batch_size=batch_size, progress=progress,
                             x_T=x_T)

    def _condition(self, n: int, rep: Tensor | None, label: Tensor | int | None) -> dict[str, Tensor]:
        """The model's keyword arguments; a PipelineError when the condition does not fit the model."""
        where = self.model_dir or "this generator"
        given = [k for k, v in (("rep", rep), ("label", label)) if v is not None]
        want = [] if self.condition == "none" else [self.condition]
        if given != want:
            raise PipelineError(f"{where}: the generator is conditioned on {self.condition!r}; "
                                f"pass {want[0] + '=' if want else 'no condition'} (got {given or 'none'})")
        if rep is not None:
            rep = torch.as_tensor(rep).float()
            dim = self.meta["kwargs"].get("rep_dim", rep.shape[-1])
            if tuple(rep.shape) != (n, dim):
                raise PipelineError(f"{where}: rep must be [{n}, {dim}], got {list(rep.shape)}")
            return {"rep": rep}
        if label is not None:
            ids, k = class_tensor(label, n), int(self.meta["kwargs"].get("num_classes", 0))
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
                raise PipelineError(f"{where}: class ids must be in [0, {k}), got {int(ids.min())}..{int(ids.max())}")
            return {"label": ids}
        return {}


class RepGenerator:
    """The RDM folder (paper section 3): representations from noise, optionally of a given class."""

    def __init__(self, rdm: RDMBundle, class_rdm: RDMBundle | None = None, model_dir: Path | None = None) -> None:
        self.rdm, self.class_rdm, self.model_dir = rdm, class_rdm, model_dir

    @classmethod
    def load(cls, rdm_dir: str | Path, device: torch.device | str | None = None) -> RepGenerator:
        """`rdm.*` from `rdm_dir`, and `rdm_class.*` when it was trained; a PipelineError names
        the missing file."""
        device = torch.device(device) if device is not None else default_device()
        class_file = Path(rdm_dir) / f"{artifact_name(True)}.safetensors"
        class_rdm = load_rdm(rdm_dir, class_cond=True, device=device) if class_file.exists() else None
        return cls(load_rdm(rdm_dir, class_cond=False, device=device), class_rdm, Path(rdm_dir))

    @property
    def settings(self) -> dict[str, Any]:
        """The RDM's sampler settings (steps, eta, temperature, amp) from its JSON."""
        return dict(self.rdm.meta.get("sampling", {}))

    def sample(self, n: int, class_ids: Tensor | int | None = None, seed: int = 0,
               batch_size: int = RDM_BATCH, progress: bool = False) -> Tensor:
        """n representations, float [n, D] on the CPU; `class_ids` (n ids, or one for all) go
        through the class-conditional RDM. The result depends on (seed, batch_size)."""
        if class_ids is None:
            return sample_reps(self.rdm, n, seed=seed, batch_size=batch_size, progress=progress)
        if self.class_rdm is None:
            where = self.model_dir or "this RDM folder"
            raise PipelineError(f"class ids given, but {where} has no class-conditional RDM "
                                f"({artifact_name(True)}.safetensors: train it with train_rdm.class_cond)")
        return sample_reps(self.class_rdm, n, class_ids=class_tensor(class_ids, n), seed=seed,
                           batch_size=batch_size, progress=progress)


class RCGGenerator:
    """RCG (paper section 3): RDM samples condition the representation-conditioned image generator."""

    def __init__(self, reps: RepGenerator, image: ImageGenerator, encoder: nn.Module | None = None) -> None:
        if image.condition != "rep":
            raise PipelineError(f"{image.model_dir}: RCG needs the rep-conditioned generator, "
                                f"this one is conditioned on {image.condition!r}")
        self.reps, self.image, self.encoder = reps, image, encoder

    @classmethod
    def load(cls, rdm_dir: str | Path, generator_dir: str | Path, encoder_dir: str | Path | None = None,
             device: torch.device | str | None = None) -> RCGGenerator:
        """The RDM folder (models/rdm), the rep generator folder (models/generator/rep) and, for
        `encode` / `from_images`, the encoder folder (models/encoder)."""
        from rcg.encoders import load_encoder

        device = torch.device(device) if device is not None else default_device()
        encoder = None
        if encoder_dir is not None:
            if not Path(encoder_dir).is_dir():
                raise PipelineError(f"{encoder_dir}: no encoder folder (run `rcg encoder` first)")
            encoder = load_encoder(encoder_dir)  # on the CPU: it encodes a handful of given images
        return cls(RepGenerator.load(rdm_dir, device), ImageGenerator.load(generator_dir, device), encoder)

    @property
    def class_conditional(self) -> bool:
        """Whether `class_ids` can be asked for (a class-conditional RDM was trained)."""
        return self.reps.class_rdm is not None

    def sample_reps(self, n: int, class_ids: Tensor | int | None = None, seed: int = 0,
                    batch_size: int = RDM_BATCH, progress: bool = False) -> Tensor:
        """n RDM samples [n, D] (the RDM's JSON holds the sampler settings)."""
        return self.reps.sample(n, class_ids, seed=seed, batch_size=batch_size, progress=progress)

    def sample(self, n: int, class_ids: Tensor | int | None = None, *, cfg: float = 0.0,
               cfg_schedule: str = "linear", steps: int | None = None, seed: int = 0,
               batch_size: int = 250, progress: bool = False) -> Tensor:
        """n RCG images [n, C, H, W] in [0, 1]: RDM samples (of `class_ids` through the
        class-conditional RDM) -> the image generator, guided with scale `cfg` (paper section 3)."""
        reps = self.sample_reps(n, class_ids, seed=seed, batch_size=max(batch_size, RDM_BATCH), progress=progress)
        return self.from_reps(reps, cfg=cfg, cfg_schedule=cfg_schedule, steps=steps, seed=seed,
                              batch_size=batch_size, progress=progress)

    def from_reps(self, reps: Tensor, *, cfg: float = 0.0, cfg_schedule: str = "linear",
                  steps: int | None = None, seed: int = 0, batch_size: int = 250, progress: bool = False) -> Tensor:
        """One image per given representation [N, D] (paper Table 9a's oracle with real images' reps)."""
        return self.image.sample(len(reps), rep=reps, cfg=cfg, cfg_schedule=cfg_schedule, steps=steps,
                                 seed=seed, batch_size=batch_size, progress=progress)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Representations [N, D] of images [N, C, H, W] in [0, 1] from the frozen encoder."""
        if self.encoder is None:
            raise PipelineError("conditioning on images needs the encoder: load with encoder_dir=")
        return self.encoder(images.float()).float()

    def from_images(self, images: Tensor, per_image: int, *, cfg: float = 0.0, cfg_schedule: str = "linear",
                    steps: int | None = None, seed: int = 0, progress: bool = False) -> Tensor:
        """`per_image` samples conditioned on each image's representation (paper Fig. 6):
        [N * per_image, C, H, W], image i's samples at rows i * per_image ..."""
        reps = self.encode(images).repeat_interleave(per_image, dim=0)
        return self.from_reps(reps, cfg=cfg, cfg_schedule=cfg_schedule, steps=steps, seed=seed, progress=progress)

    def interpolate(self, rep_a: Tensor, rep_b: Tensor, points: int = 8, rows: int = 1, *, seed: int = 0,
                    cfg: float = 0.0, cfg_schedule: str = "linear", steps: int | None = None,
                    batch_size: int = 250) -> Tensor:
        """Images along (1 - t) r_a + t r_b, t = 0 ... 1 in `points` steps (paper Fig. 7, linear).

        `rep_a`, `rep_b` are one pair [D] (repeated for `rows` rows) or one pair per row [R, D].
        A row keeps one starting noise (`from_reps`' noise for the same seed) and samples with
        deterministic DDIM (a MAGE: the same decoding noise, drawn from the seed), so only the
        representation changes along it: its first and last images are `from_reps` of its end
        points. Returns [R * points, C, H, W], row by row.
        """
        a, b = torch.as_tensor(rep_a).float(), torch.as_tensor(rep_b).float()
        if a.dim() == 1 and b.dim() == 1:
            a, b = a.expand(rows, -1), b.expand(rows, -1)
        if a.shape != b.shape or a.dim() != 2 or rows not in (1, len(a)):
            raise PipelineError(f"interpolate: end points {list(a.shape)} and {list(b.shape)} for {rows} rows "
                                "(one pair [D], or one pair per row [rows, D])")
        x_T = self.image.start_noise(len(a), seed)
        cols = [self.image.sample(len(a), rep=(1 - t) * a + t * b, cfg=cfg, cfg_schedule=cfg_schedule,
                                  steps=steps, seed=seed, batch_size=batch_size, x_T=x_T, deterministic=True)
                for t in torch.linspace(0, 1, points).tolist()]
        return torch.stack(cols, dim=1).flatten(0, 1)  # (R * points, C, H, W)
