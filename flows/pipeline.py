"""Prefect flow: the DVC pipeline, one task per stage (`dvc repro --single-item <stage>`), in DAG order.

DVC owns the DAG and what is stale, Prefect schedules (docs/design.md). The flow reads the stages
from DVC (flows.dag; the `code` digest stage first), writes the preset and overrides to params.yaml
as `rcg params --preset P --set K=V` does (rcg.config.write_params), runs every stage as a task
once its upstreams completed (independent stages run side by side), and saves the workspace as a
DVC experiment named after the flow run. GPU stages carry the `gpu` tag, held to a Prefect
concurrency limit (one stage per GPU slot). Transient faults are retried after a delay;
deterministic ones fail at once, with a report naming the stage and its log. Prefect result caching
is off: DVC alone decides what needs to run.

What the UI shows: each task's log follows its stage live (log records, a progress line every few
seconds); a stage DVC found up to date ends in the state "Up to date" (restored from DVC's run
cache: "Restored"); the run ends with the artifacts `rcg-evaluation` (evaluation table, stages,
links to the MLflow runs: flows.run_report) and `rcg-pipeline-stages`.

    python -m flows.pipeline run --preset tiny -S train_rdm.steps=10   # one run, in process
    python -m flows.pipeline run --force                               # every stage, even up to date
    python -m flows.pipeline serve                                     # flow.serve on this machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task

from flows import dvc_cli as dvc_mod
from flows import run_report
from flows.dag import DEFAULT_GPU_STAGES, Stage, read_stages, select
from flows.stage_log import OutputRelay
from rcg import config as config_mod

GPU_TAG = "gpu"
LOG_ROOT = "logs/flows"  # per flow run: one log file per stage, failure.md when something failed
# Names of the Completed states of stages DVC did not run (the UI shows them on the task runs).
UP_TO_DATE_STATE, RESTORED_STATE = "Up to date", "Restored"


class PipelineFailed(RuntimeError):
    """Raised by the flow when a stage failed; the message names the stage and its log."""


def _retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry only a StageFailed marked transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # an unreadable result is not evidence of a transient fault
            return False
    return isinstance(exc, dvc_mod.StageFailed) and exc.transient


@task(
    cache_policy=NO_CACHE,  # DVC decides what is stale; a Prefect cache would skip real work
    persist_result=False,
    retry_condition_fn=_retry_transient,
)
def dvc_stage(
    stage: str,
    project_dir: str,
    log_dir: str,
    exp_name: str | None = None,
    force: bool = False,
    transient_patterns: list[str] | None = None,
    pipeline_run: str | None = None,
) -> State:
    """Run one DVC stage with `dvc repro --single-item`; raise StageFailed on a non-zero exit.

    The stage's output streams into this task's log as it runs (its log records, and its progress
    bars every few seconds: flows.stage_log) and into its log file in full. A stage DVC did not
    run ends in a Completed state of its own name (UP_TO_DATE_STATE, RESTORED_STATE).
    """
    logger = get_run_logger()
    log_path = Path(log_dir) / f"{stage}.log"
    args = dvc_mod.dvc_cmd("repro", "--single-item", *(["--force"] if force else []), stage)
    logger.info("stage %s: `dvc repro --single-item%s %s`, full log: %s",
                stage, " --force" if force else "", stage, log_path)
    relay = OutputRelay(lambda level, msg: logger.log(level, "%s", msg))
    t0 = time.perf_counter()
    code, output = dvc_mod.run_logged(
        args, project_dir, log_path, env=dvc_mod.dvc_env(exp_name, pipeline_run), header=stage, relay=relay
    )
    seconds = round(time.perf_counter() - t0, 2)
    if code != 0:
        transient = dvc_mod.is_transient(code, output, transient_patterns or ())
        logger.error(
            "stage %s: exit code %d (%s) after %.1fs; last lines of %s:\n%s",
            stage, code, "transient, may retry" if transient else "deterministic, no retry",
            seconds, log_path, dvc_mod.tail(output, 15),
        )
        raise dvc_mod.StageFailed(stage, code, log_path, transient, dvc_mod.tail(output), seconds)
    outcome = dvc_mod.stage_outcome(output)
    result = {"stage": stage, "seconds": seconds, "outcome": outcome, "log": str(log_path)}
    if outcome == dvc_mod.RAN:
        logger.info("stage %s: ran in %.1fs", stage, seconds)
        return Completed(data=result)
    message = (f"DVC found stage {stage} up to date (nothing it depends on changed): not run"
               if outcome == dvc_mod.UP_TO_DATE else
               f"DVC restored the outputs of stage {stage} from its run cache: not run")
    logger.info("%s (%.1fs)", message, seconds)
    name = UP_TO_DATE_STATE if outcome == dvc_mod.UP_TO_DATE else RESTORED_STATE
    return Completed(name=name, message=message, data=result)


def ensure_gpu_limit(slots: int) -> None:
    """Create the `gpu` tag concurrency limit with `slots` slots unless one already exists.

    An existing limit is left alone: it belongs to whoever runs the work pool (e.g. 8 on an 8-GPU
    node, set with `prefect concurrency-limit create gpu 8`).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if slots <= 0:
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)


