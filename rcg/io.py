"""Small file helpers shared by every stage: atomic writes and JSON outputs.

Every output of the pipeline is written to a temporary file beside its destination and renamed into
place, so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
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
