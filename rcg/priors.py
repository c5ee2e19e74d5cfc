"""Priors over the representation space besides the RDM, and the contrastive posterior.

Two ideas raised about RCG (paper section 3.2 asks for an RDM; its review asked whether anything
simpler would do), made measurable here:

- `hypersphere`: representations drawn uniformly on the set the encoder's standardised
  representations live on, with no training at all. `rcg.encoders.vit.standardize` gives every
  representation zero mean and unit *unbiased* std over its D dimensions, so it lies on the sphere
  of radius sqrt(D - 1) inside the (D - 1)-dimensional subspace orthogonal to the all-ones vector.
  A standard Gaussian, centred per sample, is an isotropic Gaussian in that subspace; rescaled to
  unit unbiased std it is uniform on exactly that sphere. RDM samples reach the image generator as
  they are (rcg.rdm.sample_reps does not re-standardise), and so do these.
- `contrastive_posterior`: instead of its own representation, each training image is conditioned
  on one of a bank of prior samples, drawn with probability softmax(cos(rep, bank) / temperature).
  The temperature sets how much the drawn sample tells about the image: at 0 the bank entry nearest
  to the image's representation, at infinity any entry uniformly (nothing). `information_bound`
  measures it per image as log(bank) - H(softmax): the bound on the mutual information between the
  image and the index drawn (the index carries at most log(bank) nats; the softmax's entropy is what
  it leaves open).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def hypersphere(n: int, dim: int, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """`n` representations [n, dim] (float32, CPU) uniform on the standardised set: per-sample mean 0
    and unbiased std 1 (module docstring). Drawn from `seed`, else from `generator`, else from torch's
    global RNG (what a training run saves in its checkpoints)."""
    if dim < 2:
        raise ValueError(f"a standardised representation needs at least 2 dimensions, got {dim}")
    g = torch.Generator().manual_seed(seed) if seed is not None else generator
    x = torch.randn((n, dim), generator=g, dtype=torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    return (x / x.std(dim=1, keepdim=True)).float()


def posterior_log_probs(reps: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """log softmax(cos(reps_i, bank_j) / temperature) over the bank: [B, M] (float32)."""
    cos = F.normalize(reps.float(), dim=1) @ F.normalize(bank.float(), dim=1).t()  # (B, M)
    return torch.log_softmax(cos / temperature, dim=1)


def information_bound(log_probs: Tensor) -> Tensor:
    """log(M) - H(p) per row of [B, M] log-probabilities, in nats: 0 for a uniform choice, log(M)
    for a certain one."""
    entropy = -(log_probs.exp() * log_probs).sum(dim=1)  # exp(log p) = 0 where p underflows: no NaN
    return math.log(log_probs.shape[1]) - entropy


def contrastive_posterior(reps: Tensor, bank: Tensor, temperature: float,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For each representation [B, D], one bank entry [M, D] drawn by the contrastive softmax (module
    docstring); returns (the drawn entries [B, D], each row's information bound [B]). The draw uses
    `generator` (CPU), else torch's global RNG."""
    log_probs = posterior_log_probs(reps.cpu(), bank.cpu(), temperature)
    idx = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)  # (B,)
    return bank.cpu()[idx], information_bound(log_probs)
