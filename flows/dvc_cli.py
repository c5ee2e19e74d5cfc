"""Running DVC from a flow: one stage per call, experiments saved and read back, failures classified.

Prefect schedules, DVC decides what is stale (docs/design.md). Everything here shells out to the
`dvc` of the running interpreter, so the flow works from a worker whose PATH lacks the venv.
(Not named `dvc.py`: Prefect puts flows/ on sys.path when it loads an entrypoint by file, and the
module would then shadow the `dvc` package.)
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from flows.stage_log import OutputRelay
from rcg.tracking import PIPELINE_ENV, flatten

# Output that marks a failure as transient: running the same command again may well succeed.
# Everything else (a Python traceback, a PipelineError, a config error) is deterministic: retrying
# would fail the same way and only delay the report.
TRANSIENT_PATTERNS: tuple[str, ...] = (
    r"Unable to acquire lock",  # DVC: another dvc process holds the repo lock right now
    r"NCCL (error|timeout|WARN.*timeout)",  # a collective that timed out on a flaky interconnect
    r"Watchdog caught collective operation timeout",
    r"Rendezvous(Timeout|Closed)Error",  # torchrun could not gather its peers in time
    r"CUDA-capable device\(s\) (is|are) busy or unavailable",  # GPU held by another job
    r"uncorrectable ECC error",  # hardware hiccup: the next attempt lands on a healthy state
    r"Connection (reset|refused|timed out)|ConnectionResetError|ReadTimeout",
    r"Temporary failure in name resolution",
    r"\b(502 Bad Gateway|503 Service Unavailable|504 Gateway Time-?out|429 Too Many Requests)\b",
)
OUTPUT_GRACE = 5.0  # s to wait for the end of a command's output after the command exited
# Exit codes of a process killed from outside (preemption, a node drain): not the stage's fault.
TRANSIENT_EXIT_CODES: frozenset[int] = frozenset({-9, -15, 137, 143})


# What `dvc repro --single-item <stage>` did with a stage, read from DVC's own words in its output.
RAN, UP_TO_DATE, RESTORED = "ran", "up to date", "restored from run cache"


def stage_outcome(output: str) -> str:
    """RAN, UP_TO_DATE (nothing it depends on changed) or RESTORED (DVC's run cache held outputs
    for exactly these inputs, so it checked them out instead of running the command)."""
    if "didn't change, skipping" in output:
        return UP_TO_DATE
    if "is cached - skipping run" in output:
        return RESTORED
    return RAN


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero. Carries what the failure report and the retry decision need."""

    def __init__(self, stage: str, returncode: int, log_path: Path, transient: bool, tail: str,
                 seconds: float | None = None):
        kind = "transient" if transient else "deterministic"
        super().__init__(
            f"stage {stage!r} failed with exit code {returncode} ({kind}); log: {log_path}"
        )
        self.stage = stage
        self.returncode = returncode
        self.log_path = log_path
        self.transient = transient
        self.tail = tail
        self.seconds = seconds  # how long the failed attempt ran


def is_transient(returncode: int, output: str, extra_patterns: Iterable[str] = ()) -> bool:
    """Whether a failed command is worth retrying: killed from outside, or a known flaky fault."""
    if returncode in TRANSIENT_EXIT_CODES:
        return True
    return any(re.search(p, output) for p in (*TRANSIENT_PATTERNS, *extra_patterns))


def dvc_env(exp_name: str | None = None, pipeline_run: str | None = None) -> dict[str, str]:
    """Environment for DVC and the stage commands it runs.

    The venv's bin/ goes first on PATH: stage commands call `rcg`, and DVC's experiment queue
    spawns `dvc` by name. DVC_EXP_NAME is what `dvc exp run` sets for its stages; the MLflow tags of
    every stage run (rcg.tracking) read it, so a flow run and its MLflow runs share one name.
    `pipeline_run` (the flow run's id) becomes RCG_PIPELINE_RUN: the stages' MLflow runs nest under
    one parent run per flow run.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k, v in {
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # a stage's prints reach the task log as they happen
    }.items():
        env.setdefault(k, v)
    if exp_name:
        env["DVC_EXP_NAME"] = exp_name
    if pipeline_run:
        env[PIPELINE_ENV] = pipeline_run
    return env


def dvc_cmd(*args: str) -> list[str]:
    """`dvc <args>` run by this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "dvc", *args]


