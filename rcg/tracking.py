"""MLflow tracking: one parent run per pipeline run, one nested run per stage invocation.

Stages call `stage_run(cfg, "train_rdm")` as a context manager and log through the returned
`Tracker`; on non-zero ranks, or with `tracking.enabled: false`, the tracker does nothing, so the
library code never needs to check. Tracking records runs; it never changes what a stage computes.

Every stage of one pipeline run (a `dvc repro`, a `dvc exp run`, a Prefect flow run) is a separate
process, so they meet through an identity they share (`pipeline_run`): `RCG_PIPELINE_RUN` when the
environment sets it (the Prefect flow passes its flow run id), else the git commit and a hash of the
resolved config, the same for every stage that reads one params.yaml. The first stage creates the
parent run, tagged with that identity; the others find it. A stage that already finished under the
latest parent starts a new one (the same workspace, run again: a new pipeline run). A stage given a
`resume_key` (its checkpoints' fingerprint) reopens its own unfinished run under the same parent,
so a resumed stage continues its MLflow run and its loss curve stays whole.

The store is `MLFLOW_TRACKING_URI` when the environment sets it, else `tracking.uri`. A store that
cannot be reached or written is found within seconds (`preflight`, and the start of each run make
MLflow's HTTP calls without retries and with a short timeout) and handled as `tracking.on_error`
says: `fail` stops with one line naming the URI, `continue` warns once and goes on untracked. After
the start, MLflow's own retries apply, so a server restart during a long run costs no training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rcg.config import Config, TrackingConfig
from rcg.io import PipelineError

log = logging.getLogger(__name__)

# Seconds one MLflow HTTP request may take while a run starts (then MLflow's defaults apply again).
SETUP_TIMEOUT_S = 5

# The one experiment of the pipeline's runs (`<tracking.experiment_prefix>-pipeline`): MLflow nests a
# stage's run under its pipeline run only within one experiment.
EXPERIMENT = "pipeline"
PIPELINE_ENV = "RCG_PIPELINE_RUN"  # the pipeline run's identity, when its orchestrator names one
# Tags this module sets (MLflow's own: mlflow.parentRunId, mlflow.runName).
TAG_PIPELINE = "rcg.pipeline"  # parent and stage runs: the pipeline run's identity
TAG_GENERATION = "rcg.generation"  # parent: 0, 1, ... for the pipeline runs of one identity
TAG_RESUME = "rcg.resume_key"  # stage runs: stage, condition and checkpoint identity, hashed
TAG_RESUMED = "rcg.resumed"  # stage runs: how many times the run was reopened
SAFE_ID = re.compile(r"[^A-Za-z0-9._:@/+-]")  # what may appear in an MLflow search filter's string


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


def digest(obj: Any) -> str:
    """A short stable hash of plain data (dataclasses included)."""
    plain = _asdict(obj) or obj
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PipelineRun:
    """Which pipeline run a stage belongs to: the identity its stages share, and how it was found."""

    identity: str  # the parent run's TAG_PIPELINE
    source: str  # PIPELINE_ENV, or "workspace" (git commit + resolved config)
    label: str  # what the parent run's name says


def pipeline_run(cfg: Config) -> PipelineRun:
    """The identity every stage of one pipeline run shares (module docstring).

    Without `RCG_PIPELINE_RUN`, the git commit (HEAD, not its dirty flag: the stages themselves
    change tracked files such as dvc.lock) and the resolved config without its tracking block (so
    a one-off `--preset` run has one too). DVC_EXP_NAME only names the run: an interrupted
    `dvc exp run` continued by another `dvc exp run` is one pipeline run under two names.
    """
    exp = os.environ.get("DVC_EXP_NAME", "").strip()
    given = os.environ.get(PIPELINE_ENV, "").strip()
    if given:
        return PipelineRun(SAFE_ID.sub("_", given)[:200], PIPELINE_ENV, exp or given)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "nogit"
    values = {k: v for k, v in cfg.to_dict().items() if k != "tracking"}
    config_id = digest(values)
    return PipelineRun(f"{head[:12]}-{config_id}", "workspace",
                       exp or f"{cfg.preset} @{head[:7]} config {config_id[:8]}")


def run_name(stage: str, condition: str = "") -> str:
    """A stage run's name: the stage and its condition, e.g. `train_generator (rep)`."""
    return f"{stage} ({condition})" if condition else stage


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

    `run_id` is the stage's run, `parent_id` its pipeline run (module docstring). A failed call
    either raises a PipelineError naming the URI (`on_error` "fail") or turns the tracker off with
    one warning (`on_error` "continue").
    """

    def __init__(self, active: bool, uri: str = "", on_error: str = "fail", run_id: str = "",
                 parent_id: str = "") -> None:
        self.active = active
        self.uri, self.on_error = uri, on_error
        self.run_id, self.parent_id = run_id, parent_id
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

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """An image file as the run's image `key` at `step` (the run's image view, over training)."""
        if self.active and Path(path).exists():
            self._call(f"logging {path} as image {key}", _log_image, path, key, step)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows of a table (one dict per row, missing cells empty) as the run's table `name`."""
        if self.active and rows:
            import mlflow
            import pandas as pd

            self._call(f"logging table {name}", mlflow.log_table, pd.DataFrame(rows), artifact_file=name)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        if self.active:
            import mlflow

            self._call(f"logging {name}", mlflow.log_dict, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            self._call("setting tags", mlflow.set_tags, tags)

    def log_pipeline(self, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        """Metrics (and tags) of the pipeline run: what the experiment view compares runs by."""
        if self.active and self.parent_id:
            self._call("logging to the pipeline run", _log_to_run, self.parent_id, metrics, tags or {})

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run; after a failure (or with the stage failing) quietly and quickly.
        The pipeline run takes the stage's status once no other stage of it is running."""
        if not self.started:
            return
        self.started = False
        if self.active and status == "FINISHED":
            import mlflow

            self._call("ending the run", mlflow.end_run, status)
        else:
            _end_quietly(status)
        if self.parent_id:
            with contextlib.suppress(Exception), fast_requests():
                _settle_parent(self.parent_id, status)


def _log_image(path: str | Path, key: str, step: int) -> None:
    import mlflow
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mlflow.log_image(image, key=key, step=int(step), synchronous=True)


def _log_to_run(run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                             tags=[RunTag(k, str(v)) for k, v in tags.items()])


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
            MlflowClient(absolute(uri)).search_experiments(max_results=1)
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
    uri = tracking_uri(cfg.tracking)
    problem = local_store_problem(uri)
    if problem is not None:
        raise PipelineError(_unusable(cfg.tracking, uri, problem))
    use_store(uri)
    return uri


def absolute(uri: str) -> str:
    """A SQLite URI with its path made absolute: MLflow keeps one store per URI string for the
    process, so a relative one would keep meaning the folder it was first used in."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def use_store(uri: str) -> None:
    """Point MLflow at `uri` in this process. MLflow also writes the URI into MLFLOW_TRACKING_URI;
    that is put back, so the environment keeps meaning what the user set (`tracking_uri`)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(absolute(uri))
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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


def _runs(client: Any, exp_id: str, where: str, newest_first: bool = False, limit: int = 1000) -> list[Any]:
    order = "DESC" if newest_first else "ASC"
    return client.search_runs([exp_id], filter_string=where, order_by=[f"attributes.start_time {order}"],
                              max_results=limit)


def _children(parent_id: str, more: str = "") -> str:
    """A search filter for the stage runs of a pipeline run (and `more`)."""
    return f"tags.mlflow.parentRunId = '{parent_id}'" + (f" and {more}" if more else "")


def _parents(client: Any, exp_id: str, identity: str) -> list[Any]:
    """The parent runs of `identity`: the latest generation first, the earliest of each first."""
    runs = _runs(client, exp_id, f"tags.`{TAG_PIPELINE}` = '{identity}'")
    return sorted(runs, key=lambda r: (-_generation(r), r.info.start_time, r.info.run_id))


def _generation(run: Any) -> int:
    return int(run.data.tags.get(TAG_GENERATION, "0"))


def _parent_name(pipeline: PipelineRun, generation: int) -> str:
    return f"pipeline {pipeline.label}" + (f" #{generation + 1}" if generation else "")


def _create_parent(client: Any, exp_id: str, cfg: Config, pipeline: PipelineRun, generation: int,
                   commit: str) -> str:
    """A new pipeline run: tagged with its identity, the whole resolved config as its params."""
    from mlflow.entities import Param

    how = ("RCG_PIPELINE_RUN" if pipeline.source == PIPELINE_ENV
           else "the git commit and the resolved config, shared by the stages of one dvc repro")
    tags = {TAG_PIPELINE: pipeline.identity, TAG_GENERATION: str(generation), "rcg.pipeline_source": pipeline.source,
            "git_commit": commit, "preset": cfg.preset, "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
            "mlflow.note.content": f"One rcg pipeline run (identity `{pipeline.identity}`, from {how}); "
                                   "its stages are the nested runs."}
    run_id = client.create_run(exp_id, tags=tags, run_name=_parent_name(pipeline, generation)).info.run_id
    values = flatten({k: v for k, v in cfg.to_dict().items() if k != "tracking"})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in values.items()])
    return run_id


