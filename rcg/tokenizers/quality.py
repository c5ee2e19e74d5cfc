"""How good a tokenizer is for MAGE: what survives the round trip images -> ids -> images.

A generator over ids can be no better than the tokenizer's decoder, so metrics/tokenizer.json
reports, on val images the tokenizer never trained on:
- reconstruction error: MSE of pixels in [0, 1] and the PSNR of that mean (10 log10(1 / MSE));
- the Frechet distance of the reconstructions to the real images under the evaluation network
  (the `evaluate` stage's extractor, rcg.metrics.extractors), the floor MAGE's `fd` cannot go below;
- codebook usage: the perplexity exp(H) of the code frequencies (the number of equally used codes
  with the same entropy; K at best) and the share of codes used at all.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcg.tokenizers.vqgan import VQGAN

log = logging.getLogger(__name__)


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """Perplexity of the code frequencies `counts` [K] and the share of codes used."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "used_share": float((counts > 0).double().mean()),
            "codebook_size": len(counts)}


@torch.no_grad()
def round_trip(vq: VQGAN, data_cfg: Any, n_images: int = 0, batch_size: int = 500,
               keep_images: bool = False) -> dict[str, Any]:
    """Encode and decode the first `n_images` val images (0: all): squared error, code counts and,
    with `keep_images`, both image sets as uint8 (for the Frechet distance)."""
    from rcg.data.loader import make_loader
    from rcg.metrics.fidelity import to_uint8

    device = next(vq.parameters()).device
    counts = torch.zeros(vq.codebook_size, dtype=torch.long)
    sq, pixels, seen = 0.0, 0, 0
    real, recon = [], []
    for batch in make_loader(data_cfg, "val", "once", batch_size=batch_size):
        x = batch["image"][: (n_images - seen) if n_images else None].to(device)
        ids = vq.encode(x)
        y = vq.decode(ids)
        sq += float(((y - x) ** 2).double().sum())
        pixels += x.numel()
        seen += len(x)
        counts += torch.bincount(ids.flatten().cpu(), minlength=vq.codebook_size)
        if keep_images:
            real.append(to_uint8(x))
            recon.append(to_uint8(y))
        if n_images and seen >= n_images:
            break
    return {"images": seen, "sq_error": sq, "pixels": pixels, "counts": counts,
            "real": torch.cat(real) if real else None, "recon": torch.cat(recon) if recon else None}


def reconstruction_fd(real: Tensor, recon: Tensor, evalnet_weights: str | Path, seed: int = 0,
                      batch_size: int = 200) -> dict[str, Any]:
    """Frechet distance (and KID, precision, recall) of reconstructions against the real images under
    the evaluation network; the feature cache is private to this call (a temporary folder)."""
    from rcg.metrics.extractors import extractor_setup
    from rcg.metrics.fidelity import UInt8Images, fidelity_metrics

    name, weights = extractor_setup("evalnet", evalnet_weights)
    with tempfile.TemporaryDirectory(prefix="rcg-tokenizer-fd-") as cache:
        row = fidelity_metrics(UInt8Images(recon), UInt8Images(real), extractor=name, weights=weights,
                               cache_root=cache, reference_cache="val-real", batch_size=batch_size, seed=seed,
                               isc=False)
    return {"extractor": name, **{k: row[k] for k in ("fd", "kid", "precision", "recall") if k in row}}


NO_EVALNET = "no evaluation network at {path} (the evalnet stage writes it): the Frechet distance is left out"


def tokenizer_report(vq: VQGAN, data_cfg: Any, evalnet_weights: str | Path, n_images: int = 0,
                     batch_size: int = 500, seed: int = 0) -> dict[str, Any]:
    """metrics/tokenizer.json's quality figures on the val split (module docstring)."""
    t0 = time.perf_counter()
    have_fd = Path(evalnet_weights).is_file()
    rt = round_trip(vq, data_cfg, n_images, batch_size, keep_images=have_fd)
    if rt["images"] == 0:
        from rcg.io import PipelineError

        raise PipelineError(f"{data_cfg.shards_dir}/val: no val images to score the tokenizer on")
    mse = rt["sq_error"] / rt["pixels"]
    out: dict[str, Any] = {
        "val_images": rt["images"], "mse": mse, "psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
        "usage": codebook_usage(rt["counts"]),
    }
    if have_fd and rt["images"] >= 2:
        out["fidelity"] = reconstruction_fd(rt["real"], rt["recon"], evalnet_weights, seed)
    else:
        why = NO_EVALNET.format(path=evalnet_weights) if not have_fd else "fewer than 2 val images"
        out["skipped"] = {"fd": why}
        log.info("tokenizer: %s", why)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


__all__ = ["NO_EVALNET", "codebook_usage", "reconstruction_fd", "round_trip", "tokenizer_report"]
