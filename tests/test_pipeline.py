"""End to end: the real dvc.yaml, every stage, on the tiny preset, as a user runs it.

The project's dvc.yaml, params.yaml and library are copied into a fresh git + DVC repository; the
preset is switched with `rcg params --preset tiny`, then `dvc exp run` runs every stage. Every
`outs` and `metrics` path of every stage must exist afterwards, and a second `dvc status` must find
nothing stale. What a user of DVC sees: `dvc plots show` draws each training run's curve
(metrics/curves/, written with tracking off too) as a line chart against the step, `dvc metrics
show` of the training stages stays narrow (their headline numbers only), and every model declared
in dvc.yaml's `artifacts` comes back whole with `dvc artifacts get`. Then: a comment edit in the
library reruns only the `code` digest stage, and `dvc exp run -S train_rdm.lr=...` (no `++`:
params.yaml holds every key) reruns the RDM and what reads it, with `dvc params diff` showing the
value that ran.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rcg import config
from tests.mlflow_view import EVERY_STAGE, check_pipeline_run

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _expected_outputs(dvc_yaml: dict, params: dict) -> list[str]:
    """Every out, metric and plot path of dvc.yaml, its `${key}` paths resolved from params.yaml."""

    def resolve(path: str, item: str | None = None) -> str:
        def value(m: re.Match) -> str:
            if m.group(1) == "item":
                return str(item)
            node: object = params
            for part in m.group(1).split("."):
                node = node[part]  # type: ignore[index]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, path)

    paths = []
    for stage in dvc_yaml["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                paths += [resolve(path, it) for it in stage.get("foreach", [None])]
    return paths


def _curve_steps(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f, delimiter="\t")]


def _logged_steps(steps: int, log_every: int) -> list[int]:
    """The steps at which the shared loop logs (rcg.training.fit): every `log_every`, and the last."""
    return [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]


def _check_curves(repo: Path, dvc: list[str], env: dict[str, str]) -> None:
    """Every training run's curve holds each log step once, and `dvc plots show` draws each stage's
    curves as line charts of loss and learning rate against the step."""
    cfg = config.load(repo / "params.yaml")  # the tiny preset: tracking off, the curves all the same
    conditions = ("rep", "none", "label", "cluster", "contrastive")
    details = {n: json.loads((repo / "metrics" / "details" / f"{n}.json").read_text())
               for n in ("encoder", "rdm", *(f"generator_{c}" for c in conditions), "evalnet")}
    rdm, gen = cfg.train_rdm, cfg.train_generator
    charts = {  # the charts of dvc.yaml's `plots`: <stage>-loss and <stage>-lr, the curves each draws
        "encoder": {cfg.encoder.curves_file: _logged_steps(details["encoder"]["steps"], cfg.encoder.log_every)},
        "rdm": {f"{rdm.curves_dir}/{n}.tsv": _logged_steps(rdm.steps, rdm.log_every) for n in ("rdm", "rdm_class")},
        "generator": {f"{gen.curves_dir}/generator_{c}.tsv": _logged_steps(details[f"generator_{c}"]["steps"],
                                                                          gen.log_every)
                      for c in conditions},
        "evalnet": {cfg.evalnet.curves_file: _logged_steps(details["evalnet"]["steps"], cfg.evalnet.log_every)},
    }
    assert details["rdm"]["train_steps"] == rdm.steps
    for curves in charts.values():
        for path, steps in curves.items():
            assert _curve_steps(repo / path) == steps, path
    shown = json.loads(_run(dvc + ["plots", "show", "--json"], repo, env).stdout)["data"]
    assert {k for k, r in shown.items() if r[0]["type"] == "vega"} == {f"{c}-{y}" for c in charts for y in ("loss", "lr")}
    for (stage, curves), y in [(c, y) for c in charts.items() for y in ("loss", "lr")]:
        spec = shown[f"{stage}-{y}"][0]["content"]
        assert spec["encoding"]["x"]["field"] == "step" and spec["layer"][0]["encoding"]["y"]["field"] == y
        assert '"mark": "line"' in json.dumps(spec), spec
        rows = spec["data"]["values"]
        assert len(rows) == sum(len(steps) for steps in curves.values()), (stage, y)
        if len(curves) > 1:  # one line per file (one dash each)
            assert {r["filename"] for r in rows} == {Path(p).name for p in curves}


def _check_metrics_width(repo: Path, dvc: list[str], env: dict[str, str]) -> None:
    """`dvc metrics show` of the stages' metrics files: a few headline numbers each (the whole record
    of 100+ keys was a 2,800-character table), so that each file's row is one readable line."""
    files = [f"metrics/{n}.json" for n in ("encoder", "rdm", "generator_rep", "generator_none",
                                           "generator_label", "evalnet", "eval")]
    table = _run(dvc + ["metrics", "show", *files], repo, {**env, "COLUMNS": "200"}).stdout
    # Ten evaluation modes' fd are most of it (555 characters, 29 columns).
    assert max(len(line) for line in table.splitlines()) <= 600, table
    assert len(table.splitlines()[0].split()) <= 32, table
    # The evaluation's headline alone: the ten modes' fd, the floor's and the time (about 240 characters).
    alone = _run(dvc + ["metrics", "show", "metrics/eval.json"], repo, {**env, "COLUMNS": "300"}).stdout
    assert max(len(line) for line in alone.splitlines()) <= 260, alone


