"""A stage that writes several files writes them as one set (rcg.io.atomic_dir): a run interrupted
between two of its outputs leaves the previous complete set untouched (or, on a first run, nothing
the next stage would read), a plain rerun writes the whole new set, and a killed run's leftovers are
deleted by the next run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rcg import config
from rcg.io import PipelineError, atomic_dir, clean_leftovers, write_json
from tests.conftest import ROOT, tiny_params
from tests.generator_workspace import build, chdir

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = {"modes": ["rcg", "oracle"]}  # evaluate reads the RDM, the rep generator and the evalnet


# --------------------------------------------------------------------------------------------------
# atomic_dir itself
# --------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Raised where a kill -9 would land: nothing of atomic_dir's clean-up runs after it."""


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_atomic_dir_swaps_the_whole_folder_and_keeps_the_old_one_on_failure(tmp_path: Path) -> None:
    out, metrics = tmp_path / "models" / "m", tmp_path / "m.json"
    with atomic_dir(out, after=[metrics]) as tmp:
        assert tmp.name == "m" and tmp.parent.name.startswith("m.tmp-") and not out.exists()
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    write_json(metrics, {"run": 1})
    with pytest.raises(RuntimeError), atomic_dir(out, after=[metrics]) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("between two outputs")
    assert _tree(out) == {"a": b"1", "b": b"1"} and metrics.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    with atomic_dir(out, after=[metrics]) as tmp:
        (tmp / "a").write_text("3")
        assert metrics.exists() and _tree(out) == {"a": b"1", "b": b"1"}  # nothing changes before the swap
    assert _tree(out) == {"a": b"3"}  # b, not written by this run, is gone
    assert not metrics.exists()  # deleted at the swap: the caller writes this run's next


