"""MLflow tracking: one run per stage invocation, tagged with the git commit, stage and DVC experiment.

Stages call `stage_run(cfg, "train_rdm")` as a context manager and log through the returned
`Tracker`; on non-zero ranks, or with `tracking.enabled: false`, the tracker does nothing, so the
library code never needs to check.

The store is `MLFLOW_TRACKING_URI` when the environment sets it, else `tracking.uri`. A store that
cannot be reached or written is found within seconds (`preflight`, and the start of each run make
MLflow's HTTP calls without retries and with a short timeout) and handled as `tracking.on_error`
says: `fail` stops with one line naming the URI, `continue` warns once and goes on untracked. After
the start, MLflow's own retries apply, so a server restart during a long run costs no training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from rcg.config import Config, TrackingConfig
from rcg.io import PipelineError

log = logging.getLogger(__name__)

# Seconds one MLflow HTTP request may take while a run starts (then MLflow's defaults apply again).
SETUP_TIMEOUT_S = 5

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
    """Thin logging surface over an active MLflow run (or a no-op when tracking is off).

    A failed call either raises a PipelineError naming the URI (`on_error` "fail") or turns the
    tracker off with one warning (`on_error` "continue").
    """

    def __init__(self, active: bool, uri: str = "", on_error: str = "fail") -> None:
        self.active = active
        self.uri, self.on_error = uri, on_error
        self.started = active  # an MLflow run is open and must be ended

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._failed(what, e)

    def _failed(self, what: str, e: Exception) -> None:
        self.active = False
        msg = f"tracking: {what} (MLflow at {self.uri}) failed ({failure_reason(e)})"
        if self.on_error == "continue":
            log.warning("%s; tracking.on_error is continue: the stage goes on without tracking", msg)
            return
        raise PipelineError(f"{msg}; set tracking.on_error=continue to go on without tracking") from e

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            self._call("logging metrics", mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            self._call(f"logging {path}", mlflow.log_artifact, str(path), artifact_path=artifact_path)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        if self.active:
            import mlflow

            self._call(f"logging {name}", mlflow.log_dict, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            self._call("setting tags", mlflow.set_tags, tags)

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run; after a failure (or with the stage failing) quietly and quickly."""
        if not self.started:
            return
        self.started = False
        if self.active and status == "FINISHED":
            import mlflow

            self._call("ending the run", mlflow.end_run, status)
        else:
            _end_quietly(status)


def failure_reason(e: BaseException) -> str:
    """What went wrong with the store, in a few words (MLflow's own messages run over many lines)."""
    cause: BaseException | None = e
    innermost = e
    while cause is not None:
        if "Timeout" in type(cause).__name__ or isinstance(cause, TimeoutError):
            return f"no answer within {SETUP_TIMEOUT_S} s"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        innermost, cause = cause, cause.__cause__ or cause.__context__
    for exc in (innermost, e):  # the root cause says it shortest (e.g. "too many 502 error responses")
        text = " ".join(str(exc).split())
        if text and len(text) <= 200:
            return text
    text = " ".join(str(e).split())
    return text[:200] + "..."


@contextlib.contextmanager
def fast_requests() -> Iterator[None]:
    """MLflow HTTP requests without retries and with a short timeout, unless the environment sets
    its own (MLflow's defaults retry a dead server for about 4 minutes)."""
    mine = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(SETUP_TIMEOUT_S)}
    mine = {k: v for k, v in mine.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)


def tracking_uri(tc: TrackingConfig) -> str:
    """The store runs go to: MLFLOW_TRACKING_URI when the environment sets it (it wins), else tracking.uri."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env and env != tc.uri:
        log.info("tracking: MLFLOW_TRACKING_URI=%s from the environment wins over tracking.uri (%s)", env, tc.uri)
    return env or tc.uri


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def local_store_problem(uri: str) -> str | None:
    """For a SQLite or file store: why its folder cannot be used, or None (the folder is made here)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
    elif uri.startswith("file:"):
        folder = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    elif "://" not in uri:
        folder = Path(uri)
    else:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {folder}: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def store_problem(uri: str) -> str | None:
    """Why the MLflow store at `uri` cannot be used, found within seconds; None when it answers."""
    problem = local_store_problem(uri)
    if problem is not None:
        return problem
    from mlflow import MlflowClient

    try:
        with fast_requests():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        return failure_reason(e)
    return None