def _check_artifacts(repo: Path, dvc: list[str], env: dict[str, str], out: Path) -> None:
    """Each model of dvc.yaml's `artifacts`, version-tagged on the commit of its run, comes back whole."""
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "the run"], repo, env)
    resolved = _resolved_artifacts(repo)
    assert {a["type"] for a in resolved.values()} == {"model"} and all(a.get("desc") for a in resolved.values())
    assert set(resolved) == {"encoder", "rdm", "generator-rep", "generator-none", "generator-label",
                             "generator-cluster", "generator-contrastive", "evalnet"}
    for name, art in resolved.items():
        _run(["git", "tag", "-a", f"{name}@v0.0.1", "-m", f"{name} v0.0.1"], repo, env)  # as `gto register` does
        _run(dvc + ["artifacts", "get", ".", name, "-o", str(out / name)], repo, env)
        got = {p.relative_to(out / name): p.read_bytes() for p in (out / name).rglob("*") if p.is_file()}
        src = repo / art["path"]
        assert got and got == {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}, name


def _resolved_artifacts(repo: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {name: {"path": a.path, "type": a.type, "desc": a.desc}
                for name, a in r.artifacts.read()["dvc.yaml"].items()}


def test_every_stage_end_to_end_with_dvc(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),  # the stages run the copied library, the one the digests hash
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)

    _run(["rcg", "params", "--preset", "tiny"], repo, env)
    _run(["git", "commit", "-qam", "tiny preset"], repo, env)
    _run(dvc + ["exp", "run"], repo, env)

    assert config.load(repo / "params.yaml").preset == "tiny"
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    missing = [p for p in _expected_outputs(stages, yaml.safe_load((repo / "params.yaml").read_text()))
               if not (repo / p).exists()]
    assert not missing, f"stage outputs missing after dvc exp run: {missing}"
    status = _run(dvc + ["status"], repo, env).stdout
    assert "changed" not in status, status
    _check_curves(repo, dvc, env)
    _check_metrics_width(repo, dvc, env)
    _run(dvc + ["plots", "show"], repo, env)  # renders to dvc_plots/, which git ignores
    assert (repo / "dvc_plots" / "index.html").exists()
    assert "dvc_plots" not in _run(["git", "status", "--porcelain"], repo, env).stdout
    check_pipeline_run(repo, EVERY_STAGE)  # what MLflow shows of it (tests/mlflow_view.py)

    # A comment-only edit: only the digest stage is stale, and rerunning it leaves all up to date.
    rdm = repo / "rcg" / "rdm.py"
    rdm.write_text(rdm.read_text() + "\n# a comment edit\n")
    status = _run(dvc + ["status", "--json"], repo, env).stdout
    assert list(json.loads(status)) == ["code"], status
    ran = _run(dvc + ["repro"], repo, env).stdout
    assert "Running stage 'code'" in ran and ran.count("Running stage") == 1, ran
    assert json.loads(_run(dvc + ["status", "--json"], repo, env).stdout) == {}

    # One value changed the DVC way: train_rdm and what reads its model rerun, nothing else.
    lr = config.load(repo / "params.yaml").train_rdm.lr
    ran = _run(dvc + ["exp", "run", "-S", f"train_rdm.lr={lr / 2}"], repo, env).stdout
    reran = set(re.findall(r"Running stage '([^']+)'", ran))
    assert reran == {"train_rdm", "evaluate", "promote"}, ran
    diff = json.loads(_run(dvc + ["params", "diff", "--json"], repo, env).stdout)
    assert list(diff) == ["params.yaml"] and list(diff["params.yaml"]) == ["train_rdm.lr"], diff
    change = diff["params.yaml"]["train_rdm.lr"]
    assert (change["old"], change["new"]) == (lr, lr / 2)
    assert config.load(repo / "params.yaml").train_rdm.lr == lr / 2
    _check_artifacts(repo, dvc, env, tmp_path / "fetched")
    check_pipeline_run(repo, {"train_rdm", "evaluate", "promote"})  # a second pipeline run
