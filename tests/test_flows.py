"""The Prefect flows on a tiny DVC project the test builds: DAG order, GPU tag and limit, params as
DVC experiment, retries for transient faults only, failure report, sweep; plus the real dvc.yaml."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

# Telemetry is already off: tests/conftest.py sets the variables before any test module imports.
from flows import dvc_cli as dvc_mod
from flows.dag import read_stages, select
from rcg import config as config_mod

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for `rcg <stage>`: records start/end times, reads params, logs as rcg's stages do (log
# records and a tqdm bar), and fails on demand (a file fail_<stage> holding "transient" fails once
# like a flaky NCCL collective; "deterministic" fails every time with a traceback, like a bug). The
# evaluate stage writes a details/eval.json in rcg's format and, when the file mlflow_on exists, logs an
# MLflow run through rcg.tracking, as the real stage does.
STAGE_PY = '''
import json, logging, sys, time, pathlib, yaml
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                    datefmt="%H:%M:%S")
logger = logging.getLogger("stage")
stage = sys.argv[1] + (("@" + sys.argv[2]) if len(sys.argv) > 2 else "")
events = pathlib.Path("events.jsonl")
def log(kind):
    with events.open("a") as f:
        f.write(json.dumps({"stage": stage, "kind": kind, "t": time.time()}) + "\\n")
log("start")
fail = pathlib.Path("fail_" + stage)
if fail.exists():
    kind = fail.read_text().strip()
    if kind == "transient":
        fail.unlink()
        print("NCCL error: unhandled system error (connection reset by peer)", flush=True)
        sys.exit(1)
    raise ValueError("deterministic bug in " + stage)
params = yaml.safe_load(open("params.yaml"))
time.sleep(0.1)
if sys.argv[1] == "prepare":
    pathlib.Path("prepare.txt").write_text(str(params["shard"]["max_per_split"]))
elif sys.argv[1] == "train":
    from tqdm import tqdm
    logger.info("stage-own record: training %s", sys.argv[2])
    for _ in tqdm(range(3000), desc="bar " + sys.argv[2], mininterval=0):
        pass
    logger.warning("stage-own warning: %s done", sys.argv[2])
    pathlib.Path("train_%s.txt" % sys.argv[2]).write_text(sys.argv[2])
else:
    n = params["evaluate"]["n_samples"]
    json.dump({"score": n * 2}, open("metrics.json", "w"))
    pathlib.Path("metrics/details").mkdir(parents=True, exist_ok=True)
    json.dump({"extractor": "evalnet", "n_samples": n, "sample_steps": 2, "n_reference": 10,
               "fd_is": "a fake evaluation", "modes": {"uncond": {"fd": 3.0}, "rcg": {"fd": n / 4}}},
              open("metrics/details/eval.json", "w"))
    if pathlib.Path("mlflow_on").exists():
        from rcg import config, tracking
        with tracking.stage_run(config.load("params.yaml"), "evaluate") as tracker:
            tracker.log_metrics({"fd": n / 4})
log("end")
'''

DVC_YAML = """\
stages:
  prepare:
    cmd: python stage.py prepare
    deps: [stage.py]
    params: [shard.max_per_split]
    outs: [prepare.txt]
  train:
    foreach: [x, y]
    do:
      cmd: python stage.py train ${item}
      deps: [prepare.txt]
      outs:
        - train_${item}.txt
  evaluate:
    cmd: python stage.py evaluate
    deps: [train_x.txt, train_y.txt]
    params: [evaluate.n_samples]
    metrics:
      - metrics.json:
          cache: false
      - metrics/details/eval.json:
          cache: false
"""


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def _dvc(project: Path, *args: str) -> None:
    subprocess.run(dvc_mod.dvc_cmd(*args), cwd=project, check=True, capture_output=True,
                   env=dvc_mod.dvc_env())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project with dummy stages: prepare -> train@{x,y} -> evaluate; rcg's params.yaml."""
    p = tmp_path / "proj"
    p.mkdir()
    (p / "stage.py").write_text(STAGE_PY)
    (p / "dvc.yaml").write_text(DVC_YAML)
    config_mod.write_params(p / "params.yaml", "default")
    (p / ".gitignore").write_text("events.jsonl\nfail_*\nlogs/\nmlflow_on\nmlruns/\n")
    _git(p, "init", "-q")
    _git(p, "config", "user.name", "rcg test")
    _git(p, "config", "user.email", "test@example.com")
    _dvc(p, "init", "-q")
    _dvc(p, "config", "core.analytics", "false")
    _git(p, "add", "-A")
    _git(p, "commit", "-qm", "dummy pipeline")
    return p


