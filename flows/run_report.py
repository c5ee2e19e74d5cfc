"""What one pipeline run shows in the Prefect UI at its end: a Markdown artifact with the evaluation
table (`rcg report`'s, rcg/metrics/report.py), what each stage did, and the MLflow runs it made.

The MLflow runs of a pipeline run are found by their tags (rcg/tracking.py): every stage run
carries `dvc_exp`, the DVC experiment the flow saves the workspace as, and `stage`; their parent run
(one per flow run, the flow run's id as its identity) carries `dvc_exp` too. Stages that DVC
found up to date did not run now, so their runs belong to the pipeline run that last ran them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import dvc_cli as dvc_mod
from rcg.config import TrackingConfig
from rcg.io import read_json
from rcg.metrics.report import format_report

FAILED, NOT_RUN = "failed", "not run"
EARLIER = ("Stages up to date did not run now: their MLflow runs carry the `dvc_exp` tag of the "
           "pipeline run that last ran them.")
# Outcomes after which the stage's outputs are those of its inputs now (so eval.json is current).
CURRENT = (dvc_mod.RAN, dvc_mod.UP_TO_DATE, dvc_mod.RESTORED)


@dataclass(frozen=True)
class StageResult:
    """One stage of a pipeline run as the reports show it."""

    stage: str
    outcome: str  # dvc_mod.RAN / UP_TO_DATE / RESTORED, FAILED, or NOT_RUN (an upstream failed)
    seconds: float | None  # wall time of the (last) attempt; None when it never started
    gpu: bool
    state: str  # the Prefect state name (Completed, Up to date, Failed, NotReady, ...)


def stage_rows(results: list[StageResult]) -> list[dict[str, Any]]:
    """Rows of the `rcg-pipeline-stages` table artifact."""
    return [{"stage": r.stage, "outcome": r.outcome, "seconds": r.seconds, "gpu": r.gpu,
             "state": r.state} for r in results]


def counts_line(results: list[StageResult]) -> str:
    """`7 ran, 3 up to date`: how many stages had each outcome."""
    counts = {k: sum(r.outcome == k for r in results) for k in (*CURRENT, FAILED, NOT_RUN)}
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n)


def stage_markdown(results: list[StageResult]) -> str:
    lines = [f"{len(results)} stages: {counts_line(results)}.", "",
             "| stage | outcome | seconds | gpu |", "|---|---|---:|---|"]
    for r in results:
        outcome = f"**{r.outcome}**" if r.outcome in (FAILED, NOT_RUN) else r.outcome
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"| `{r.stage}` | {outcome} | {seconds} | {'gpu' if r.gpu else ''} |")
    return "\n".join(lines)


def evaluation_markdown(root: Path, eval_file: str, evalnet_file: str,
                        outcome: str | None) -> str:
    """The evaluation table of `eval_file` (metrics/eval.json) once the evaluate stage is current,
    else one line saying why there is none. `outcome`: the evaluate stage's, None if not in the run."""
    none = "## RCG evaluation\n\nNo evaluation: "
    if outcome is None:
        return none + "the `evaluate` stage was not among this run's targets."
    if outcome not in CURRENT:
        return none + f"the `evaluate` stage {outcome}."
    path, evalnet = root / eval_file, root / evalnet_file
    if not path.exists():
        return none + f"`{eval_file}` is missing although the `evaluate` stage {outcome}."
    note = "" if outcome == dvc_mod.RAN else (
        f"\n\n(`evaluate` {outcome}: these are the numbers of the run that made `{eval_file}`.)")
    try:
        table = format_report(read_json(path), read_json(evalnet) if evalnet.exists() else None)
    except (OSError, ValueError, KeyError, TypeError) as e:  # the pipeline itself succeeded
        return none + f"`{eval_file}` could not be read as an evaluation: {type(e).__name__}: {e}"
    return table + note


def store_uri(uri: str, root: Path) -> tuple[str, Path | None]:
    """(a URI that works from any folder, the local store's path) for a tracking URI; the path is
    None for a server. Relative local stores are relative to the project, where the stages run."""
    if uri.startswith("sqlite:///"):
        path = root / uri.removeprefix("sqlite:///")
        return f"sqlite:///{path}", path
    if uri.startswith("file:"):
        path = root / uri.removeprefix("file://").removeprefix("file:")
        return path.as_uri(), path
    if "://" in uri or uri.startswith("databricks"):
        return uri, None
    path = root / uri  # a bare folder: MLflow's file store
    return str(path), path


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    """An unreachable tracking server costs seconds, not MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="15")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mlflow_runs(uri: str, exp_name: str) -> list[tuple[Any, str]]:
    """(run, its experiment's name) for the MLflow runs tagged `dvc_exp = exp_name` in every
    experiment of the store, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    with _short_http_retries():
        names = {e.experiment_id: e.name for e in client.search_experiments()}
        if not names:
            return []
        runs = client.search_runs(list(names), filter_string=f"tags.dvc_exp = '{exp_name}'",
                                  order_by=["attributes.start_time ASC"])
    return [(r, names.get(r.info.experiment_id, r.info.experiment_id)) for r in runs]


def mlflow_markdown(root: Path, tracking: TrackingConfig, exp_name: str,
                    skipped: bool = False) -> str:
    """The MLflow runs of this pipeline run: links on a tracking server, run ids for a local store.
    `skipped`: some stages did not run now (up to date), which the text then explains."""
    if not tracking.enabled:
        return "MLflow tracking is off (`tracking.enabled: false` in params.yaml): no runs recorded."
    uri, path = store_uri(tracking.uri, root)
    if path is not None and not path.exists():
        return f"No MLflow store at `{path}`: no stage of this project has logged a run yet."
    try:
        runs = mlflow_runs(uri, exp_name)
    except Exception as e:  # the report must not fail a finished pipeline run
        return f"Could not read the MLflow runs from `{tracking.uri}`: {type(e).__name__}: {e}"
    where = (f"tracking server {uri}" if path is None else
             f"local store `{uri}` (browse it with `mlflow ui --backend-store-uri {uri}`)")
    earlier = "\n\n" + EARLIER if skipped else ""
    if not runs:
        return f"No MLflow run tagged `dvc_exp = {exp_name}` in the {where}." + earlier
    web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
    lines = [f"Runs tagged `dvc_exp = {exp_name}` in the {where}:", "",
             "| stage | run | status | experiment |", "|---|---|---|---|"]
    for run, experiment in runs:
        info, rid = run.info, run.info.run_id
        link = f"[{rid}]({web}/#/experiments/{info.experiment_id}/runs/{rid})" if web else f"`{rid}`"
        stage = f"`{run.data.tags['stage']}`" if "stage" in run.data.tags else "pipeline run (parent)"
        lines.append(f"| {stage} | {link} | {info.status} | "
                     f"{experiment} |")
    return "\n".join(lines) + earlier


def summary_markdown(run_name: str, exp_name: str, results: list[StageResult], log_dir: Path,
                     evaluation: str, mlflow: str) -> str:
    """The `rcg-evaluation` artifact: evaluation table, stages, MLflow runs."""
    return "\n".join([
        f"# rcg pipeline run `{run_name}`", "",
        f"DVC experiment `{exp_name}` (`dvc exp show`); stage logs in `{log_dir}`.", "",
        evaluation, "", "## Stages", "", stage_markdown(results), "",
        "## MLflow runs", "", mlflow, "",
    ])
