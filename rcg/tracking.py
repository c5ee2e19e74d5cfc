"""MLflow tracking: one run per stage invocation, tagged with the git commit, stage and DVC experiment.

Stages call `stage_run(cfg, "train_rdm")` as a context manager and log through the returned
`Tracker`; on non-zero ranks, or with `tracking.enabled: false`, the tracker does nothing, so the
library code never needs to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rcg.config import Config

log = logging.getLogger(__name__)

# Stage -> experiment family: related stages share an MLflow experiment.
FAMILIES = {
    "shard": "data",
    "encoder": "representations",
    "encode": "representations",
    "train_rdm": "rdm",
    "sample_reps": "rdm",
    "train_generator": "generator",
    "generate": "generator",
    "evalnet": "evaluation",
    "evaluate": "evaluation",
    "promote": "registry",
}


def git_commit() -> str:
    """The current git commit (with `-dirty` when the tree has changes), or `unknown`."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config or metrics as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """Thin logging surface over an active MLflow run (or a no-op when tracking is off)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(tags)


def configure(cfg: Config) -> None:
    """Point MLflow at the configured tracking URI (creating the local SQLite folder if needed)."""
    import mlflow

    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)


def ensure_experiment(cfg: Config, name: str) -> str:
    """Create (or find) experiment `name`, with artifacts under tracking.artifact_dir when local."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not cfg.tracking.uri.startswith(("http://", "https://", "databricks")):
            location = Path(cfg.tracking.artifact_dir).resolve().as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, rank: int = 0) -> Iterator[Tracker]:
    """Open an MLflow run for `stage`: params of its block logged once, standard tags set."""
    if not cfg.tracking.enabled or rank != 0:
        yield Tracker(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    configure(cfg)
    family = FAMILIES.get(stage, stage)
    ensure_experiment(cfg, f"{cfg.tracking.experiment_prefix}-{family}")
    tags = {
        "git_commit": git_commit(),
        "stage": stage,
        "preset": cfg.preset,
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
    }
    with mlflow.start_run(run_name=stage, tags=tags):
        block = getattr(cfg, stage, None)
        params = {"preset": cfg.preset}
        if block is not None:
            params.update(flatten(_asdict(block), f"{stage}."))
        # MLflow params are strings of at most 6000 chars; lists become their repr.
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield Tracker(True)


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}