def _failure_report(stages: list[Stage], states: dict[str, str], errors: dict[str, Exception],
                    log_dir: Path) -> str:
    lines = ["# rcg pipeline: failed", ""]
    for name, exc in errors.items():
        if isinstance(exc, dvc_mod.StageFailed):
            kind = "transient (retries exhausted)" if exc.transient else "deterministic (no retry)"
            lines += [
                f"## stage `{name}`: exit code {exc.returncode}, {kind}",
                f"log: `{exc.log_path}`",
                "",
                "```",
                exc.tail,
                "```",
                "",
            ]
        else:
            lines += [f"## stage `{name}`: {exc!r}", f"log: `{log_dir / (name + '.log')}`", ""]
    lines += ["## all stages", "", "| stage | state |", "|---|---|"]
    lines += [f"| {s.name} | {states.get(s.name, 'NOT RUN')} |" for s in stages]
    return "\n".join(lines) + "\n"


def _run_stages(stages: list[Stage], gpu: tuple[str, ...], retries: int, retry_delay: float,
                stage_args: tuple) -> dict[str, PrefectFuture]:
    """One `dvc_stage` task per stage, each waiting for its upstreams; returns once all ended.

    The retry delay is one number: the Prefect UI shows a task's delay as a single duration (a
    list of delays, as `exponential_backoff` makes, shows there as NaN).
    """
    futures: dict[str, PrefectFuture] = {}
    for s in stages:
        tags = [GPU_TAG, "stage"] if s.is_gpu(gpu) else ["stage"]
        task_ = dvc_stage.with_options(name=f"dvc-{s.base}", task_run_name=s.name, tags=tags,
                                       retries=retries, retry_delay_seconds=retry_delay)
        futures[s.name] = task_.submit(
            s.name, *stage_args, wait_for=[futures[u] for u in s.upstream if u in futures])
    wait(list(futures.values()))
    return futures


def _outcomes(futures: dict[str, PrefectFuture]) -> tuple[dict[str, str], dict[str, Exception]]:
    """({stage: final state name}, {stage: its exception} for the failed ones)."""
    states: dict[str, str] = {}
    errors: dict[str, Exception] = {}
    for name, fut in futures.items():
        state = fut.state
        states[name] = state.name
        if state.is_failed():
            exc = state.result(raise_on_failure=False)
            errors[name] = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
    return states, errors


def _stage_results(stages: list[Stage], futures: dict[str, PrefectFuture], gpu: tuple[str, ...],
                   errors: dict[str, Exception]) -> list[run_report.StageResult]:
    """What each stage did (ran, up to date, restored, failed, not run), for the reports."""
    results = []
    for s in stages:
        state = futures[s.name].state
        outcome, seconds = run_report.NOT_RUN, None
        if state.is_completed():
            data = futures[s.name].result()
            outcome, seconds = data["outcome"], data["seconds"]
        elif s.name in errors:
            outcome, seconds = run_report.FAILED, getattr(errors[s.name], "seconds", None)
        results.append(run_report.StageResult(s.name, outcome, seconds, s.is_gpu(gpu), state.name))
    return results


def _publish_results(root: Path, run_name: str, exp_name: str, log_dir: Path,
                     results: list[run_report.StageResult]) -> None:
    """The stage table artifact and the `rcg-evaluation` Markdown artifact of this run."""
    create_table_artifact(key="rcg-pipeline-stages", table=run_report.stage_rows(results),
                          description=f"rcg pipeline stages, DVC experiment {exp_name}")
    evaluate = next((r.outcome for r in results if r.stage.split("@")[0] == "evaluate"), None)
    try:
        cfg = config_mod.load(root / "params.yaml")
    except config_mod.ConfigError as e:  # not an rcg params.yaml: no evaluation file, no tracking
        evaluation = mlflow = f"Not available: {e}"
    else:
        evaluation = run_report.evaluation_markdown(root, cfg.evaluate.details_file,
                                                    cfg.evalnet.metrics_file, evaluate)
        mlflow = run_report.mlflow_markdown(root, cfg.tracking, exp_name, skipped=any(
            r.outcome in (dvc_mod.UP_TO_DATE, dvc_mod.RESTORED) for r in results))
    create_markdown_artifact(
        key="rcg-evaluation",
        markdown=run_report.summary_markdown(run_name, exp_name, results, log_dir, evaluation,
                                             mlflow),
        description=f"rcg pipeline run {run_name}: evaluation, stages, MLflow runs",
    )
    get_run_logger().info("stages: %s; summary in the artifact rcg-evaluation",
                          run_report.counts_line(results))