def run_logged(
    args: Sequence[str],
    cwd: str | Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    header: str = "",
    relay: OutputRelay | None = None,
) -> tuple[int, str]:
    """Run `args`, appending its merged stdout/stderr to `log_path`; return (exit code, output).

    The output is read as it comes (a thread copies it to the log file), so `relay` sees every
    piece while the command runs: the Prefect task log follows the stage live.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} $ {' '.join(args)}\n")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pieces: queue.Queue[bytes | None] = queue.Queue()
    threading.Thread(target=_copy_output, args=(proc, log_path, pieces), daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text: list[str] = []
    try:
        for chunk in _pieces_until_exit(proc, pieces, relay):
            text.append(decoder.decode(chunk))
            if relay is not None:
                relay.feed(text[-1])
        text.append(decoder.decode(b"", final=True))
        if relay is not None:
            relay.feed(text[-1])
            relay.close()
    except BaseException:  # interrupted (a cancelled flow run): the stage must not outlive it
        proc.kill()
        raise
    finally:
        code = proc.wait()
    return code, "".join(text)


def _copy_output(proc: subprocess.Popen, log_path: Path, pieces: queue.Queue) -> None:
    """Reader thread: every piece of output to the log file (flushed) and to `pieces`; None at EOF."""
    with log_path.open("ab") as log:
        while chunk := proc.stdout.read1(1 << 16):
            log.write(chunk)
            log.flush()
            pieces.put(chunk)
    pieces.put(None)


def _pieces_until_exit(proc: subprocess.Popen, pieces: queue.Queue,
                       relay: OutputRelay | None) -> Iterator[bytes]:
    """The output pieces until EOF, or until OUTPUT_GRACE s after the command exited.

    A process the stage left behind (a daemon that inherited the stream) can hold the pipe open
    long after the stage ended; the stage's exit code, not that process, ends the task.
    """
    exited_at: float | None = None
    while True:
        try:
            chunk = pieces.get(timeout=0.5)
        except queue.Empty:
            if relay is not None:
                relay.tick()  # a quiet stage still gets its pending progress line
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > OUTPUT_GRACE:
                    return
            continue
        if chunk is None:
            return
        yield chunk


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def save_experiment(project_dir: str | Path, name: str, include: Iterable[str] = ()) -> str:
    """Record the workspace as DVC experiment `name` (`dvc exp save`); return DVC's message.

    `include` lists untracked files to keep in the experiment (metrics and plots with cache: false
    that git does not track yet).
    """
    args = ["exp", "save", "-f", "-n", name]
    for p in include:
        if (Path(project_dir) / p).exists():
            args += ["-I", p]
    proc = subprocess.run(
        dvc_cmd(*args), cwd=project_dir, env=dvc_env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp save failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def experiment_table(project_dir: str | Path, names: Iterable[str]) -> list[dict]:
    """Params and metrics of the named experiments, from `dvc exp show --json`, one dict each."""
    wanted = set(names)
    proc = subprocess.run(
        dvc_cmd("exp", "show", "--json", "--no-fetch"),
        cwd=project_dir,
        env=dvc_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for commit in json.loads(proc.stdout):
        for exp in commit.get("experiments") or []:
            if exp.get("name") not in wanted:
                continue
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            rows.append(
                {
                    "name": exp["name"],
                    "rev": rev.get("rev"),
                    "error": (rev.get("error") or {}).get("msg"),
                    "params": _by_file(data.get("params", {}), default="params.yaml"),
                    "metrics": _by_file(data.get("metrics", {})),
                }
            )
    return sorted(rows, key=lambda r: r["name"])


def _by_file(files: dict, default: str = "") -> dict:
    """{file: {"data": nested}} -> {"file:a.b": value}; keys of `default` carry no file prefix."""
    out: dict = {}
    for f, v in files.items():
        out.update(flatten(v.get("data") or {}, "" if f == default else f"{f}:"))
    return out

