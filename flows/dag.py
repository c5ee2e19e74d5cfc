"""The pipeline DAG as DVC sees it: stages from dvc.yaml in dependency order (docs/design.md).

DVC owns the DAG. This module does not keep a second copy of it: it asks DVC's own index for the
stages (including the ones a `foreach` expands to, e.g. `train_generator@rep`) and for the edges
DVC derives from outs -> deps, and only adds a topological order and the GPU tag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Stages that do their heavy work on a GPU when one is present. Matched on the name before `@`, so
# `train_generator@rep` is a GPU stage too. Flow parameters can replace this set.
DEFAULT_GPU_STAGES: tuple[str, ...] = (
    "encoder",
    "encode",
    "train_rdm",
    "tokenizer",
    "train_generator",
    "evaluate",
)


@dataclass(frozen=True)
class Stage:
    """One runnable DVC stage: its address (what `dvc repro --single-item` takes) and upstreams."""

    name: str  # DVC address, e.g. "train_rdm" or "train_generator@rep"
    cmd: str
    upstream: tuple[str, ...] = field(default_factory=tuple)
    cache_false_outs: tuple[str, ...] = field(default_factory=tuple)  # metrics/plots kept in git

    @property
    def base(self) -> str:
        """The dvc.yaml entry a foreach stage came from (`train_generator@rep` -> `train_generator`)."""
        return self.name.split("@", 1)[0]

    def is_gpu(self, gpu_stages: Iterable[str]) -> bool:
        names = set(gpu_stages)
        return self.name in names or self.base in names


def read_stages(project_dir: str | Path = ".") -> list[Stage]:
    """All pipeline stages of the DVC project at `project_dir`, upstreams first.

    The order is a topological order of DVC's stage graph, ties broken by dvc.yaml order, so the
    flow's task list reads like the file. `.dvc` files (data added with `dvc add`) have no command
    and are left out: they are inputs, not work.
    """
    from dvc.repo import Repo  # heavy import (~1 s): only when the DAG is needed

    root = Path(project_dir).resolve()
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # networkx DiGraph, edge (stage -> a stage it depends on)
        order = {s: i for i, s in enumerate(graph.nodes)}
        runnable = {s for s in graph.nodes if getattr(s, "cmd", None)}
        stages: list[Stage] = []
        done: set[object] = set()
        # Kahn's algorithm over DVC's edges: a stage is ready once all its dependencies are done.
        pending = sorted(graph.nodes, key=order.__getitem__)
        while pending:
            ready = [s for s in pending if all(d in done for d in graph.successors(s))]
            if not ready:  # DVC itself rejects cycles; this guards against a misuse of the graph
                raise RuntimeError("dvc.yaml: the stage graph has a cycle")
            for s in ready:
                done.add(s)
                pending.remove(s)
                if s not in runnable:
                    continue
                ups = tuple(sorted(_address(d, root) for d in _runnable_ancestors(graph, s, runnable)))
                outs = tuple(str(o.def_path) for o in s.outs if not o.use_cache)
                stages.append(Stage(_address(s, root), _cmd_text(s.cmd), ups, outs))
    return stages


def _address(stage, root: Path) -> str:
    """What `dvc repro` takes when run from `root`: `name`, or `sub/dvc.yaml:name` elsewhere.

    (DVC's own `stage.addressing` is relative to the process's cwd, not to the project.)
    """
    dvcfile = Path(stage.path).resolve()
    if dvcfile.parent == root:
        return stage.name
    return f"{dvcfile.relative_to(root)}:{stage.name}"


def _runnable_ancestors(graph, stage, runnable) -> set:
    """The nearest runnable stages `stage` depends on (looking through `.dvc` data stages)."""
    found: set = set()
    todo = list(graph.successors(stage))
    seen: set = set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        if d in runnable:
            found.add(d)
        else:
            todo.extend(graph.successors(d))
    return found


def _cmd_text(cmd: str | list[str]) -> str:
    return cmd if isinstance(cmd, str) else " && ".join(cmd)


def select(stages: list[Stage], targets: Iterable[str] | None) -> list[Stage]:
    """`stages` restricted to `targets` and everything they depend on (like `dvc repro <targets>`).

    A target may be a full address (`train_generator@rep`) or a dvc.yaml entry name
    (`train_generator`, meaning every item of its foreach).
    """
    if not targets:
        return stages
    by_name = {s.name: s for s in stages}
    wanted: set[str] = set()
    for t in targets:
        matches = [s.name for s in stages if s.name == t or s.base == t]
        if not matches:
            known = ", ".join(s.name for s in stages)
            raise KeyError(f"stage {t!r} is not in dvc.yaml (stages: {known})")
        todo = list(matches)
        while todo:
            n = todo.pop()
            if n not in wanted:
                wanted.add(n)
                todo.extend(by_name[n].upstream)
    return [s for s in stages if s.name in wanted]
