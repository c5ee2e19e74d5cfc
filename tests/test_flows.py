"""The Prefect flows on a tiny DVC project the test builds: DAG order, GPU tag and limit, params as
DVC experiment, retries for transient faults only, failure report, sweep; plus the real dvc.yaml."""

from __future__ import annotations

import json
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

# A stand-in for `rcg <stage>`: records start/end times, reads params, and fails on demand
# (a file fail_<stage> holding "transient" fails once like a flaky NCCL collective; "deterministic"
# fails every time with a traceback, like a bug).
STAGE_PY = '''
import json, sys, time, pathlib, yaml
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
    pathlib.Path("train_%s.txt" % sys.argv[2]).write_text(sys.argv[2])
else:
    json.dump({"score": params["evaluate"]["n_samples"] * 2}, open("metrics.json", "w"))
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
    (p / ".gitignore").write_text("events.jsonl\nfail_*\nlogs/\n")
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
    assert stages[3].cache_false_outs == ("metrics.json",)
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
    assert [e["stage"] for e in _events(project)[len(ev):]] == ["evaluate", "evaluate"]
    assert json.loads((project / "metrics.json").read_text()) == {"score": 8}


def test_transient_retried_deterministic_reported(prefect_harness, project: Path) -> None:
    from flows.pipeline import rcg_pipeline

    (project / "fail_train@x").write_text("transient")
    (project / "fail_train@y").write_text("deterministic")
    state = rcg_pipeline(project_dir=str(project), gpu_stages=[], retries=2, retry_backoff=0.1,
                         exp_name="exp-fail", return_state=True)
    assert state.is_failed()
    assert "train@y" in state.message and "train@y.log" in state.message

    starts = [e["stage"] for e in _events(project) if e["kind"] == "start"]
    assert starts.count("train@x") == 2  # transient: failed once, retried, then succeeded
    assert starts.count("train@y") == 1  # deterministic: no retry
    assert "evaluate" not in starts  # downstream of a failure never runs

    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["train@x"].state.is_completed() and runs["train@y"].state.is_failed()
    (report,) = (project / "logs" / "flows").glob("*/failure.md")
    text = report.read_text()
    assert "stage `train@y`" in text and "deterministic" in text
    assert "ValueError: deterministic bug in train@y" in text
    log = report.parent / "train@y.log"
    assert str(log) in text and "ValueError" in log.read_text()


@pytest.mark.slow  # DVC's queue starts a celery worker: ~25 s on top of the harness
def test_sweep_queues_grid_and_collects_metrics(prefect_harness, project: Path) -> None:
    from flows.sweep import rcg_sweep

    rows = rcg_sweep(grid={"evaluate.n_samples": [1, 5]}, preset="tiny",
                     project_dir=str(project), prefix="sw")
    assert [r["name"] for r in rows] == ["sw-0", "sw-1"]
    assert [r["params"]["evaluate.n_samples"] for r in rows] == [1, 5]
    assert [r["metrics"]["metrics.json:score"] for r in rows] == [2, 10]
    assert all(r["params"]["shard.max_per_split"] == 256 and not r["error"] for r in rows)

