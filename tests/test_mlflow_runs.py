"""MLflow as a user sees it: one parent run per pipeline run, stage runs nested under it with names
that say the stage and condition, a resumed stage continuing its own run (a whole loss curve), and
sample grids as images at their steps. (The whole pipeline's view, table and registered version
included, is checked on tests/test_pipeline.py's run by tests/mlflow_view.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcg import config, tracking
from tests.mlflow_view import image_steps, pipeline_runs


@pytest.fixture(autouse=True)
def _own_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MLFLOW_TRACKING_URI", tracking.PIPELINE_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (making one takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _cfg(store: str, prefix: str) -> config.Config:
    return config.preset_config("tiny", {"tracking": {"uri": store, "experiment_prefix": prefix}})


def _client(store: str) -> object:
    from mlflow import MlflowClient

    return MlflowClient(store)


def test_identity_is_shared_by_the_stages_of_one_pipeline_run(monkeypatch: pytest.MonkeyPatch) -> None:
    a = tracking.pipeline_run(config.preset_config("tiny"))
    assert a.source == "workspace" and a == tracking.pipeline_run(config.preset_config("tiny"))
    # the tracking block is not part of it (a store switched on or moved is the same pipeline run) ...
    assert tracking.pipeline_run(config.preset_config("tiny", {"tracking": {"uri": "sqlite:///x.db"}})) == a
    # ... every other value is
    assert tracking.pipeline_run(config.preset_config("tiny", {"train_rdm": {"lr": 1e-4}})).identity != a.identity
    monkeypatch.setenv("DVC_EXP_NAME", "quiet-lake")  # names the run, does not split it
    b = tracking.pipeline_run(config.preset_config("tiny"))
    assert b.identity == a.identity and b.label == "quiet-lake"
    monkeypatch.setenv(tracking.PIPELINE_ENV, "0b7c'flow run")  # the orchestrator's id wins
    c = tracking.pipeline_run(config.preset_config("tiny"))
    assert (c.identity, c.source, c.label) == ("0b7c_flow_run", tracking.PIPELINE_ENV, "quiet-lake")
    assert tracking.run_name("train_generator", "rep") == "train_generator (rep)"


def test_stages_nest_under_one_parent_and_a_rerun_is_a_new_pipeline_run(store: str) -> None:
    cfg = _cfg(store, "nest")
    for stage, condition in (("shard", ""), ("train_generator", "rep"), ("train_generator", "none")):
        with tracking.stage_run(cfg, stage, condition=condition) as tracker:
            tracker.log_metrics({"x": 1.0})
    with tracking.stage_run(cfg, "shard"):  # shard again: the same workspace run again
        pass
    parents, children = pipeline_runs(_client(store), "nest")
    assert [p.info.run_name for p in parents] == [f"pipeline {tracking.pipeline_run(cfg).label}",
                                                 f"pipeline {tracking.pipeline_run(cfg).label} #2"]
    first, second = (sorted(r.info.run_name for r in children[p.info.run_id]) for p in parents)
    assert first == ["shard", "train_generator (none)", "train_generator (rep)"] and second == ["shard"]
    assert all(p.info.status == "FINISHED" for p in parents)
    assert parents[0].data.params["train_rdm.lr"] == str(cfg.train_rdm.lr)  # the whole config, to compare


def test_stages_started_side_by_side_find_one_parent(store: str) -> None:
    """Stages that Prefect starts at once race to create the parent: they all end up under one."""
    import mlflow

    cfg = _cfg(store, "race")
    tracking.use_store(store)
    exp_id = tracking.ensure_experiment(cfg, "race-pipeline")
    pipeline, barrier, found = tracking.pipeline_run(cfg), threading.Barrier(4), []

    def stage(i: int) -> None:
        barrier.wait()
        found.append(tracking.find_parent(mlflow.MlflowClient(), exp_id, cfg, pipeline, f"stage{i}", "c"))

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parents, _ = pipeline_runs(_client(store), "race")
    assert len(set(found)) == 1 and [p.info.run_id for p in parents] == found[:1]


def test_a_failed_stage_reruns_in_its_own_run(store: str) -> None:
    cfg = _cfg(store, "again")
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "train_rdm", resume_key="fp") as tracker:
            tracker.log_metrics({"loss": 2.0}, step=1)
            raise RuntimeError("killed")
    with tracking.stage_run(cfg, "train_rdm", resume_key="other"):  # other settings: another run
        pass
    with tracking.stage_run(cfg, "train_rdm", resume_key="fp") as tracker:  # the unfinished one again
        tracker.log_metrics({"loss": 1.0}, step=2)
    _, children = pipeline_runs(_client(store), "again")
    (runs,) = children.values()
    by_status = sorted((r.info.status, r.data.tags.get(tracking.TAG_RESUMED, "0")) for r in runs)
    assert by_status == [("FINISHED", "0"), ("FINISHED", "1")]
    resumed = next(r for r in runs if r.data.tags.get(tracking.TAG_RESUMED) == "1")
    history = _client(store).get_metric_history(resumed.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


@pytest.fixture(scope="module")
def generator_ws(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace with shards, an encoder and its features (built by the real stages)."""
    from tests.generator_workspace import build, chdir

    root = build(tiny_workspace, tmp_path_factory.mktemp("resume"), rdm=False)
    with chdir(root):
        yield root


def test_interrupted_stage_continues_its_run_with_whole_curves_and_grids(
        generator_ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_generator stopped after 4 of 6 steps (checkpoint at 3), then rerun: one MLflow run,
    its loss at every logged step, its grids (every 2 steps) in the image view at their steps."""
    from rcg.stages import train_generator
    from tests.interrupt import Interrupted, interrupt_after

    cfg = config.load("params.yaml", config.parse_set(["train_generator.sample_every=2"]))
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            train_generator.run(cfg, condition="rep")
    train_generator.run(cfg, condition="rep")

    client = _client(f"sqlite:///{generator_ws}/mlruns/mlflow.db")
    parents, children = pipeline_runs(client, "rcg")
    ours = [r for p in parents for r in children[p.info.run_id] if r.info.run_name == "train_generator (rep)"]
    assert len(ours) == 1, [(r.info.run_name, r.info.status) for r in ours]
    run = ours[0]
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_RESUMED] == "1"
    assert run.data.tags["condition"] == "rep" and run.data.tags["stage"] == "train_generator"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == {2, 4, 6}  # log_every 2; step 4 twice (before the interruption and after resuming)
    assert sorted(set(image_steps(client, run.info.run_id, "samples"))) == [2, 4, 6]
