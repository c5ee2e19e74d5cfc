"""How much the cached reference statistics save per generation mode (rcg.metrics.fidelity).

Scores 2,000 "generated" images against 10,000 "real" ones (the default preset's sizes) with the
evalnet extractor through torch-fidelity, first with the reference featurised from scratch (what
every mode would pay without the cache), then with the reference read from the cache (what every
mode after the first pays). Images are smooth random blobs; the classifier is untrained, so only
the timing means anything. The last line prints uncached / cached time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from rcg.metrics.evalnet import EvalNet, save_evalnet
from rcg.metrics.extractors import extractor_setup
from rcg.metrics.fidelity import UInt8Images, fidelity_metrics, to_uint8


def blobs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    return torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear")


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_evalnet(EvalNet().eval(), Path(tmp) / "evalnet")
        name, path = extractor_setup("evalnet", weights)
        fake, real = UInt8Images(to_uint8(blobs(2000, 0))), UInt8Images(to_uint8(blobs(10000, 1)))
        kw = dict(extractor=name, weights=path, cache_root=Path(tmp) / "cache", reference_cache="ref")
        t0 = time.perf_counter()
        fidelity_metrics(fake, real, **kw)  # featurises and caches the reference
        uncached = time.perf_counter() - t0
        t0 = time.perf_counter()
        fidelity_metrics(fake, real, **kw)  # reads the reference from the cache
        cached = time.perf_counter() - t0
    print(f"one mode, reference featurised: {uncached:.2f} s; reference cached: {cached:.2f} s")
    print(f"uncached/cached time ratio: {uncached / cached:.2f}")


if __name__ == "__main__":
    main()