def find_parent(client: Any, exp_id: str, cfg: Config, pipeline: PipelineRun, name: str, commit: str,
                key: str = "") -> str:
    """The parent run of `pipeline` that the stage run `name` belongs to, created when missing.

    The latest parent of the identity, unless it already holds a finished `name` and no unfinished
    run with the resume `key` (then this is a new pipeline run of the same workspace: a new parent).
    Stages started side by side may each create one; every stage then keeps the earliest and the
    others are deleted.
    """
    parents = _parents(client, exp_id, pipeline.identity)
    generation = 0
    if parents:
        latest = parents[0]
        finished = f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'"
        if (key and _reopen(client, exp_id, latest.info.run_id, key) is not None) or not _runs(
                client, exp_id, _children(latest.info.run_id, finished), limit=1):
            exp_name = os.environ.get("DVC_EXP_NAME", "")
            if exp_name and latest.data.tags.get("dvc_exp") != exp_name:  # continued by another dvc exp run
                client.set_tag(latest.info.run_id, "dvc_exp", exp_name)
                client.update_run(latest.info.run_id, name=_parent_name(replace(pipeline, label=exp_name),
                                                                        _generation(latest)))
            return latest.info.run_id
        generation = _generation(latest) + 1
    mine = _create_parent(client, exp_id, cfg, pipeline, generation, commit)
    same = [r.info.run_id for r in _parents(client, exp_id, pipeline.identity)
            if _generation(r) == generation]
    if same and same[0] != mine:
        client.delete_run(mine)
        return same[0]
    return mine