def _report_failure(stages: list[Stage], states: dict[str, str], errors: dict[str, Exception],
                    log_dir: Path) -> None:
    """Write failure.md (also a Prefect artifact) and raise PipelineFailed naming the first failure."""
    report = _failure_report(stages, states, errors, log_dir)
    (log_dir / "failure.md").parent.mkdir(parents=True, exist_ok=True)
    (log_dir / "failure.md").write_text(report)
    create_markdown_artifact(key="rcg-pipeline-failure", markdown=report)
    first = next(iter(errors))
    first_log = getattr(errors[first], "log_path", log_dir / f"{first}.log")
    raise PipelineFailed(
        f"stage {first!r} failed (log: {first_log}); "
        f"{len(errors)} failed, report: {log_dir / 'failure.md'}"
    )


@flow(
    name="rcg-pipeline",
    persist_result=False,
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # independent stages side by side
)
def rcg_pipeline(
    preset: str | None = None,
    overrides: list[str] | None = None,
    targets: list[str] | None = None,
    project_dir: str = ".",
    gpu_stages: list[str] | None = None,
    gpu_slots: int = 1,
    retries: int = 2,
    retry_delay: float = 30.0,
    transient_patterns: list[str] | None = None,
    force: bool = False,
    exp_name: str | None = None,
    save_experiment: bool = True,
) -> dict[str, str]:
    """Run the DVC pipeline as Prefect tasks; return {stage: final state name}.

    preset / overrides: written to params.yaml like `rcg params --preset P --set key=value` (every
        value of preset P, or of the current file without one, then the overrides), so the run is
        also a DVC experiment (saved as `exp_name`, default `prefect-<flow run name>`).
    targets: only these stages and their upstreams (default: every stage in dvc.yaml).
    gpu_stages: dvc.yaml entries tagged `gpu` (default: flows.dag.DEFAULT_GPU_STAGES).
    gpu_slots: size of the `gpu` concurrency limit, created when missing (0: leave limits alone).
    retries / retry_delay: attempts after a transient failure, each `retry_delay` seconds after
        the failed one.
    force: run every stage even if DVC finds it up to date (`dvc repro --force`).
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    run_name = runtime_flow_run.get_name() or time.strftime("run-%Y%m%d-%H%M%S")
    exp_name = exp_name or f"prefect-{run_name}"
    log_dir = root / LOG_ROOT / run_name
    gpu = DEFAULT_GPU_STAGES if gpu_stages is None else tuple(gpu_stages)

    if preset or overrides:
        cfg = config_mod.write_params(root / "params.yaml", preset, overrides or [])
        logger.info("params.yaml: preset %s, then %s", cfg.preset, " ".join(overrides or []) or "-")
    stages = select(read_stages(root), targets)
    logger.info(
        "%d stages in DAG order: %s (gpu: %s); logs in %s",
        len(stages), ", ".join(s.name for s in stages),
        ", ".join(s.name for s in stages if s.is_gpu(gpu)) or "none", log_dir,
    )
    if any(s.is_gpu(gpu) for s in stages):
        ensure_gpu_limit(gpu_slots)

    futures = _run_stages(stages, gpu, retries, retry_delay,
                          (str(root), str(log_dir), exp_name, force, transient_patterns,
                           str(runtime_flow_run.get_id() or run_name)))
    states, errors = _outcomes(futures)
    _publish_results(root, run_name, exp_name, log_dir, _stage_results(stages, futures, gpu, errors))
    if errors:
        _report_failure(stages, states, errors, log_dir)
    if save_experiment:
        include = [o for s in stages for o in s.cache_false_outs]
        try:
            logger.info("%s", dvc_mod.save_experiment(root, exp_name, include))
        except RuntimeError as e:  # e.g. no git commit yet: the stages still ran fine
            logger.warning("not saved as a DVC experiment: %s", e)
    return states


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline run|serve`: one local run, or serve the flow on this machine."""
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "serve"])
    p.add_argument("--preset", default=None, help="write every value of this preset to params.yaml")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="params override, as `rcg params --set`")
    p.add_argument("--target", dest="targets", action="append", default=None)
    p.add_argument("--project-dir", default=".")
    p.add_argument("--gpu-slots", type=int, default=1)
    p.add_argument("--force", action="store_true",
                   help="run every stage even if DVC finds it up to date (dvc repro --force)")
    p.add_argument("--name", default="rcg-local", help="deployment name for `serve`")
    args = p.parse_args(argv)
    params = dict(preset=args.preset, overrides=args.overrides, targets=args.targets,
                  project_dir=args.project_dir, gpu_slots=args.gpu_slots, force=args.force)
    if args.action == "serve":
        rcg_pipeline.serve(name=args.name, parameters=params)
        return 0
    states = rcg_pipeline(**params)
    print("\n".join(f"{k}: {v}" for k, v in states.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
