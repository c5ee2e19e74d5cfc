"""The one diffusion module shared by the RDM and the image generator (docs/paper.md#rdm-diffusion).

- Beta schedules (`make_betas`): the reference RDM's linear-in-sqrt schedule, ADM's linear one and
  Nichol & Dhariwal's cosine one; `diffusion_meta` / `Diffusion.from_meta` write and read the one
  JSON description of a process that the RDM and the generator artifacts share.
- `Diffusion`: the forward process q(x_t | x_0), the eps / x0 / v parameterisations and the plain MSE
  training loss (DDPM, Ho et al. 2020; the reference RDM trains with x0-prediction; v-prediction is
  Salimans & Ho 2022).
- Samplers as plain functions over a `model(x, t, **cond)` callable (k-diffusion style):
  `ddim_sample` (Song et al. 2021, exactly the reference's respaced DDIM, docs/paper.md#rdm-sampling) and
  `ddpm_sample` (ancestral sampling, optionally over respaced steps as in ADM).

Nothing here knows about guidance: a caller that wants classifier-free guidance wraps its network in
a closure that mixes conditional and unconditional outputs, and passes that closure as `model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

Schedule = Literal["sqrt_linear", "linear", "cosine"]
Parameterization = Literal["eps", "x0", "v"]
Model = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def make_betas(
    schedule: Schedule,
    timesteps: int,
    linear_start: float | None = None,
    linear_end: float | None = None,
    cosine_s: float = 0.008,
) -> Tensor:
    """The noise schedule beta_1..beta_T as a float64 tensor [timesteps].

    - ``sqrt_linear``: beta = linspace(sqrt(start), sqrt(end), T)^2, the reference RDM's (and LDM's)
      "linear" schedule (docs/paper.md#rdm-diffusion); defaults 0.0015 .. 0.0195, giving alpha_bar_T ~ 1.4e-4.
    - ``linear``: ADM's linear schedule, beta = linspace(start, end) scaled by 1000 / T so that any T
      matches the 1000-step endpoints (defaults 1e-4 .. 0.02, Ho et al. 2020).
    - ``cosine``: Nichol & Dhariwal 2021, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2),
      betas clipped at 0.999 so the last step does not destroy everything at once.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if schedule == "sqrt_linear":
        a = 0.0015 if linear_start is None else linear_start
        b = 0.0195 if linear_end is None else linear_end
        return torch.linspace(a**0.5, b**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        scale = 1000.0 / timesteps
        a = 1e-4 if linear_start is None else linear_start
        b = 0.02 if linear_end is None else linear_end
        return torch.linspace(scale * a, scale * b, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r} (expected sqrt_linear, linear or cosine)")


def diffusion_meta(
    beta_schedule: Schedule,
    timesteps: int,
    linear_start: float | None = None,
    linear_end: float | None = None,
    parameterization: Parameterization = "eps",
) -> dict[str, Any]:
    """The `diffusion` entry of a model's JSON (RDM and image generator alike): what
    `Diffusion.from_meta` rebuilds the process from. Unset endpoints (None) are left out, meaning
    the schedule's defaults.
    """
    meta: dict[str, Any] = {"timesteps": int(timesteps), "beta_schedule": beta_schedule}
    if linear_start is not None:
        meta["linear_start"] = linear_start
    if linear_end is not None:
        meta["linear_end"] = linear_end
    meta["parameterization"] = parameterization
    return meta


# --------------------------------------------------------------------------------------------------
# The forward process and the loss
# --------------------------------------------------------------------------------------------------


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to broadcast against `like` ([B] -> [B, 1, ..., 1]), in like's dtype/device."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class Diffusion:
    """A discrete Gaussian diffusion over T steps (DDPM), with the network predicting eps, x0 or v.

    Schedules are kept in float64 on the CPU and cast to the data's dtype/device when used; the
    network is always called with the integer timestep index t in [0, T) (as in the reference).
    """

    def __init__(self, betas: Tensor, parameterization: Parameterization = "eps") -> None:
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.parameterization = parameterization
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Diffusion:
        """The Diffusion a model was trained with, from the `diffusion` entry of its JSON
        (`diffusion_meta`'s keys; `linear_start`/`linear_end` absent or null mean the schedule's
        defaults, `parameterization` absent means eps). Raises KeyError for a missing key.
        """
        if "beta_schedule" not in meta and "schedule" in meta:
            # RDM JSON written before the RDM and the generator shared this format spells the key
            # "schedule"; trained models on disk still carry it.
            meta = {**meta, "beta_schedule": meta["schedule"]}
        betas = make_betas(
            meta["beta_schedule"], int(meta["timesteps"]), meta.get("linear_start"), meta.get("linear_end")
        )
        return cls(betas, meta.get("parameterization", "eps"))

    # ---- forward process --------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_eps(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Both (x0, eps) from the network output, whichever of the two it predicts.

        x0 -> eps uses eps = (x_t / sqrt(a) - x0) / sqrt(1/a - 1), the reference DDIM's conversion;
        eps -> x0 uses x0 = (x_t - sqrt(1 - a) eps) / sqrt(a);
        v = sqrt(a) eps - sqrt(1 - a) x0 gives x0 = sqrt(a) x_t - sqrt(1 - a) v and
        eps = sqrt(1 - a) x_t + sqrt(a) v (exact, since a + (1 - a) = 1).
        """
        a = _gather(self.alphas_cumprod, t, x_t)
        if self.parameterization == "x0":
            return model_out, self.eps_from_x0(model_out, x_t, t)
        if self.parameterization == "v":
            x0 = a.sqrt() * x_t - (1.0 - a).sqrt() * model_out
            eps = (1.0 - a).sqrt() * x_t + a.sqrt() * model_out
            return x0, eps
        eps = model_out
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt(), eps

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The eps consistent with x_t and a given x0 (used after clipping x0)."""
        a = _gather(self.alphas_cumprod, t, x_t)
        return (x_t / a.sqrt() - x0) / (1.0 / a - 1.0).sqrt()

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0, the v-prediction target."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * noise
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    # ---- training ---------------------------------------------------------------------------------

    def sample_t(
        self,
        n: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        power: float = 1.0,
    ) -> Tensor:
        """Training timesteps, one per sample: t ~ U{0, ..., T-1} (docs/paper.md#rdm-diffusion) for power 1.

        power p > 1 draws t = floor(T u^p), u ~ U[0, 1): density proportional to t^(1/p - 1), so
        low-noise steps, where the fine detail of a sample is settled, get more of the training.
        """
        if power <= 0:
            raise ValueError(f"timestep power must be > 0, got {power}")
        gdev = generator.device if generator is not None else device
        if power == 1.0:
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gdev).to(device)
        u = torch.rand(n, generator=generator, device=gdev)
        t = (u.pow(power) * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)
        return t.to(device)

    def training_loss(
        self,
        model: Model,
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The simple diffusion loss: mean over batch and dimensions of (model(x_t, t) - target)^2.

        The target is the noise for `eps`, the clean sample for `x0` (the reference RDM:
        loss_type l2, l_simple_weight 1, no ELBO term; docs/paper.md#rdm-diffusion), and the velocity
        sqrt(a) noise - sqrt(1 - a) x0 for `v`.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **(model_kwargs or {}))
        if self.parameterization == "x0":
            target = x0
        elif self.parameterization == "v":
            target = self.velocity(x0, t, noise)
        else:
            target = noise
        return torch.mean((out.float() - target.float()) ** 2)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The reference's uniform DDIM discretisation: range(0, T, T // steps) + 1 (docs/paper.md#rdm-sampling).

    For T = 1000 and 250 steps this is 1, 5, ..., 997. As in the reference, when `steps` does not
    divide T the stride is T // steps and more than `steps` steps are taken. The +1 shift is dropped
    only when it would run past the last timestep (stride 1), where the reference would crash.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    taus = list(range(0, num_timesteps, num_timesteps // steps))
    if taus[-1] + 1 < num_timesteps:
        taus = [t + 1 for t in taus]
    return taus


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """ADM's evenly spaced subset of `steps` timesteps from 0 to T-1 inclusive (for ancestral sampling)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU generator works for any device)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def _progress(items: list[int], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


@torch.no_grad()
def ddim_sample(
    model: Model,
    diffusion: Diffusion,
    shape: tuple[int, ...],
    steps: int,
    eta: float = 1.0,
    temperature: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    clip_x0: float | None = None,
    x_T: Tensor | None = None,
) -> Tensor:
    """DDIM sampling over the reference's respaced steps (Song et al. 2021; docs/paper.md#rdm-sampling).

    At step tau_i with a = alpha_bar[tau_i] and a_prev = alpha_bar[tau_{i-1}] (alpha_bar[0] for the
    first step):
        sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev)
        x     = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma * temperature * z
    The last step still adds sigma-scaled noise and the function returns x, not x0_hat, as the
    reference does. `clip_x0` clamps x0_hat to [-clip_x0, clip_x0] (eps_hat is recomputed from it).
    """
    device = torch.device(device)
    kwargs = model_kwargs or {}
    taus = ddim_timesteps(diffusion.num_timesteps, steps)
    ab = diffusion.alphas_cumprod
    x = _randn(tuple(shape), generator, device) if x_T is None else x_T.to(device)
    for i in _progress(list(reversed(range(len(taus)))), progress, "DDIM"):
        tau = taus[i]
        a = float(ab[tau])
        a_prev = float(ab[taus[i - 1]]) if i > 0 else float(ab[0])
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        t = torch.full((x.shape[0],), tau, device=device, dtype=torch.long)
        out = model(x, t, **kwargs)
        x0, eps = diffusion.predict_x0_eps(out.to(x.dtype), x, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = diffusion.eps_from_x0(x0, x, t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * temperature * _randn(tuple(x.shape), generator, device, x.dtype)
    return x


@torch.no_grad()
def ddpm_sample(
    model: Model,
    diffusion: Diffusion,
    shape: tuple[int, ...],
    steps: int | None = None,
    temperature: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    clip_x0: float | None = None,
    x_T: Tensor | None = None,
) -> Tensor:
    """Ancestral sampling from p(x_{s} | x_t) = q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2).

    With `steps` < T the chain runs over ADM's respaced subset of timesteps (Nichol & Dhariwal 2021),
    using the betas implied between consecutive kept steps: beta' = 1 - alpha_bar_t / alpha_bar_s.
    The variance is the posterior's (beta_tilde, "fixed small"); the last step adds no noise and
    the function returns the final mean, i.e. x0_hat of the last step.
    """
    device = torch.device(device)
    kwargs = model_kwargs or {}
    T = diffusion.num_timesteps
    kept = list(range(T)) if steps is None or steps >= T else respaced_timesteps(T, steps)
    ab = diffusion.alphas_cumprod
    x = _randn(tuple(shape), generator, device) if x_T is None else x_T.to(device)
    for i in _progress(list(reversed(range(len(kept)))), progress, "DDPM"):
        tau = kept[i]
        a = float(ab[tau])
        a_prev = float(ab[kept[i - 1]]) if i > 0 else 1.0
        beta = 1 - a / a_prev  # the (respaced) beta of this step
        t = torch.full((x.shape[0],), tau, device=device, dtype=torch.long)
        out = model(x, t, **kwargs)
        x0, _ = diffusion.predict_x0_eps(out.to(x.dtype), x, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # Posterior q(x_prev | x_t, x0) mean and variance (DDPM eqs. 6-7).
        coef_x0 = math.sqrt(a_prev) * beta / (1 - a)
        coef_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        x = coef_x0 * x0 + coef_xt * x
        if i > 0:
            var = beta * (1 - a_prev) / (1 - a)
            x = x + math.sqrt(var) * temperature * _randn(tuple(x.shape), generator, device, x.dtype)
    return x