def _unusable(tc: TrackingConfig, uri: str, problem: str) -> str:
    where = "MLFLOW_TRACKING_URI" if uri != tc.uri else "tracking.uri"
    fix = f"start the server or fix {where}" if _is_remote(uri) else f"fix {where}"
    return (f"tracking: the MLflow store {uri} cannot be used ({problem}); {fix}, or set "
            "tracking.on_error=continue to run without tracking (tracking.enabled=false: never track)")


def _give_up(tc: TrackingConfig, uri: str, problem: str) -> None:
    """Raise (on_error "fail") or warn once (on_error "continue") about an unusable store."""
    if tc.on_error != "continue":
        raise PipelineError(_unusable(tc, uri, problem))
    log.warning("tracking: the MLflow store %s cannot be used (%s); tracking.on_error is continue: "
                "this stage runs without tracking", uri, problem)


def preflight(tc: TrackingConfig) -> TrackingConfig:
    """Check the store before a stage does any work; the tracking settings the stage runs with.

    The URI becomes the one in use (MLFLOW_TRACKING_URI wins); an unusable store raises a
    PipelineError (`on_error` "fail") or turns tracking off with a warning (`on_error` "continue").
    """
    if not tc.enabled:
        return tc
    uri = tracking_uri(tc)
    problem = store_problem(uri)
    if problem is None:
        return replace(tc, uri=uri)
    _give_up(tc, uri, problem)
    return replace(tc, uri=uri, enabled=False)


def configure(cfg: Config) -> str:
    """Point MLflow at the store in use (creating a local store's folder); returns its URI."""
    import mlflow

    uri = tracking_uri(cfg.tracking)
    problem = local_store_problem(uri)
    if problem is not None:
        raise PipelineError(_unusable(cfg.tracking, uri, problem))
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(cfg: Config, name: str) -> str:
    """Create (or find) experiment `name`, with artifacts under tracking.artifact_dir when local."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not _is_remote(mlflow.get_tracking_uri()):
            location = Path(cfg.tracking.artifact_dir).resolve().as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _start_run(cfg: Config, stage: str) -> Tracker:
    """Open the stage's MLflow run (params of its block logged once, standard tags set), failing fast."""
    import mlflow

    tc = cfg.tracking
    uri = tracking_uri(tc)
    try:
        problem = local_store_problem(uri)
        if problem is not None:
            raise PipelineError(problem)
        with fast_requests():
            mlflow.set_tracking_uri(uri)
            ensure_experiment(cfg, f"{tc.experiment_prefix}-{FAMILIES.get(stage, stage)}")
            tags = {"git_commit": git_commit(), "stage": stage, "preset": cfg.preset,
                    "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
            mlflow.start_run(run_name=stage, tags=tags)
            block = getattr(cfg, stage, None)
            params = {"preset": cfg.preset}
            if block is not None:
                params.update(flatten(_asdict(block), f"{stage}."))
            # MLflow params are strings of at most 6000 chars; lists become their repr.
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
    except Exception as e:
        if mlflow.active_run() is not None:
            _end_quietly("FAILED")
        _give_up(tc, uri, failure_reason(e))
        return Tracker(False, uri, tc.on_error)
    return Tracker(True, uri, tc.on_error)


def _end_quietly(status: str) -> None:
    """End the active run without waiting on, or failing for, a store that is gone."""
    import mlflow

    with contextlib.suppress(Exception), fast_requests():
        mlflow.end_run(status)


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, rank: int = 0) -> Iterator[Tracker]:
    """Open an MLflow run for `stage` (rank 0, tracking on) and yield its Tracker; the run ends
    FINISHED, or FAILED when the stage raises."""
    if not cfg.tracking.enabled or rank != 0:
        yield Tracker(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tracker = _start_run(cfg, stage)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}