def test_grid_points_is_the_cartesian_product() -> None:
    from flows.sweep import _value, grid_points

    assert grid_points({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert [_value(v) for v in (1e-4, "x y", [1, 2], True)] == ["0.0001", "x y", "[1, 2]", "true"]


def _events(project: Path) -> list[dict]:
    path = project / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _span(events: list[dict], stage: str) -> tuple[float, float]:
    start = max(e["t"] for e in events if e["stage"] == stage and e["kind"] == "start")
    end = max(e["t"] for e in events if e["stage"] == stage and e["kind"] == "end")
    return start, end


@pytest.fixture(scope="module")
def prefect_harness():
    """One temporary Prefect server for every test here (it costs 8-19 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------------- no Prefect needed


def test_is_transient_separates_flaky_faults_from_bugs() -> None:
    assert dvc_mod.is_transient(1, "ERROR: Unable to acquire lock. Most likely another DVC process")
    assert dvc_mod.is_transient(1, "RuntimeError: NCCL error in: ...ProcessGroupNCCL.cpp")
    assert dvc_mod.is_transient(137, "")  # SIGKILL from a preemption
    assert not dvc_mod.is_transient(1, "Traceback ...\nValueError: bad shape")
    assert not dvc_mod.is_transient(2, "rcg train-rdm: config error: train_rdm.lr: expected float")
    assert dvc_mod.is_transient(1, "disk quota hiccup", extra_patterns=[r"quota hiccup"])


def test_output_relay_forwards_records_and_thins_progress_bars() -> None:
    """A stage's output as the task log shows it: whole lines at once (records keep their level,
    lose the stage's own time stamp), tqdm redraws at most one line per `every` seconds."""
    from flows.stage_log import OutputRelay

    now = [0.0]
    out: list[tuple[int, str]] = []
    relay = OutputRelay(lambda level, msg: out.append((level, msg)), every=5.0, clock=lambda: now[0])
    text = ("Running stage 'train_rdm':\n> rcg train-rdm\n12:00:01 INFO rcg.rdm: 10 steps\n"
            + "".join(f"\rtrain_rdm: {i}%|#| {i}/100 [loss=0.{i:02d}]" for i in range(100)))
    for i in range(0, len(text), 7):  # pieces cut anywhere, as a pipe delivers them
        relay.feed(text[i:i + 7])
        now[0] += 0.001
    relay.feed("12:00:02 WARNING rcg.rdm: lr high\n")  # written on the live bar's line
    now[0] += 6
    relay.feed("\rtrain_rdm: 100%|#| 100/100\n12:00:09 ERROR rcg.rdm: nan loss\r\n")
    relay.feed("ERROR: failed to reproduce 'train_rdm'\n\rsample: 1/9\rsample: 2/9\r   \rsampled\n")
    now[0] += 6
    relay.feed("\rDDIM: 0/9\r")  # a bar left without a close: its last state shows at the end
    relay.close()
    assert out == [
        (logging.INFO, "Running stage 'train_rdm':"),
        (logging.INFO, "> rcg train-rdm"),
        (logging.INFO, "rcg.rdm: 10 steps"),
        (logging.INFO, "train_rdm: 0%|#| 0/100 [loss=0.00]"),  # the first redraw, then 5 s quiet
        (logging.WARNING, "rcg.rdm: lr high"),
        (logging.INFO, "train_rdm: 100%|#| 100/100"),  # a closed bar's last line
        (logging.ERROR, "rcg.rdm: nan loss"),
        (logging.ERROR, "ERROR: failed to reproduce 'train_rdm'"),
        (logging.INFO, "sampled"),  # (the cleared `sample` bar lived too short to show)
        (logging.INFO, "DDIM: 0/9"),
    ]
    out.clear()
    relay.feed("2026/12/06 04:12:57 INFO mlflow.store: Created version '1'\n")
    assert out == [(logging.INFO, "mlflow.store: Created version '1'")]


def test_stage_outcome_reads_what_dvc_did() -> None:
    assert dvc_mod.stage_outcome("Stage 'prepare' didn't change, skipping\n") == dvc_mod.UP_TO_DATE
    assert dvc_mod.stage_outcome(
        "Stage 'train' is cached - skipping run, checking out outputs\n") == dvc_mod.RESTORED
    assert dvc_mod.stage_outcome("Running stage 'train':\n> rcg train\n") == dvc_mod.RAN


def test_run_report_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation part of the `rcg-evaluation` artifact in each case, and its MLflow part for
    tracking off, a missing local store and a tracking server (links into the MLflow UI)."""
    from types import SimpleNamespace

    from flows import run_report
    from rcg.config import TrackingConfig

    ev = {"extractor": "evalnet", "n_samples": 4, "modes": {"rcg": {"fd": 1.25}}}
    (tmp_path / "metrics").mkdir()
    md = run_report.evaluation_markdown(tmp_path, "metrics/eval.json", "metrics/evalnet.json", "ran")
    assert "`metrics/eval.json` is missing" in md
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev))
    md = run_report.evaluation_markdown(tmp_path, "metrics/eval.json", "metrics/evalnet.json", "ran")
    assert "| rcg (RDM reps) | 1.250 |" in md
    md = run_report.evaluation_markdown(tmp_path, "metrics/eval.json", "x.json", "up to date")
    assert "| rcg (RDM reps) | 1.250 |" in md and "`evaluate` up to date" in md
    assert "stage failed" in run_report.evaluation_markdown(tmp_path, "metrics/eval.json", "x",
                                                            "failed")
    assert "not among" in run_report.evaluation_markdown(tmp_path, "metrics/eval.json", "x", None)

    off = TrackingConfig(enabled=False)
    assert "tracking is off" in run_report.mlflow_markdown(tmp_path, off, "e")
    assert "No MLflow store" in run_report.mlflow_markdown(tmp_path, TrackingConfig(), "e")
    assert run_report.store_uri("sqlite:///mlruns/db", tmp_path) == (
        f"sqlite:///{tmp_path}/mlruns/db", tmp_path / "mlruns" / "db")
    assert run_report.store_uri("sqlite:////abs/db", tmp_path)[1] == Path("/abs/db")

    run = SimpleNamespace(info=SimpleNamespace(run_id="abc123", experiment_id="7", status="FINISHED"),
                          data=SimpleNamespace(tags={"stage": "train_rdm"}))
    seen = []
    monkeypatch.setattr(run_report, "mlflow_runs", lambda uri, name: seen.append((uri, name)) or [(run, "rcg-rdm")])
    md = run_report.mlflow_markdown(tmp_path, TrackingConfig(uri="http://mlflow:5000/"), "prefect-x")
    assert seen == [("http://mlflow:5000/", "prefect-x")]
    assert ("| `train_rdm` | [abc123](http://mlflow:5000/#/experiments/7/runs/abc123) | FINISHED "
            "| rcg-rdm |") in md and "did not run now" not in md
    md = run_report.mlflow_markdown(tmp_path, TrackingConfig(uri="https://m"), "p", skipped=True)
    assert "did not run now" in md


def test_run_force_reaches_the_flow(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import flows.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "rcg_pipeline", lambda **kw: calls.append(kw) or {"code": "ran"})
    assert pipeline.main(["run", "--force", "--preset", "tiny"]) == 0
    assert calls[-1]["force"] is True and calls[-1]["preset"] == "tiny"
    assert pipeline.main(["run"]) == 0 and calls[-1]["force"] is False
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    assert "--force" in capsys.readouterr().out


def test_real_dvc_yaml_stages_in_dag_order(tmp_path: Path) -> None:
    """The flow's stage list comes from the project's own dvc.yaml, upstreams first."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    _dvc(tmp_path, "init", "--no-scm", "-q")
    stages = read_stages(tmp_path)
    names = [s.name for s in stages]
    assert names[0] == "code" and len(set(names)) == len(names)  # the code digests come first
    assert all("code" in s.upstream for s in stages[1:])
    seen: set[str] = set()
    for s in stages:
        assert set(s.upstream) <= seen, f"{s.name} runs before its upstreams {s.upstream}"
        seen.add(s.name)
    text = (ROOT / "dvc.yaml").read_text()
    for base in {s.base for s in stages}:
        assert f"\n  {base}:" in text


def test_dag_reads_foreach_and_selects_upstreams(project: Path) -> None:
    stages = read_stages(project)
    assert [s.name for s in stages] == ["prepare", "train@x", "train@y", "evaluate"]
    assert stages[3].upstream == ("train@x", "train@y")
    assert stages[3].cache_false_outs == ("metrics.json", "metrics/details/eval.json")
    assert [s.name for s in select(stages, ["train@y"])] == ["prepare", "train@y"]
    assert stages[1].is_gpu(["train"]) and not stages[0].is_gpu(["train"])
    with pytest.raises(KeyError, match="nope"):
        select(stages, ["nope"])


def test_prefect_yaml_deployments_point_at_real_flows() -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert {"cpu", "gpu"} <= pools
    for d in spec["deployments"]:
        fl = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        fl.validate_parameters(d.get("parameters") or {})  # raises on an unknown parameter


def test_sweep_checks_every_grid_point_against_rcg_config_before_queueing(tmp_path: Path) -> None:
    from flows.sweep import check_points, grid_points
    from rcg.config import ConfigError

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    sweep = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                 if d["entrypoint"].endswith(":rcg_sweep"))["parameters"]
    assert sweep["preset"] in config_mod.PRESET_NAMES
    points = [[f"{k}={v}" for k, v in p.items()] for p in grid_points(sweep["grid"])]
    check_points(params, points)  # the shipped deployment's grid is valid
    with pytest.raises(ConfigError, match="train_rdm.depth"):
        check_points(params, [["train_rdm.lr=1e-4"], ["train_rdm.depth=4"]])
    with pytest.raises(ConfigError, match="train_rdm.lr"):
        check_points(params, [["train_rdm.lr=fast"]])
    params.write_text("evaluate: {scale: 1}\n")  # not an rcg params.yaml: left to DVC
    check_points(params, [["evaluate.scale=5"]])


# ---------------------------------------------------------------------------- under Prefect


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    return {r.name: r for r in runs}


def _task_logs(task_run_id) -> list[object]:
    """The task run's log records as the UI reads them (after the API log queue is drained)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))


def _artifact(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return art.data


def test_flow_runs_dag_in_order_as_a_dvc_experiment(prefect_harness, project: Path) -> None:
    from flows.pipeline import rcg_pipeline

    state = rcg_pipeline(project_dir=str(project), preset="tiny", overrides=["evaluate.n_samples=3"],
                         gpu_stages=["train"], gpu_slots=1, exp_name="exp-order",
                         return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {s: "Completed" for s in ["prepare", "train@x", "train@y", "evaluate"]}

    ev = _events(project)
    prep, tx, ty, evl = (_span(ev, s) for s in ["prepare", "train@x", "train@y", "evaluate"])
    assert prep[1] <= tx[0] and prep[1] <= ty[0]  # DAG order
    assert max(tx[1], ty[1]) <= evl[0]
    assert tx[1] <= ty[0] or ty[1] <= tx[0]  # one `gpu` slot: the two GPU stages never overlap

    runs = _task_runs(state.state_details.flow_run_id)
    assert "gpu" in runs["train@x"].tags and "gpu" in runs["train@y"].tags
    assert "gpu" not in runs["prepare"].tags

    # The params went into params.yaml as `rcg params` writes them (every value of the preset, then
    # the overrides), and the run is a DVC experiment with its metrics.
    expected = project.parent / "expected.yaml"
    config_mod.write_params(expected, "tiny", ["evaluate.n_samples=3"])
    assert (project / "params.yaml").read_text() == expected.read_text()
    (row,) = dvc_mod.experiment_table(project, ["exp-order"])
    assert row["params"]["shard.max_per_split"] == 256 and row["params"]["evaluate.n_samples"] == 3
    assert row["metrics"]["metrics.json:score"] == 6 and (project / "prepare.txt").read_text() == "256"

    # Second run with one param changed: DVC re-runs only `evaluate` (Prefect caches nothing, so
    # the same task inputs still run; DVC alone skips the stages that are up to date).
    state = rcg_pipeline(project_dir=str(project), overrides=["evaluate.n_samples=4"],
                         save_experiment=False, return_state=True)
    assert state.is_completed()
    assert state.result() == {"prepare": "Up to date", "train@x": "Up to date",
                              "train@y": "Up to date", "evaluate": "Completed"}
    assert [e["stage"] for e in _events(project)[len(ev):]] == ["evaluate", "evaluate"]
    assert json.loads((project / "metrics.json").read_text()) == {"score": 8}


def test_transient_retried_deterministic_reported(prefect_harness, project: Path) -> None:
    from flows.pipeline import rcg_pipeline

    (project / "fail_train@x").write_text("transient")
    (project / "fail_train@y").write_text("deterministic")
    state = rcg_pipeline(project_dir=str(project), gpu_stages=[], retries=2, retry_delay=0.1,
                         exp_name="exp-fail", return_state=True)
    assert state.is_failed()
    assert "train@y" in state.message and "train@y.log" in state.message

    starts = [e["stage"] for e in _events(project) if e["kind"] == "start"]
    assert starts.count("train@x") == 2  # transient: failed once, retried, then succeeded
    assert starts.count("train@y") == 1  # deterministic: no retry
    assert "evaluate" not in starts  # downstream of a failure never runs

    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["train@x"].state.is_completed() and runs["train@y"].state.is_failed()
    # The UI shows one retry delay per task: a number (a list of delays shows as NaN there).
    assert runs["train@x"].empirical_policy.retry_delay == 0.1
    (report,) = (project / "logs" / "flows").glob("*/failure.md")
    text = report.read_text()
    assert "stage `train@y`" in text and "deterministic" in text
    assert "ValueError: deterministic bug in train@y" in text
    log = report.parent / "train@y.log"
    assert str(log) in text and "ValueError" in log.read_text()


def test_ui_sees_stage_logs_up_to_date_states_and_evaluation(
        prefect_harness, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Prefect UI reads: the stage's own log lines in its task log (the progress bar thinned
    to a few lines), a distinct state for stages DVC skipped, and the `rcg-evaluation` artifact with
    the evaluation table, the stages and the MLflow runs of this pipeline run."""
    from flows.pipeline import rcg_pipeline

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the fake evaluate stage imports rcg.tracking
    (project / "mlflow_on").touch()
    state = rcg_pipeline(project_dir=str(project), preset="tiny", exp_name="exp-ui",
                         overrides=["tracking.enabled=true", "evaluate.n_samples=2"],
                         return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    runs = _task_runs(flow_run_id)
    messages = [r.message for r in _task_logs(runs["train@x"].id)]
    assert any(m == "stage: stage-own record: training x" for m in messages), messages
    warnings = [r for r in _task_logs(runs["train@x"].id) if "stage-own warning" in r.message]
    assert [r.level for r in warnings] == [logging.WARNING]
    bar = [m for m in messages if m.startswith("bar x:")]
    log_file = next((project / "logs" / "flows").glob("*/train@x.log")).read_text()
    assert log_file.count("bar x:") > 1000  # the file keeps every redraw of the bar ...
    assert 1 <= len(bar) <= 3 and "3000/3000" in bar[-1]  # ... the task log a few lines
    assert all(r.state_name == "Completed" for r in runs.values())

    text = _artifact(flow_run_id, "rcg-evaluation")
    assert "| mode | fd (evalnet) |" in text and "| rcg (RDM reps) | 0.500 |" in text, text
    assert "4 stages: 4 ran." in text and "| `train@y` | ran |" in text
    ids = _mlflow_run_ids(project, "exp-ui")
    assert set(ids) == {"evaluate", "pipeline"}, ids  # the stage's run and its parent, the flow run's
    mlflow_run = ids["evaluate"]
    assert f"| `evaluate` | `{mlflow_run}` |" in text and "mlflow.db" in text, text
    assert f"| pipeline run (parent) | `{ids['pipeline']}` |" in text
    from mlflow.tracking import MlflowClient  # the parent's identity is the flow run's id

    parent = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(ids["pipeline"]).data.tags
    assert (parent["rcg.pipeline"], parent["rcg.pipeline_source"]) == (str(flow_run_id), "RCG_PIPELINE_RUN")

    state = rcg_pipeline(project_dir=str(project), overrides=["evaluate.n_samples=8"],
                         exp_name="exp-ui-2", return_state=True)
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["train@x"].state_name == "Up to date" and runs["train@x"].state.is_completed()
    assert runs["evaluate"].state_name == "Completed"
    assert any("up to date" in r.message for r in _task_logs(runs["prepare"].id))
    text = _artifact(state.state_details.flow_run_id, "rcg-evaluation")
    assert "4 stages: 1 ran, 3 up to date." in text and "| `prepare` | up to date |" in text
    assert "| rcg (RDM reps) | 2.000 |" in text
    assert f"`{mlflow_run}`" not in text and "`exp-ui-2`" in text


def _mlflow_run_ids(project: Path, exp_name: str) -> dict[str, str]:
    """{stage, or "pipeline" for the parent run: run id} of the runs tagged `dvc_exp = exp_name`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.data.tags.get("stage", "pipeline"): r.info.run_id
            for r in client.search_runs(ids, f"tags.dvc_exp = '{exp_name}'")}


@pytest.mark.slow  # DVC's queue starts a celery worker: ~25 s on top of the harness
def test_sweep_queues_grid_and_collects_metrics(prefect_harness, project: Path) -> None:
    from flows.sweep import rcg_sweep

    rows = rcg_sweep(grid={"evaluate.n_samples": [1, 5]}, preset="tiny",
                     project_dir=str(project), prefix="sw")
    assert [r["name"] for r in rows] == ["sw-0", "sw-1"]
    assert [r["params"]["evaluate.n_samples"] for r in rows] == [1, 5]
    assert [r["metrics"]["metrics.json:score"] for r in rows] == [2, 10]
    assert all(r["params"]["shard.max_per_split"] == 256 and not r["error"] for r in rows)