def test_a_kill_during_the_swap_leaves_no_set_and_the_next_run_cleans_up(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out, metrics = tmp_path / "m", tmp_path / "m.json"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    write_json(metrics, {"run": "old"})
    real, calls = os.replace, [0]

    def replace(src: object, dst: object) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the old folder is renamed away, the new one not yet in
            raise Killed
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(Killed), atomic_dir(out, after=[metrics]) as tmp:
            (tmp / "a").write_text("new")
    assert not out.exists() and not metrics.exists()  # missing, so DVC reruns the stage
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.old-{os.getpid()}", f"m.tmp-{os.getpid()}"]
    with atomic_dir(out) as tmp:
        assert not (tmp_path / f"m.old-{os.getpid()}").exists()  # cleaned at the start
        (tmp / "a").write_text("rerun")
    assert _tree(out) == {"a": b"rerun"} and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_leftovers_of_killed_runs_are_deleted_and_a_linked_folder_is_replaced_not_emptied(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    out = tmp_path / "m"
    out.symlink_to(target)
    for name in ("m.tmp-123/m/half", "m.old-456/whole", "mine.tmp-1/x", "m.tmpx/y"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert sorted(p.name for p in clean_leftovers(out)) == ["m.old-456", "m.tmp-123"]
    with atomic_dir(out) as tmp:
        (tmp / "new").write_text("y")
    assert not out.is_symlink() and _tree(out) == {"new": b"y"} and _tree(target) == {"keep": b"x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "m", "m.tmpx", "mine.tmp-1"]


def test_atomic_dir_refuses_to_replace_a_folder_that_is_not_a_stages_own(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data" / "shards").mkdir(parents=True)  # e.g. encode.out_dir set to `data`
    monkeypatch.chdir(tmp_path)
    for path, what in (("data", r"holds other folders \(shards\)"), (".", "the working directory")):
        with pytest.raises(PipelineError, match=what), atomic_dir(path):
            pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "shards"]


def test_atomic_dir_disabled_is_the_folder_itself(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "m", enabled=False) as tmp:
        assert tmp == tmp_path / "m"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Every multi-output stage, interrupted between two of its outputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage's outputs and checkpoints, made once by the real stages (tiny preset)."""
    from rcg.stages import evalnet, evaluate, train_generator

    root = build(tiny_workspace, tmp_path_factory.mktemp("partial"))
    (root / "params.yaml").write_text(tiny_params(evaluate=MODES))
    with chdir(root):
        cfg = config.load("params.yaml")
        train_generator.run(cfg, condition="rep")
        evalnet.run(cfg)
        evaluate.run(cfg)
    return root


def _load_encoder() -> object:
    from rcg.encoders.vit import load_encoder

    return load_encoder("models/encoder")


def _read_features() -> object:
    from rcg.features import read_features

    return read_features("data/features/train.parquet")


def _load_rdm() -> object:
    from rcg.rdm import load_rdm

    return load_rdm("models/rdm", class_cond=True)


def _load_generator() -> object:
    from rcg.generators import load_generator

    return load_generator("models/generator/rep")


def _load_evalnet() -> object:
    from rcg.metrics.evalnet import load_evalnet

    return load_evalnet("models/evalnet/evalnet.safetensors")


def _read_eval() -> object:
    from rcg.io import read_json

    return read_json("metrics/details/eval.json")


@dataclass
class Case:
    stage: str  # module under rcg.stages
    out: str  # the output folder
    metrics: str | None  # its metrics file
    interrupt: str  # "module:name:n": raise on the n-th call, between two outputs
    first: str  # an output already in the temporary folder when the interrupt lands
    reader: Callable[[], object]  # what the next stage loads
    refusal: str  # how the reader refuses when there is no set
    details: str | None = None  # a second file written after the folder (evaluate's whole table)

    @property
    def files(self) -> list[str]:
        """The files beside the folder that describe it."""
        return [f for f in (self.metrics, self.details) if f]


CASES = [
    Case("encoder", "models/encoder", "metrics/encoder.json", "rcg.stages.encoder:knn_report:1",
         "encoder.safetensors", _load_encoder, r"models/encoder/encoder.json: no encoder here \(run `rcg encoder`"),
    Case("encode", "data/features", None, "rcg.stages.encode:write_split:2",
         "train.parquet", _read_features, r"data/features/train.parquet: .*not found \(run `rcg encode` first\)"),
    Case("train_rdm", "models/rdm", "metrics/rdm.json", "rcg.stages.train_rdm:train_rdm:2",
         "rdm.safetensors", _load_rdm, r"models/rdm/rdm_class.safetensors: no trained class-conditional RDM"),
    Case("train_generator", "models/generator/rep", "metrics/generator_rep.json", "rcg.generators.training:_write_grid:1",
         "generator.safetensors", _load_generator, r"models/generator/rep: no .* \(run `rcg train-generator` first\)"),
    Case("evalnet", "models/evalnet", "metrics/evalnet.json", "rcg.metrics.evalnet:write_json:1",
         "evalnet.safetensors", _load_evalnet, r"evalnet.safetensors: no evaluation network \(run `rcg evalnet`"),
    Case("evaluate", "plots", "metrics/eval.json", "rcg.stages.evaluate:save_grid:2",
         "samples_rcg.png", _read_eval, r"metrics/details/eval.json: not found", "metrics/details/eval.json"),
]


class Interrupted(Exception):
    """Raised in place of a kill between two outputs."""


def _interrupt(monkeypatch: pytest.MonkeyPatch, case: Case) -> list[str]:
    """Make the n-th call of the target raise; returns the files of the temporary folder at that moment."""
    import importlib

    module_name, name, n = case.interrupt.rsplit(":", 2)
    module = importlib.import_module(module_name)
    real, calls, seen = getattr(module, name), [0], []

    def hooked(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == int(n):
            out = Path(case.out)
            seen.extend(p.name for p in out.parent.glob(f"{out.name}.tmp-*/{out.name}/*"))
            raise Interrupted(f"{case.stage} interrupted at {case.interrupt}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, hooked)
    return seen


def _run(case: Case) -> None:
    import importlib

    mod = importlib.import_module(f"rcg.stages.{case.stage}")
    cfg = config.load("params.yaml")
    mod.run(cfg, condition="rep") if case.stage == "train_generator" else mod.run(cfg)


def _snapshot(case: Case) -> dict[str, tuple[int, str]]:
    """Every file of the set: (inode, sha256). A rewritten file has a new inode (atomic rename)."""
    files = [p for p in sorted(Path(case.out).rglob("*")) if p.is_file()]
    files += [Path(f) for f in case.files if Path(f).exists()]
    return {str(p): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def _leftovers(case: Case) -> list[Path]:
    out = Path(case.out)
    return [p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.")]


def _copy(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest, symlinks=True)
    return dest


@pytest.mark.parametrize("case", CASES, ids=[c.stage for c in CASES])
def test_an_interrupted_stage_leaves_the_old_set_or_none_and_a_rerun_writes_the_new_one(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    with chdir(_copy(project, tmp_path / "p")):
        old = _snapshot(case)
        with monkeypatch.context() as m:
            seen = _interrupt(m, case)
            with pytest.raises(Interrupted):
                _run(case)
        assert _snapshot(case) == old, "the old set was changed by an interrupted run"
        assert case.first in seen, f"the interrupt did not land after {case.first} was written: {seen}"
        assert _leftovers(case) == []
        case.reader()  # the next stage reads the old set, whole

        _run(case)  # the plain rerun writes the whole set again (resumed at the end: the same values)
        new = _snapshot(case)
        assert new.keys() == old.keys() and _leftovers(case) == []
        # (the metrics file is deleted before it is written again: its inode number may come back)
        assert all(new[f][0] != old[f][0] for f in new if f not in case.files), "the folder was not rewritten"
        assert {f: v[1] for f, v in new.items() if f not in case.files} == {
            f: v[1] for f, v in old.items() if f not in case.files}
        case.reader()

        # A first run (or one under `dvc repro`, which deletes the outputs first) leaves nothing.
        shutil.rmtree(case.out)
        for f in case.files:
            Path(f).unlink()
        with monkeypatch.context() as m:
            _interrupt(m, case)
            with pytest.raises(Interrupted):
                _run(case)
        assert not Path(case.out).exists() and _leftovers(case) == []
        assert not any(Path(f).exists() for f in case.files)
        with pytest.raises((PipelineError, FileNotFoundError), match=case.refusal):
            case.reader()


def test_a_train_rdm_killed_between_its_two_models_is_repaired_by_its_rerun(project: Path, tmp_path: Path) -> None:
    """A real SIGKILL between the two RDMs: the old set stays whole, the temporary folder holding
    the new `rdm.*` is left behind, and the plain rerun deletes it and writes the new set."""
    case = CASES[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tests.killpoint", "--before", "rcg.stages.train_rdm:train_rdm:2", "--",
           "train-rdm", "--set", "train_rdm.seed=1"]  # other settings: a new set, trained from scratch
    with chdir(_copy(project, tmp_path / "p")) as root:
        old = _snapshot(case)
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        (left,) = _leftovers(case)
        assert sorted(p.name for p in (left / "rdm").iterdir()) == ["rdm.json", "rdm.safetensors"]
        assert _snapshot(case) == old
        _load_rdm()  # the old class-conditional RDM, beside the old RDM it was trained with

        rerun = [sys.executable, "-m", "rcg.cli", *cmd[cmd.index("--") + 1:]]
        r = subprocess.run(rerun, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        new = _snapshot(case)
        assert _leftovers(case) == [] and new.keys() == old.keys()
        changed = sorted(f for f in new if new[f][1] != old[f][1])  # the seed is not in the .json files
        assert changed == ["metrics/rdm.json", "models/rdm/rdm.safetensors", "models/rdm/rdm_class.safetensors"]
