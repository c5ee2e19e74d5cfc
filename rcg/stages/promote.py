"""`rcg promote`: register the trained RCG generator in MLflow and move `@champion` only if it is better.

The MLflow registry holds the servable generator (rcg.serving) under aliases (docs/design.md).
Without `--version`, the current models (models/rdm, models/generator/rep) are logged as a new
pyfunc version in a run of the pipeline run, with the evaluation table's numbers as version tags
(rcg.serving.log_generator); then, with or without `--version`, `@champion` moves to that version
only when its fd is lower than the champion's.
Writes metrics/promote.json (the decision) so DVC can run this stage after `evaluate`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rcg.config import Config
from rcg.io import write_json

log = logging.getLogger(__name__)

DECISION_FILE = "metrics/promote.json"


def run(cfg: Config, version: str | None = None, **options: object) -> None:
    out = Path(DECISION_FILE)
    if not cfg.tracking.enabled:
        log.warning("promote: tracking.enabled is false, nothing registered (%s says so)", out)
        write_json(out, {"promoted": False, "reason": "tracking.enabled is false"})
        return
    from mlflow import MlflowClient

    from rcg.serving import log_generator, promote
    from rcg.tracking import configure, stage_run

    name = cfg.tracking.registered_model
    if version is None:
        with stage_run(cfg, "promote") as tracker:
            info = log_generator(cfg, register=True)
            version = str(info.registered_model_version)
            log.info("promote: registered %s version %s (%s)", name, version, info.model_uri)
            decision = promote(MlflowClient(), name, version)
            tags = {"registered_model": name, "registered_version": version,
                    "champion": "yes" if decision["promoted"] else "no"}
            tracker.set_tags(tags)
            tracker.log_pipeline({}, tags)  # the pipeline run says which version it registered
    else:
        configure(cfg)  # the store stage_run would use
        decision = promote(MlflowClient(), name, version)
    write_json(out, decision)
    log.info("promote: %s; decision in %s", decision["reason"], out)
