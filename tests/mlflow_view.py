"""What a user of MLflow finds after a pipeline run, read through MLflow's own client API.

`check_pipeline_run(repo, stages)` is called by tests/test_pipeline.py on the project it ran (so the
suite runs the tiny pipeline once): the latest pipeline run is one parent run whose nested runs are
the stages that ran, named by stage and condition, all finished; the evaluate run holds the
evaluation table as a table and its figures as images; the pipeline run carries the headline
numbers; each generator run has its sample grids as images at their steps; the registered model
version links to the promote run and says how good it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

# The stage runs of a whole tiny pipeline run (dvc.yaml's tracked stages; `code` opens no run).
EVERY_STAGE = {"shard", "encoder", "encode", "train_rdm", "train_generator (rep)", "train_generator (none)",
               "train_generator (label)", "train_generator (cluster)", "train_generator (contrastive)", "evalnet",
               "evaluate", "promote"}


def store(repo: Path) -> MlflowClient:
    """The client of the workspace's default store (tracking.uri of the tiny preset)."""
    return MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")


def pipeline_runs(client: MlflowClient, prefix: str = "rcg") -> tuple[list[Any], dict[str, list[Any]]]:
    """The parent runs (oldest first) and, per parent run id, its nested stage runs, in experiment
    `<prefix>-pipeline`."""
    exp = client.get_experiment_by_name(f"{prefix}-pipeline")
    assert exp is not None, f"no experiment {prefix}-pipeline"
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[str, list[Any]] = {p.info.run_id: [] for p in parents}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent is not None:
            assert parent in children, f"run {r.info.run_name} nested under a run that is not a pipeline run"
            children[parent].append(r)
    return parents, children


def image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps at which image `key` was logged (mlflow.log_image's file names: key+step+N+...)."""
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    return sorted(int(n.split("+")[2]) for n in names if n.startswith(f"{key}+step+") and n.endswith(".png"))


def check_pipeline_run(repo: Path, stages: set[str]) -> Any:
    """The latest pipeline run of `repo` as a user sees it (module docstring); returns it."""
    client = store(repo)
    parents, children = pipeline_runs(client)
    parent = parents[-1]
    runs = {r.info.run_name: r for r in children[parent.info.run_id]}
    assert set(runs) == stages, sorted(runs)
    assert parent.info.run_name.startswith("pipeline ") and parent.info.status == "FINISHED"
    assert parent.data.tags["dvc_exp"] and parent.info.run_name == f"pipeline {parent.data.tags['dvc_exp']}"
    assert all(r.info.status == "FINISHED" for r in runs.values()), {n: r.info.status for n, r in runs.items()}
    table = json.loads((repo / "metrics" / "details" / "eval.json").read_text())
    _check_evaluate(client, runs["evaluate"], parent, table)
    for name, run in runs.items():
        if name.startswith("train_generator"):  # tiny: one grid, at the last step (sample_every 0)
            condition = run.data.tags["condition"]
            assert name == f"train_generator ({condition})"
            steps = json.loads((repo / "metrics" / f"generator_{condition}.json").read_text())["steps"]
            assert image_steps(client, run.info.run_id, "samples") == [steps]
    _check_version(client, runs["promote"], parent, table)
    return parent


def _check_evaluate(client: MlflowClient, run: Any, parent: Any, table: dict[str, Any]) -> None:
    """The table as a table, the figures as images, the headline numbers in the pipeline run."""
    from rcg.tracking import use_store

    use_store(client.tracking_uri)  # MlflowClient.load_table searches the runs of the process's store
    logged = client.load_table(run.info.experiment_id, "eval_table.json", run_ids=[run.info.run_id])
    assert list(logged["mode"]) == [*table["modes"], "floor"]
    for mode, row in table["modes"].items():
        # the table's JSON keeps 10 significant digits
        assert math.isclose(logged.loc[logged["mode"] == mode, "fd"].item(), row["fd"], rel_tol=1e-9)
        for k in ("fd", "precision", "recall"):
            assert parent.data.metrics[f"{mode}.{k}"] == row[k]
    assert parent.data.metrics["floor.fd"] == table["floor"]["fd"]
    assert parent.data.tags["extractor"] == table["extractor"] == run.data.tags["extractor"]
    for mode in table["modes"]:
        assert image_steps(client, run.info.run_id, f"samples_{mode}") == [0]


def _check_version(client: MlflowClient, run: Any, parent: Any, table: dict[str, Any]) -> None:
    """The registered version: its run is the promote run, its tags say how good it is."""
    version = run.data.tags["registered_version"]
    mv = client.get_model_version("rcg-generator", version)
    assert mv.run_id == run.info.run_id
    mode = mv.tags["served_mode"]
    assert float(mv.tags["fd"]) == table["modes"][mode]["fd"] == run.data.metrics["fd"]
    assert mv.tags["extractor"] == table["extractor"] and mv.tags["fd_is"] == table["fd_is"]
    assert mv.tags["n_samples"] == str(table["n_samples"]) and mv.tags["pipeline_run"] == parent.info.run_id
    assert f"fd {table['modes'][mode]['fd']:.4g}" in mv.description
    assert parent.data.tags["registered_version"] == version
