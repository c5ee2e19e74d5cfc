"""`rcg sample-reps`: draw representations from the trained RDM into a features Parquet file.

The same `rcg.rdm.sample_reps` serves the image-generation pipeline; this stage only adds the file:
one row per sample, key `sample-%06d`, view `orig`, label = the requested class (null without one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcg.config import Config
from rcg.features import to_table, write_features
from rcg.io import PipelineError, get_logger
from rcg.rdm import load_rdm, sample_reps
from rcg.tracking import stage_run

log = get_logger(__name__)


def run(
    cfg: Config,
    n: int = 1000,
    class_id: int | None = None,
    seed: int = 0,
    out: str = "data/samples/reps.parquet",
    **options: Any,
) -> None:
    """Sample `n` reps (from the class-conditional RDM when `class_id` is given) and write them to `out`."""
    rc = cfg.train_rdm
    if n < 1:
        raise PipelineError(f"--n must be at least 1, got {n}")
    bundle = load_rdm(rc.out_dir, class_cond=class_id is not None)
    log.info(
        "sampling %d reps from %s (%s, %d DDIM steps, eta %g)", n, rc.out_dir,
        f"class {class_id}" if class_id is not None else "unconditional", rc.sample_steps, rc.eta,
    )
    reps = sample_reps(
        bundle, n, class_ids=class_id, steps=rc.sample_steps, eta=rc.eta, temperature=rc.temperature,
        seed=seed, batch_size=rc.eval_batch_size, progress=True,
    )
    table = to_table(
        [f"sample-{i:06d}" for i in range(n)], [class_id] * n, ["orig"] * n, reps.numpy()
    )
    write_features(out, [table])
    log.info("wrote %d sampled reps to %s", n, Path(out))
    with stage_run(cfg, "sample_reps") as tracker:
        tracker.log_metrics({"n": n, "rep_norm_mean": float(reps.norm(dim=1).mean())})
        tracker.log_dict({"out": str(out), "class": class_id, "seed": seed}, "sample_reps.json")
