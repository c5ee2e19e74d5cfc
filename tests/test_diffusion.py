"""The shared diffusion module (rcg.diffusion): schedules, forward process, loss and samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcg.diffusion import (
    Diffusion,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    diffusion_meta,
    make_betas,
    respaced_timesteps,
)

# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def dummy_model(x: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A fixed, t-dependent nonlinear 'network' for golden values."""
    return scale * torch.tanh(x) * (0.5 + t.to(x.dtype)[:, None] / 2000.0)


# ---- schedules -------------------------------------------------------------------------------------


def test_sqrt_linear_schedule_matches_reference() -> None:
    b = make_betas("sqrt_linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.0195, rel=1e-12)
    # sqrt(beta) is linear
    s = b.sqrt()
    assert torch.allclose(s[1:] - s[:-1], (s[1] - s[0]).expand(999), atol=1e-12)
    ab_T = torch.cumprod(1 - b, 0)[-1].item()
    assert ab_T == pytest.approx(1.42e-4, rel=0.02)  # docs/paper.md#rdm-diffusion


def test_linear_and_cosine_schedules() -> None:
    b = make_betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b250 = make_betas("linear", 250)  # ADM scales the endpoints by 1000 / T
    assert b250[0].item() == pytest.approx(4e-4) and b250[-1].item() == pytest.approx(0.08)
    c = make_betas("cosine", 1000)
    ab = torch.cumprod(1 - c, 0)
    assert (c > 0).all() and (c <= 0.999).all()
    assert (ab[1:] < ab[:-1]).all()
    # alpha_bar follows cos^2 closely (before the 0.999 clip matters)
    t = 500
    expected = (
        math.cos(((t + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
        / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    )
    assert ab[t].item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        make_betas("quadratic", 10)  # type: ignore[arg-type]


def test_diffusion_meta_round_trips_through_from_meta() -> None:
    meta = diffusion_meta("sqrt_linear", 100, 0.001, 0.02, "x0")
    assert meta == {"timesteps": 100, "beta_schedule": "sqrt_linear", "linear_start": 0.001,
                    "linear_end": 0.02, "parameterization": "x0"}
    d = Diffusion.from_meta(meta)
    assert d.parameterization == "x0" and torch.equal(d.betas, make_betas("sqrt_linear", 100, 0.001, 0.02))
    # Unset endpoints are left out and mean the schedule's defaults (the generator's JSON).
    meta = diffusion_meta("linear", 1000, parameterization="v")
    assert meta == {"timesteps": 1000, "beta_schedule": "linear", "parameterization": "v"}
    assert torch.equal(Diffusion.from_meta(meta).betas, make_betas("linear", 1000))


def test_from_meta_reads_the_old_spellings() -> None:
    """JSON of trained models on disk: the RDM's "schedule" key, a generator's missing endpoints
    and parameterisation (eps), and explicit nulls."""
    old_rdm = {"schedule": "sqrt_linear", "timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195,
               "parameterization": "x0"}
    d = Diffusion.from_meta(old_rdm)
    assert d.parameterization == "x0" and torch.equal(d.betas, make_betas("sqrt_linear", 1000))
    old_gen = {"timesteps": 1000, "beta_schedule": "cosine"}
    assert Diffusion.from_meta(old_gen).parameterization == "eps"
    nulls = {"timesteps": 50, "beta_schedule": "linear", "linear_start": None, "linear_end": None}
    assert torch.equal(Diffusion.from_meta(nulls).betas, make_betas("linear", 50))
    with pytest.raises(KeyError, match="beta_schedule"):
        Diffusion.from_meta({"timesteps": 10})


# ---- forward process and loss ----------------------------------------------------------------------


def _target(param: str, d: Diffusion, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a perfect network outputs under each parameterisation (v written out by hand)."""
    if param == "x0":
        return x0
    if param == "eps":
        return noise
    ab = d.alphas_cumprod[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_q_sample_and_parameterisations_round_trip(param: str) -> None:
    d = Diffusion(make_betas("sqrt_linear", 1000), param)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    xt = d.q_sample(x0, t, noise)
    ab = d.alphas_cumprod[t][:, None]
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    out = _target(param, d, x0, noise, t)
    x0_hat, eps_hat = d.predict_x0_eps(out, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-8)
    assert torch.allclose(eps_hat, noise, atol=1e-6)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_training_loss_is_mse_to_the_right_target(param: str) -> None:
    d = Diffusion(make_betas("linear", 100), param)
    x0 = torch.randn(4, 3, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 50, 99])
    target = _target(param, d, x0, noise, t)
    oracle = d.training_loss(lambda x, tt, **k: target, x0, t=t, noise=noise)
    assert oracle.item() == pytest.approx(0.0, abs=1e-12)  # v: float32 rounding of the same formula
    seen = {}

    def model(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["y"], seen["t"] = y, tt
        return torch.zeros_like(x)

    loss = d.training_loss(model, x0, model_kwargs={"y": torch.arange(4)}, t=t, noise=noise)
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)
    assert torch.equal(seen["y"], torch.arange(4)) and torch.equal(seen["t"], t)
    # random t stays in range
    assert d.sample_t(1000).min() >= 0 and d.sample_t(1000).max() <= 99


def test_sample_t_power_concentrates_on_low_noise() -> None:
    d = Diffusion(make_betas("linear", 1000), "v")
    g = torch.Generator().manual_seed(0)
    uniform = d.sample_t(20000, generator=g)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(d.sample_t(20000, generator=g2, power=1.0), uniform)  # power 1 is the reference draw
    low = d.sample_t(20000, generator=g, power=2.0)
    assert 0 <= int(low.min()) and int(low.max()) <= 999
    # P(t < T/4) = P(u^2 < 1/4) = 1/2 for power 2, against 1/4 for uniform timesteps
    assert (low < 250).float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert (uniform < 250).float().mean().item() == pytest.approx(0.25, abs=0.015)
    with pytest.raises(ValueError, match="power"):
        d.sample_t(4, power=0.0)


# ---- sampler step schedules ------------------------------------------------------------------------


def test_ddim_timesteps_match_reference() -> None:
    taus = ddim_timesteps(1000, 250)
    assert taus == list(range(1, 1000, 4))  # 1, 5, ..., 997 (docs/paper.md#rdm-sampling)
    assert len(taus) == 250 and taus[-1] == 997
    assert ddim_timesteps(1000, 1000) == list(range(1000))  # no index past T-1
    assert ddim_timesteps(1000, 10)[:3] == [1, 101, 201]
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)
    r = respaced_timesteps(1000, 5)
    assert r == [0, 250, 500, 749, 999] or r == [0, 250, 500, 750, 999]
    assert len(respaced_timesteps(1000, 250)) == 250


# ---- DDIM against its closed form ------------------------------------------------------------------


def _ddim_reference(x_T: np.ndarray, out_fn, ab: np.ndarray, taus: list[int], eta: float, temp: float,
                    noises: list[np.ndarray], param: str) -> np.ndarray:
    """The DDIM update written out in float64 numpy, independent of rcg.diffusion."""
    x = x_T.copy()
    k = 0
    for i in reversed(range(len(taus))):
        a = ab[taus[i]]
        a_prev = ab[taus[i - 1]] if i > 0 else ab[0]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        out = out_fn(x, taus[i])
        if param == "x0":
            x0 = out
            eps = (x / np.sqrt(a) - x0) / np.sqrt(1 / a - 1)
        else:
            eps = out
            x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * temp * noises[k]
            k += 1
    return x


@pytest.mark.parametrize("param,eta,temp", [("x0", 1.0, 1.0), ("eps", 0.5, 0.7), ("x0", 0.0, 1.0)])
def test_ddim_matches_closed_form(param: str, eta: float, temp: float) -> None:
    d = Diffusion(make_betas("sqrt_linear", 1000), param)
    shape = (3, 5)
    steps = 4
    taus = ddim_timesteps(1000, steps)
    g = torch.Generator().manual_seed(123)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    # the sampler draws its step noises from the same generator, in order; replay them
    g_replay = torch.Generator().manual_seed(7)
    noises = [torch.randn(shape, generator=g_replay, dtype=torch.float64).numpy() for _ in taus]
    got = ddim_sample(
        lambda x, t: dummy_model(x, t), d, shape, steps, eta=eta, temperature=temp,
        generator=torch.Generator().manual_seed(7), x_T=x_T,
    )
    ref = _ddim_reference(
        x_T.numpy(), lambda x, tau: np.tanh(x) * (0.5 + tau / 2000.0), d.alphas_cumprod.numpy(),
        taus, eta, temp, noises, param,
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_ddim_single_step_closed_form_values() -> None:
    """One step from tau = 1 (the last of the chain): a_prev = alpha_bar[0], noise still added."""
    d = Diffusion(make_betas("sqrt_linear", 1000), "x0")
    x = torch.full((1, 1), 2.0, dtype=torch.float64)
    taus = ddim_timesteps(1000, 1)
    assert taus == [1]
    got = ddim_sample(lambda x, t: torch.ones_like(x), d, (1, 1), 1, eta=1.0, x_T=x,
                      generator=torch.Generator().manual_seed(0))
    a0, a1 = d.alphas_cumprod[0].item(), d.alphas_cumprod[1].item()
    sigma = math.sqrt((1 - a0) / (1 - a1)) * math.sqrt(1 - a1 / a0)
    eps = (2.0 / math.sqrt(a1) - 1.0) / math.sqrt(1 / a1 - 1)
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64).item()
    expected = math.sqrt(a0) * 1.0 + math.sqrt(1 - a0 - sigma**2) * eps + sigma * z
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert sigma > 0.01  # the final step is genuinely noisy (reference behaviour)


# ---- golden values (pin the samplers against silent changes) ---------------------------------------


def _golden_run(kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    if kind == "ddim_x0":
        d = Diffusion(make_betas("sqrt_linear", 1000), "x0")
        return ddim_sample(dummy_model, d, (2, 4), 10, eta=1.0, generator=torch.Generator().manual_seed(0),
                           model_kwargs={"scale": 0.8})
    if kind == "ddim_eps_eta0":
        d = Diffusion(make_betas("linear", 1000), "eps")
        return ddim_sample(dummy_model, d, (2, 4), 20, eta=0.0, generator=torch.Generator().manual_seed(0),
                           clip_x0=1.0)
    if kind == "ddpm_eps_respaced":
        d = Diffusion(make_betas("cosine", 1000), "eps")
        return ddpm_sample(dummy_model, d, (2, 4), 25, generator=torch.Generator().manual_seed(0),
                           clip_x0=1.0)
    raise KeyError(kind)


# Recorded from this implementation after it passed the closed-form and Gaussian tests above.
GOLDEN = {
    "ddim_x0": [[-0.07126127, 0.07161397, -0.17795599, -0.02089553],
                [0.04189552, 0.27063790, 0.18568286, -0.07281511]],
    "ddim_eps_eta0": [[1.01525927, -0.57322431, -1.02163780, 1.00553274],
                      [-1.01069415, -1.01383507, 0.83507007, 1.00822890]],
    "ddpm_eps_respaced": [[-0.70958543, 1.0, -0.97080076, -0.50274843],
                          [-0.04042440, 0.98377454, 0.42999622, -0.90726310]],
}


@pytest.mark.parametrize("kind", list(GOLDEN))
def test_sampler_golden_values(kind: str) -> None:
    got = _golden_run(kind)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    expected = torch.tensor(GOLDEN[kind], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- samplers get the distribution right with the ideal denoiser -----------------------------------


@pytest.mark.parametrize("sampler", ["ddim_eta1", "ddim_eta0", "ddpm"])
@pytest.mark.parametrize("param", ["x0", "eps", "v"])
def test_samplers_recover_gaussian_data_with_the_optimal_denoiser(sampler: str, param: str) -> None:
    """For data N(mu, s^2) the Bayes-optimal x0 predictor is known in closed form; every sampler must
    then return samples with mean mu and std s (up to the tiny last-step noise of the reference DDIM
    and the discretisation error of 500 steps, which shrinks the std by ~2%)."""
    mu, s = 1.5, 0.5
    d = Diffusion(make_betas("sqrt_linear", 1000), param)

    def optimal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod[t].to(x.dtype)[:, None]
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"x0": x0, "eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[param]

    g = torch.Generator().manual_seed(1)
    n = 20000
    if sampler == "ddpm":
        x = ddpm_sample(optimal, d, (n, 1), 500, generator=g)
        sd = s
    else:
        eta = 1.0 if sampler == "ddim_eta1" else 0.0
        x = ddim_sample(optimal, d, (n, 1), 500, eta=eta, generator=g)
        # the reference's last DDIM step leaves alpha_bar[0] of signal and (1 - alpha_bar[0]) noise
        a0 = d.alphas_cumprod[0].item()
        mu_out, sd = math.sqrt(a0) * mu, math.sqrt(a0 * s**2 + 1 - a0)
        assert x.mean().item() == pytest.approx(mu_out, abs=0.02)
        mu = mu_out
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(sd, rel=0.04)


def test_sampler_passes_condition_and_generator_is_reproducible() -> None:
    d = Diffusion(make_betas("sqrt_linear", 100), "x0")
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        assert torch.equal(y, torch.tensor([3, 4]))
        return torch.zeros_like(x)

    a = ddim_sample(model, d, (2, 3), 5, model_kwargs={"y": torch.tensor([3, 4])},
                    generator=torch.Generator().manual_seed(5))
    assert calls == [81, 61, 41, 21, 1]
    b = ddim_sample(model, d, (2, 3), 5, model_kwargs={"y": torch.tensor([3, 4])},
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    calls.clear()
    ddpm_sample(model, d, (2, 3), 4, model_kwargs={"y": torch.tensor([3, 4])})
    assert calls == [99, 66, 33, 0]