def _reopen(client: Any, exp_id: str, parent_id: str, key: str) -> Any:
    """The stage's unfinished (running when killed, failed, killed) run with `key`, or None."""
    runs = _runs(client, exp_id, _children(parent_id, f"tags.`{TAG_RESUME}` = '{key}'"), newest_first=True, limit=1)
    return runs[0] if runs and runs[0].info.status != "FINISHED" else None


def _open_stage_run(cfg: Config, exp_id: str, stage: str, condition: str, resume_key: Any) -> tuple[str, str]:
    """Start (or reopen) the stage's run under its pipeline run; returns (run id, parent run id)."""
    import mlflow
    from mlflow import MlflowClient

    client, name, commit = MlflowClient(), run_name(stage, condition), git_commit()
    key = digest([name, resume_key]) if resume_key is not None else ""
    parent = find_parent(client, exp_id, cfg, pipeline_run(cfg), name, commit, key)
    old = _reopen(client, exp_id, parent, key) if key else None
    # A run of this stage still marked running was killed: one pipeline run runs a stage once at a time.
    for r in _runs(client, exp_id, _children(parent, f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'")):
        if old is None or r.info.run_id != old.info.run_id:
            client.set_terminated(r.info.run_id, "KILLED")
    tags = {"git_commit": commit, "stage": stage, "preset": cfg.preset, "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
    tags.update({"condition": condition} if condition else {})
    tags.update({TAG_RESUME: key} if key else {})
    if old is not None:
        tags[TAG_RESUMED] = str(int(old.data.tags.get(TAG_RESUMED, "0")) + 1)
        run = mlflow.start_run(run_id=old.info.run_id, tags=tags)
        log.info("tracking: %s continues its MLflow run %s (%s)", name, run.info.run_id, old.info.status.lower())
    else:
        run = mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags)
    block = getattr(cfg, stage, None)
    params = {"preset": cfg.preset, **flatten(_asdict(block), f"{stage}.")}
    logged = old.data.params if old is not None else {}
    # MLflow params are strings of at most 6000 chars (lists become their repr), and never change.
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items() if k not in logged})
    client.update_run(parent, status="RUNNING")
    return run.info.run_id, parent


def _settle_parent(parent_id: str, status: str) -> None:
    """The pipeline run ends with its last stage: `status` once none of its stages is running."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp_id = client.get_run(parent_id).info.experiment_id
    if not _runs(client, exp_id, _children(parent_id, "attributes.status = 'RUNNING'"), limit=1):
        client.set_terminated(parent_id, status)


def _start_run(cfg: Config, stage: str, condition: str = "", resume_key: Any = None) -> Tracker:
    """Open the stage's MLflow run under its pipeline run (params of its block logged once,
    standard tags set), failing fast."""
    import mlflow

    tc = cfg.tracking
    uri = tracking_uri(tc)
    try:
        problem = local_store_problem(uri)
        if problem is not None:
            raise PipelineError(problem)
        with fast_requests():
            use_store(uri)
            exp_id = ensure_experiment(cfg, f"{tc.experiment_prefix}-{EXPERIMENT}")
            run_id, parent_id = _open_stage_run(cfg, exp_id, stage, condition, resume_key)
    except Exception as e:
        if mlflow.active_run() is not None:
            _end_quietly("FAILED")
        _give_up(tc, uri, failure_reason(e))
        return Tracker(False, uri, tc.on_error)
    return Tracker(True, uri, tc.on_error, run_id, parent_id)


def _end_quietly(status: str) -> None:
    """End the active run without waiting on, or failing for, a store that is gone."""
    import mlflow

    with contextlib.suppress(Exception), fast_requests():
        mlflow.end_run(status)


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, rank: int = 0, *, condition: str = "",
              resume_key: Any = None) -> Iterator[Tracker]:
    """Open an MLflow run for `stage` (rank 0, tracking on) under its pipeline run and yield its
    Tracker; the run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the stage raises.

    `condition` names the variant (`train_generator (rep)`); `resume_key` (the stage's checkpoint
    fingerprint, or the values that make it) lets a rerun of an unfinished stage reopen its run
    instead of starting another; None: every invocation is a new run.
    """
    if not cfg.tracking.enabled or rank != 0:
        yield Tracker(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tracker = _start_run(cfg, stage, condition, resume_key)
    try:
        yield tracker
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}
