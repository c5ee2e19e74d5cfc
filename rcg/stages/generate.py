"""`rcg generate`: RCG generation to PNG files and a grid (DESIGN.md step 4).

- default: RDM samples -> the representation-conditioned generator (unconditional, no labels);
- ``--class C``: samples of the class-conditional RDM for class C -> the same generator;
- ``--from-image IMG``: ``--n`` samples conditioned on IMG's representation (paper Fig. 6);
- ``--interpolate A B``: rows along the line between A's and B's representations (Fig. 7);
- ``--cfg W --cfg-schedule constant|linear``: classifier-free guidance with fake_latent.

Writes ``<out>/00000.png ...`` and ``<out>/grid.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rcg.config import Config
from rcg.io import PipelineError, get_logger
from rcg.sampling import (
    generate_from_images,
    generate_images,
    interpolate as interpolate_reps,
    load_image,
    save_grid,
    save_pngs,
)

log = get_logger(__name__)


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
    out_dir = Path(out)
    kw = dict(cfg_scale=w, cfg_schedule=cfg_schedule, steps=steps, seed=seed)
    if interpolate:
        a, b = (load_image(p, cfg) for p in interpolate)
        cols = 8
        rows = max(1, n // cols)
        images = interpolate_reps(cfg, a, b, n_steps=cols, rows=rows, **kw)
        nrow, what = cols, f"interpolation {interpolate[0]} -> {interpolate[1]}"
    elif from_image:
        img = load_image(from_image, cfg)
        images = generate_from_images(cfg, img[None], n, **kw)
        images = torch.cat([img[None], images])  # the source image first
        nrow, what = None, f"{n} samples conditioned on {from_image}"
    elif class_id is not None:
        images = generate_images(cfg, "rcg_class", n, class_ids=torch.full((n,), class_id), **kw)
        nrow, what = None, f"{n} RCG samples of class {class_id}"
    else:
        images = generate_images(cfg, "rcg", n, **kw)
        nrow, what = None, f"{n} RCG samples"
    save_pngs(images, out_dir)
    grid = save_grid(images, out_dir / "grid.png", nrow=nrow)
    log.info("%s (cfg %.2f, %s) -> %s/*.png and %s", what, w, cfg_schedule, out_dir, grid)
