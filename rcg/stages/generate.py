"""`rcg generate`: RCG generation to PNG files and a grid (paper section 3, Fig. 6, Fig. 7).

- default: RDM samples -> the representation-conditioned generator (unconditional, no labels);
- ``--class C``: samples of the class-conditional RDM for class C -> the same generator;
- ``--from-image IMG``: ``--n`` samples conditioned on IMG's representation (paper Fig. 6);
- ``--interpolate A B``: rows along the line between A's and B's representations (Fig. 7);
- ``--cfg W --cfg-schedule constant|linear``: classifier-free guidance with fake_latent.

Everything is `rcg.generation.RCGGenerator`'s; this stage reads the images and writes
``<out>/00000.png ...`` and ``<out>/grid.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config
from rcg.generation import RCGGenerator
from rcg.io import PipelineError
from rcg.sampling import load_image, save_grid, save_pngs

log = logging.getLogger(__name__)

INTERP_POINTS = 8  # images per interpolation row


def run(
    cfg: Config,
    n: int = 64,
    class_id: int | None = None,
    cfg_scale: float | None = None,
    cfg_schedule: str = "linear",
    steps: int | None = None,
    from_image: str | None = None,
    interpolate: list[str] | None = None,
    seed: int = 0,
    out: str = "outputs/generate",
    **options: Any,
) -> None:
    """Stage entry point; options as `rcg generate --help` lists them."""
    if options:
        log.debug("ignoring options %s", options)
    w = float(cfg_scale or 0.0)
    if n < 1:
        raise PipelineError(f"--n must be >= 1, got {n}")
    paths = interpolate or ([from_image] if from_image else [])
    given = [load_image(p, cfg.data.channels, cfg.data.image_size) for p in paths]  # before any model loads
    gen = RCGGenerator.load(cfg.train_rdm.out_dir, Path(cfg.train_generator.out_dir) / "rep",
                            encoder_dir=cfg.encoder.out_dir if given else None)
    kw: dict[str, Any] = dict(cfg=w, cfg_schedule=cfg_schedule, steps=steps, seed=seed)
    if interpolate:
        rep_a, rep_b = gen.encode(torch.stack(given))
        images = gen.interpolate(rep_a, rep_b, INTERP_POINTS, rows=max(1, n // INTERP_POINTS), **kw)
        nrow, what = INTERP_POINTS, f"interpolation {interpolate[0]} -> {interpolate[1]}"
    elif from_image:
        images = torch.cat([given[0][None], gen.from_images(given[0][None], n, **kw)])  # the source first
        nrow, what = None, f"{n} samples conditioned on {from_image}"
    else:
        images = gen.sample(n, class_ids=class_id, **kw)
        nrow, what = None, f"{n} RCG samples" + ("" if class_id is None else f" of class {class_id}")
    out_dir = Path(out)
    save_pngs(images, out_dir)
    grid = save_grid(images, out_dir / "grid.png", nrow=nrow)
    log.info("%s (cfg %.2f, %s) -> %s/*.png and %s", what, w, cfg_schedule, out_dir, grid)
