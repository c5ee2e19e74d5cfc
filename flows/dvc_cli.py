"""Running DVC from a flow: one stage per call, experiments saved and read back, failures classified.

Prefect schedules, DVC decides what is stale (docs/design.md). Everything here shells out to the
`dvc` of the running interpreter, so the flow works from a worker whose PATH lacks the venv.
(Not named `dvc.py`: Prefect puts flows/ on sys.path when it loads an entrypoint by file, and the
module would then shadow the `dvc` package.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rcg.tracking import flatten

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
# Exit codes of a process killed from outside (preemption, a node drain): not the stage's fault.
TRANSIENT_EXIT_CODES: frozenset[int] = frozenset({-9, -15, 137, 143})


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero. Carries what the failure report and the retry decision need."""

    def __init__(self, stage: str, returncode: int, log_path: Path, transient: bool, tail: str):
        kind = "transient" if transient else "deterministic"
        super().__init__(
            f"stage {stage!r} failed with exit code {returncode} ({kind}); log: {log_path}"
        )
        self.stage = stage
        self.returncode = returncode
        self.log_path = log_path
        self.transient = transient
        self.tail = tail


def is_transient(returncode: int, output: str, extra_patterns: Iterable[str] = ()) -> bool:
    """Whether a failed command is worth retrying: killed from outside, or a known flaky fault."""
    if returncode in TRANSIENT_EXIT_CODES:
        return True
    return any(re.search(p, output) for p in (*TRANSIENT_PATTERNS, *extra_patterns))


def dvc_env(exp_name: str | None = None) -> dict[str, str]:
    """Environment for DVC and the stage commands it runs.

    The venv's bin/ goes first on PATH: stage commands call `rcg`, and DVC's experiment queue
    spawns `dvc` by name. DVC_EXP_NAME is what `dvc exp run` sets for its stages; the MLflow tags of
    every stage run (rcg.tracking) read it, so a flow run and its MLflow runs share one name.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k, v in {
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
    }.items():
        env.setdefault(k, v)
    if exp_name:
        env["DVC_EXP_NAME"] = exp_name
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
) -> tuple[int, str]:
    """Run `args`, appending its merged stdout/stderr to `log_path`; return (exit code, output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} $ {' '.join(args)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.run(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    with log_path.open() as f:
        f.seek(start)
        output = f.read()
    return proc.returncode, output


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

