"""`rcg sample-reps`: draw representations from the trained RDM into a features Parquet file.

The same `rcg.generation.RepGenerator` feeds the image generator, with the sampler settings saved
in the RDM's JSON (train_rdm.sample_steps / eta / temperature when it was trained); this stage only
adds the file: one row per sample, key `sample-%06d`, view `orig`, label = the requested class
(null without one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rcg.config import Config
from rcg.features import to_table, write_features
from rcg.generation import RepGenerator
from rcg.io import PipelineError
from rcg.tracking import stage_run

log = logging.getLogger(__name__)


def run(
    cfg: Config,
    n: int = 1000,
    class_id: int | None = None,
    seed: int = 0,
    out: str = "data/samples/reps.parquet",
    **options: Any,
) -> None:
    """Sample `n` reps (from the class-conditional RDM when `class_id` is given) and write them to `out`."""
    if n < 1:
        raise PipelineError(f"--n must be at least 1, got {n}")
    rdm = RepGenerator.load(cfg.train_rdm.out_dir)
    s = rdm.settings
    log.info("sampling %d reps from %s (%s, %s DDIM steps, eta %s, temperature %s)", n, cfg.train_rdm.out_dir,
             f"class {class_id}" if class_id is not None else "unconditional", s.get("steps"), s.get("eta"),
             s.get("temperature"))
    # The batch size only bounds memory (train_rdm.eval_batch_size, as the stage's own evaluation).
    reps = rdm.sample(n, class_ids=class_id, seed=seed, batch_size=cfg.train_rdm.eval_batch_size, progress=True)
    table = to_table([f"sample-{i:06d}" for i in range(n)], [class_id] * n, ["orig"] * n, reps.numpy())
    write_features(out, [table])
    log.info("wrote %d sampled reps to %s", n, Path(out))
    with stage_run(cfg, "sample_reps") as tracker:
        tracker.log_metrics({"n": n, "rep_norm_mean": float(reps.norm(dim=1).mean())})
        tracker.log_dict({"out": str(out), "class": class_id, "seed": seed, "sampling": s}, "sample_reps.json")
