"""Run an `rcg` command that kills itself with SIGKILL at a chosen point, as a crash or `kill -9` would.

    python -m tests.killpoint [--before MODULE:NAME:N] [--mid-save N] -- <rcg arguments>

`--before rcg.stages.train_rdm:train_rdm:2` kills the process as that function is called for the
N-th time (e.g. between a stage's two models). `--mid-save N` kills it half-way through the N-th
`torch.save` (a checkpoint write): the first half of the bytes are in the checkpoint's temporary file
when the kill lands. Nothing else changes: the command is `rcg.cli.main` with the given arguments.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import signal
import sys
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before(target: str) -> None:
    """Kill the process when `module:name` is called for the `n`-th time (target `module:name:n`)."""
    module_name, name, n = target.rsplit(":", 2)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), [0]

    def hooked(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == int(n):
            _die()
        return real(*args, **kwargs)

    setattr(module, name, hooked)


def kill_mid_save(n: int) -> None:
    """Kill the process half-way through the `n`-th `torch.save` to a file path."""
    import torch

    real, calls = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == n and isinstance(f, (str, os.PathLike)):
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
            _die()
        real(obj, f, *args, **kwargs)

    torch.save = save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", action="append", default=[], help="MODULE:NAME:N")
    p.add_argument("--mid-save", type=int, default=0, help="N: kill inside the N-th torch.save")
    p.add_argument("rcg", nargs=argparse.REMAINDER, help="-- then the rcg arguments")
    args = p.parse_args(argv)
    for target in args.before:
        kill_before(target)
    if args.mid_save:
        kill_mid_save(args.mid_save)
    from rcg.cli import main as rcg_main

    return rcg_main(args.rcg[1:] if args.rcg[:1] == ["--"] else args.rcg)


if __name__ == "__main__":
    sys.exit(main())
