"""Small file helpers shared by every stage: atomic writes and JSON outputs.

Every output of the pipeline is written to a temporary file beside its destination and renamed into
place, so an interrupted run never leaves a file that looks complete. A stage that writes a set of
files (a model folder, the features) writes the whole folder beside its destination and swaps it in
at the end (`atomic_dir`), so an interrupted run never leaves new files beside old ones either.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(RuntimeError):
    """A user-facing failure (bad input, missing upstream output): the CLI prints it in one line."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: str | Path) -> list[Path]:
    """Delete the `<path>.tmp-*` and `<path>.old-*` folders an `atomic_dir` of a killed run left."""
    path = Path(path)
    stale = [Path(p) for kind in ("tmp", "old") for p in glob.glob(f"{glob.escape(str(path))}.{kind}-*")]
    for p in stale:
        _remove(p)
    return stale


def _check_replaceable(path: Path) -> None:
    """A folder `atomic_dir` replaces must be a stage's own: never the working directory or one above
    it, never one holding other folders (a misconfigured out_dir such as `data` or `.`)."""
    if path.is_symlink() or not path.is_dir():
        return
    here = Path.cwd().resolve()
    inner = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    if path.resolve() in (here, *here.parents):
        what = "the working directory or a folder above it"
    elif inner:
        what = f"a folder that holds other folders ({', '.join(inner[:5])})"
    else:
        return
    raise PipelineError(f"{path}: a stage's outputs would replace {what}; each stage needs an output "
                        "folder of its own (check the out_dir settings)")


@contextlib.contextmanager
def atomic_dir(path: str | Path, after: Iterable[str | Path] = (), enabled: bool = True) -> Iterator[Path]:
    """Yield an empty folder to write a set of outputs into; when the block succeeds, swap it in for
    `path` (the old folder, if any, is renamed away, the new one renamed in, the old one deleted).

    The yielded folder is `<path>.tmp-<pid>/<name of path>`: code that writes to `<root>/<name>` can
    be pointed at its parent. A failed block deletes it and leaves `path` untouched; a kill leaves it
    (or `<path>.old-<pid>`) as a leftover that the next `atomic_dir` of the same path deletes first.
    `after` are files that describe the folder and are written once the block ends (a stage's
    metrics file): they are deleted just before the swap, so a kill before their write leaves them
    missing (DVC reruns the stage), never describing another run's folder. With `enabled` false (a
    rank other than 0, which writes nothing) the block gets `path` itself and nothing else happens.
    """
    path = Path(path)
    if not enabled:
        yield path
        return
    _check_replaceable(path)
    clean_leftovers(path)
    stage = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp = stage / path.name
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(stage)
        raise
    for f in after:
        Path(f).unlink(missing_ok=True)
    old = path.parent / f"{path.name}.old-{os.getpid()}"
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    stage.rmdir()
    _remove(old)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (DVC metrics files, manifests, configs)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (short): names caches and checkpoints after the exact inputs that
    made them (weights, a shard manifest), so a changed input is never mistaken for the old one."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: missing (an earlier stage writes it)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def weights_only_reason(e: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in one line: the weights-only
    unpickler's own reason (e.g. the global a crafted pickle would call), not torch's paragraph
    that suggests loading the file unsafely."""
    text = str(e)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in (rest if marker else text).splitlines() if ln.strip()]
    reason = lines[0].split(". Please use")[0] if lines else ""
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__
