"""Prefect flow: a small grid of DVC experiments, queued, run by DVC's queue, metrics collected.

The preset and common overrides are written to params.yaml first, as `rcg params --preset P --set
K=V` does (rcg.config.write_params); each grid point then becomes `dvc exp run --queue -n <name> -S
key=value ...` (params.yaml holds every key, so no `++`), and DVC runs the queue in
isolated temporary workspaces (`dvc exp run --run-all -j <jobs>`), and the flow reads every
experiment's params and metrics back from `dvc exp show --json` into one table (a Prefect table
artifact, and the flow's return value). Compare afterwards with `dvc exp show` or apply the winner
with `dvc exp apply <name>`.

    python -m flows.sweep --grid train_rdm.lr=1e-4,5e-4 --grid train_rdm.lr_decay_frac=0,0.3 --preset tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run

from flows import dvc_cli as dvc_mod
from flows.stage_log import OutputRelay
from rcg import config as config_mod


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of `grid` ({"train_rdm.lr": [1e-4, 5e-4], ...}), keys in given order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _value(v: Any) -> str:
    """A grid value as `-S` override text (YAML flow style keeps lists and strings intact)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def check_points(params_file: Path, all_sets: list[list[str]]) -> None:
    """Validate every grid point against rcg.config before anything is queued.

    A misspelt key or a wrong type then fails at once, naming the key (rcg.config.ConfigError),
    instead of in every queued experiment. Projects whose params.yaml is not an rcg config, and
    overrides aimed at other files (`file.yaml:key=v`), are left to DVC.
    """
    try:
        config_mod.load(params_file)
    except config_mod.ConfigError:
        return  # not an rcg params.yaml: nothing to check against
    for sets in all_sets:
        plain = [s for s in sets if ":" not in s.split("=", 1)[0]]
        config_mod.load(params_file, config_mod.parse_set(plain))


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="queue {name}")
def queue_experiment(project_dir: str, name: str, sets: list[str]) -> str:
    """`dvc exp run --queue -n name -S ...`: one grid point waiting in DVC's queue."""
    args = ["exp", "run", "--queue", "-n", name]
    for s in sets:
        args += ["-S", s]
    proc = subprocess.run(dvc_mod.dvc_cmd(*args), cwd=project_dir, env=dvc_mod.dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp run --queue -n {name}: {proc.stderr.strip()}")
    return name


@task(cache_policy=NO_CACHE, persist_result=False)
def run_queue(project_dir: str, jobs: int, log_path: str) -> int:
    """Run every queued experiment (`dvc exp run --run-all -j jobs`); log to `log_path` and, as it
    runs, to the task log (flows.stage_log)."""
    logger = get_run_logger()
    code, output = dvc_mod.run_logged(
        dvc_mod.dvc_cmd("exp", "run", "--run-all", "-j", str(jobs)),
        project_dir, Path(log_path), env=dvc_mod.dvc_env(), header="sweep",
        relay=OutputRelay(lambda level, msg: logger.log(level, "%s", msg)),
    )
    logger.info("dvc exp run --run-all: exit code %d, log: %s", code, log_path)
    return code


@task(cache_policy=NO_CACHE, persist_result=False)
def collect_metrics(project_dir: str, names: list[str]) -> list[dict]:
    """Params and metrics of the sweep's experiments (one row each, missing ones flagged)."""
    rows = dvc_mod.experiment_table(project_dir, names)
    found = {r["name"] for r in rows}
    rows += [{"name": n, "error": "experiment not found (failed in the queue?)",
              "params": {}, "metrics": {}} for n in names if n not in found]
    return rows


@flow(name="rcg-sweep", persist_result=False)
def rcg_sweep(
    grid: dict[str, list[Any]],
    overrides: list[str] | None = None,
    project_dir: str = ".",
    jobs: int = 1,
    prefix: str | None = None,
    preset: str | None = None,
) -> list[dict]:
    """Queue one DVC experiment per grid point, run them, collect metrics.

    `preset` and the common `overrides` are written to params.yaml first (rcg.config.write_params),
    so every experiment starts from them. Returns one row per experiment: name, params, metrics
    (flattened, `file:key`), error.
    """
    logger = get_run_logger()
    root = str(Path(project_dir).resolve())
    run_name = runtime_flow_run.get_name() or time.strftime("sweep-%H%M%S")
    prefix = prefix or f"sweep-{run_name}"
    params_file = Path(root) / "params.yaml"
    if preset or overrides:
        cfg = config_mod.write_params(params_file, preset, overrides or [])
        logger.info("params.yaml: every value of preset %s, then %s", cfg.preset,
                    " ".join(overrides or []) or "no overrides")
    all_sets = [[f"{k}={_value(v)}" for k, v in point.items()] for point in grid_points(grid)]
    check_points(params_file, all_sets)
    names = [queue_experiment(root, f"{prefix}-{i}", sets) for i, sets in enumerate(all_sets)]
    logger.info("queued %d experiments: %s", len(names), ", ".join(names))
    code = run_queue(root, jobs, str(Path(root) / "logs" / "flows" / f"{prefix}.log"))
    rows = collect_metrics(root, names)
    table = [
        {"name": r["name"], **{k: r["params"].get(k) for k in grid}, **r["metrics"],
         "error": r.get("error") or ""}
        for r in rows
    ]
    create_table_artifact(key="rcg-sweep", table=table, description=f"sweep {prefix}")
    failed = [r["name"] for r in rows if r.get("error")]
    if code != 0 or failed:
        logger.warning("sweep: queue exit code %d; failed experiments: %s", code,
                       ", ".join(failed) or "none")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="one grid axis, values parsed as YAML (repeatable)")
    p.add_argument("--preset", default=None, help="write every value of this preset to params.yaml")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="common override, as `rcg params --set` (repeatable)")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    grid = {}
    for axis in args.grid:
        key, _, values = axis.partition("=")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    rows = rcg_sweep(grid=grid, overrides=args.overrides, project_dir=args.project_dir,
                     jobs=args.jobs, preset=args.preset)
    print(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
