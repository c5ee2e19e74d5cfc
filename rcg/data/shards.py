"""Writing a source to WebDataset shards plus a manifest (docs/design.md, stage `shard`).

Layout: `<out>/<split>/<split>-%06d.tar` and `<out>/manifest.json`. Samples carry `.png`/`.jpg`
(original bytes where possible) and `.cls` when labelled. Shard k holds the usable images among
input items [k * shard_size, (k + 1) * shard_size), so shards are written in parallel, each by one
worker process that reads its files and writes its own tar, and a shard may hold fewer samples
when some files were skipped. Every shard is written to a temporary file
(`.<split>-NNNNNN.tar.<pid>.rcg-shard.tmp`) and renamed, and the manifest is written last, so an
interrupted run never leaves a set of shards that looks complete; the next run removes the
temporary files a killed run left. Tar headers carry fixed owner and mtime, so the same input
always gives byte-identical shards, whatever the number of workers. The tars are standard POSIX
tar, byte for byte what WebDataset's TarWriter writes (rcg.data.loader reads them with WebDataset).

The output folder holds only what the stage writes: it removes its own shards (`<split>-NNNNNN.tar`)
that a run did not write again, and its own temporary files, logging each; it leaves any other
file alone with a warning, and refuses to run while the folder of a split holds a file named like
a shard that it did not write (the loader reads every `<split>-*.tar` there).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rcg.data.images import MAX_FILE_BYTES, MAX_PIXELS, Skip, prepare
from rcg.data.sources import SPLITS, Item, Source
from rcg.io import PipelineError, write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


# --- Tar writing --------------------------------------------------------------------------------
# WebDataset's TarWriter goes through tarfile: a TarInfo copy, a PAX check and a header built field
# by field for every member, ~70 us each, which is most of the cost of sharding photos that need no
# conversion. The shards written here are the same bytes tarfile writes in TarWriter's settings
# (POSIX/PAX format, mode 0444, uid/gid 0, owner rcg:rcg, mtime 0; a test compares them), built from
# a fixed 512-byte ustar template with only name, size and checksum filled in per member.
BLOCK = tarfile.BLOCKSIZE  # 512: tar's unit; every member's data is padded to it
RECORD = tarfile.RECORDSIZE  # 10240: the archive is padded to a whole record, as tarfile does
_OWNER = b"rcg"
_USTAR = bytearray(BLOCK)
_USTAR[100:108] = b"0000444\0"  # mode: read-only, as TarWriter's default
_USTAR[108:116] = b"0000000\0"  # uid
_USTAR[116:124] = b"0000000\0"  # gid
_USTAR[136:148] = b"00000000000\0"  # mtime 0: shard bytes depend on the samples only
_USTAR[148:156] = b" " * 8  # checksum field counts as spaces while the checksum is summed
_USTAR[156:157] = tarfile.REGTYPE
_USTAR[257:265] = tarfile.POSIX_MAGIC  # "ustar\0" + version "00"
_USTAR[265 : 265 + len(_OWNER)] = _OWNER  # uname
_USTAR[297 : 297 + len(_OWNER)] = _OWNER  # gname
_USTAR_SUM = sum(_USTAR)
_PAD = bytes(BLOCK)


def tar_header(name: str, size: int) -> bytes | bytearray:
    """The tar header block(s) of a regular-file member `name` of `size` bytes.

    ASCII names of up to 100 bytes (every key this stage makes from ordinary file names) use the
    fixed ustar template; longer or non-ASCII names get tarfile's own PAX extended header, so any
    name is stored exactly, as tarfile would store it.
    """
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "rcg", "rcg"
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    raw = name.encode("ascii")
    head = _USTAR.copy()
    head[: len(raw)] = raw
    size_field = b"%011o\0" % size
    head[124:136] = size_field
    # The checksum is the byte sum with the checksum field as spaces; the template's part is fixed.
    head[148:156] = b"%06o\0 " % (_USTAR_SUM + sum(raw) + sum(size_field))
    return head


class TarShard:
    """A tar file written member by member with vectored writes (one system call per batch)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.pending: list[bytes | bytearray] = []
        self.pending_bytes = 0
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        """Append one member (header, data, zero padding to a whole block)."""
        head = tar_header(name, len(data))
        pad = -len(data) % BLOCK
        self.pending += (head, data, _PAD[:pad]) if pad else (head, data)
        n = len(head) + len(data) + pad
        self.pending_bytes += n
        self.offset += n
        if self.pending_bytes >= 1 << 20 or len(self.pending) >= 512:
            self.flush()

    def write_sample(self, key: str, members: dict[str, bytes]) -> None:
        """One WebDataset sample: members `<key>.<ext>` in sorted extension order (as TarWriter)."""
        for ext in sorted(members):
            self.add(key + "." + ext, members[ext])

    def flush(self) -> None:
        if not self.pending:
            return
        done = os.writev(self.fd, self.pending)
        if done < self.pending_bytes:  # a short write (rare on regular files): finish it plainly
            rest = memoryview(b"".join(self.pending))[done:]
            while rest:
                rest = rest[os.write(self.fd, rest) :]
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> None:
        """End of archive: two zero blocks, then zeros to a whole record (tarfile's layout)."""
        end = 2 * BLOCK
        end += -(self.offset + end) % RECORD
        self.pending.append(bytes(end))
        self.pending_bytes += end
        self.offset += end
        self.flush()

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class _ShardJob:
    """Input chunk `index` of a split: its usable items become `<split>-<index>.tar`."""

    split_dir: Path
    split: str
    index: int
    items: list[Item]
    min_size: int
    verify: str
    max_bytes: int
    max_pixels: int


@dataclass
class _ShardResult:
    name: str | None  # None when every item of the chunk was skipped (no shard written)
    written: int
    skipped: list[dict[str, str]]
    converted: list[dict[str, str]]


def _write_shard(job: _ShardJob) -> _ShardResult:
    """Prepare one chunk of items and write its shard (temp file, then rename).

    Shards are cut by *input* position, not by output count, so workers need no coordination: each
    writes its own shard, and the result is the same whatever the number of workers.
    """
    path = job.split_dir / f"{job.split}-{job.index:06d}.tar"
    tmp = job.split_dir / f".{path.name}.{os.getpid()}{TEMP_SUFFIX}"
    skipped, converted, written = [], [], 0
    try:
        tar = TarShard(tmp)
        try:
            for item in job.items:
                res = prepare(item, job.min_size, job.verify, job.max_bytes, job.max_pixels)
                if isinstance(res, Skip):
                    skipped.append({"path": res.path, "reason": res.reason})
                    continue
                members = {res.ext: res.data}
                if res.label is not None:
                    members["cls"] = str(res.label).encode()
                tar.write_sample(res.key, members)
                written += 1
                if res.converted:
                    converted.append({"key": res.key, "reason": res.converted})
            tar.finish()
        finally:
            tar.close()
        if written:
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _ShardResult(path.name if written else None, written, skipped, converted)


class _Forked:
    """Worker processes forked from this one that take jobs from a shared counter (`_run_jobs`)."""

    def __init__(self, jobs: list[_ShardJob], results: list[_ShardResult | None],
                 progress: Callable[[_ShardResult], object], children: int) -> None:
        self.jobs, self.results, self.progress = jobs, results, progress
        self.ctx = mp.get_context("fork")
        self.next_job = self.ctx.Value("l", 0)
        self.errors: list[BaseException] = []
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(children):
            recv, send = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(target=self._child, args=(send,), daemon=True, name="rcg-shard")
            proc.start()
            send.close()
            self.conns.append(recv)
            self.procs.append(proc)

    def take(self) -> int:
        with self.next_job.get_lock():
            i = self.next_job.value
            self.next_job.value = min(i + 1, len(self.jobs))
        return i

    def stop(self) -> None:
        """After a failure: no process starts another shard."""
        with self.next_job.get_lock():
            self.next_job.value = len(self.jobs)

    def _child(self, conn: Connection) -> None:
        try:
            while (i := self.take()) < len(self.jobs):
                conn.send((i, _write_shard(self.jobs[i])))
            conn.send(None)
        except BaseException as e:  # reported to the parent, which raises it
            self.stop()
            try:
                conn.send(("error", e))
            except Exception:  # an exception that does not pickle still fails the run
                conn.send(("error", RuntimeError(repr(e))))
        finally:
            conn.close()

    def drain(self, timeout: float | None) -> None:
        """Collect the results (or errors) the children have sent."""
        for conn in mp_wait(self.conns, timeout):
            try:
                msg = conn.recv()
            except EOFError:  # the child died without a word (killed, out of memory)
                msg = ("error", RuntimeError("a shard worker process died"))
            if msg is None or msg[0] == "error":
                self.conns.remove(conn)
                if msg is not None:
                    self.errors.append(msg[1])
            else:
                self.results[msg[0]] = msg[1]
                self.progress(msg[1])

    def join(self) -> None:
        """Children finish the shard they are on; their results are read, then they are joined."""
        while self.conns:
            self.drain(None)
        for proc in self.procs:
            proc.join()


def _run_jobs(
    jobs: list[_ShardJob], workers: int, progress: Callable[[_ShardResult], object]
) -> list[_ShardResult]:
    """Write every job's shard using `workers` processes (this one included); results in job order.

    Each process takes the next job from a shared counter, so the work stays balanced whatever each
    shard costs. Children are forked, so they inherit the job list (no item or sample is pickled)
    and only each shard's small result (counts, skip reasons) comes back through a pipe: a forked
    child costs a few milliseconds, far less than starting a multiprocessing.Pool.
    """
    results: list[_ShardResult | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = r = _write_shard(job)
            progress(r)
        return results  # type: ignore[return-value]
    pool = _Forked(jobs, results, progress, workers - 1)
    try:
        while (i := pool.take()) < len(jobs):
            results[i] = r = _write_shard(jobs[i])
            progress(r)
            pool.drain(0)
    except BaseException:
        pool.stop()
        raise
    finally:
        pool.join()
    if pool.errors:
        raise pool.errors[0]
    return results  # type: ignore[return-value]


# Names the stage gives its own files in a split's folder: shards, the temporary files they are
# written to, and those of earlier versions (rcg.io.atomic_path's mkstemp names), and the top-level
# manifest's temporary file (rcg.io.write_json).
TEMP_SUFFIX = ".rcg-shard.tmp"
_OWN_TEMP = r"\.{split}-\d{{6}}\.tar\.(?:\d+\.rcg-shard|[a-z0-9_]{{8}})\.tmp"
_MANIFEST_TEMP = re.compile(r"\.manifest\.json\.[a-z0-9_]{8}\.tmp")


def _tidy_split_folder(folder: Path, split: str) -> None:
    """Before writing: remove temporary files an interrupted run left, refuse a foreign file the
    loader would read as a shard, and warn about any other foreign file (left alone)."""
    own, temp = re.compile(rf"{split}-\d{{6}}\.tar"), re.compile(_OWN_TEMP.format(split=split))
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        regular = e.is_file(follow_symlinks=False)
        if regular and temp.fullmatch(e.name):
            os.unlink(e.path)
            log.warning("removed %s: a temporary shard file left by an interrupted run", e.path)
        elif regular and own.fullmatch(e.name):
            continue  # this run writes it again, or removes it when it has no such shard
        elif e.name.startswith(f"{split}-") and e.name.endswith(".tar"):
            raise PipelineError(
                f"{e.path}: not a shard this stage wrote, but named like one (every {split}-*.tar in "
                f"{folder} is read as {split} data): move or delete it, or set data.shards_dir elsewhere"
            )
        else:
            log.warning("%s: not written by the shard stage; left alone", e.path)


def _tidy_out_dir(out_dir: Path) -> None:
    """What is in `out_dir` before a run: only the stage's own leftovers are removed (each logged)."""
    if not out_dir.is_dir():
        if out_dir.exists() or out_dir.is_symlink():
            raise PipelineError(f"{out_dir}: data.shards_dir is not a folder")
        return
    for e in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if e.name in SPLITS and e.is_dir():
            _tidy_split_folder(Path(e.path), e.name)
        elif e.is_file(follow_symlinks=False) and _MANIFEST_TEMP.fullmatch(e.name):
            os.unlink(e.path)
            log.warning("removed %s: a temporary manifest left by an interrupted run", e.path)
        elif e.name != "manifest.json":
            log.warning("%s: not written by the shard stage; left alone", e.path)


def _remove_stale(out_dir: Path, written: dict[str, list[str]]) -> None:
    """After writing: remove the stage's own shards this run did not write (an earlier run's, or
    a split this source no longer has), so each split's folder holds exactly this run's shards."""
    for split in SPLITS:
        folder = out_dir / split
        if not folder.is_dir():
            continue
        own, keep = re.compile(rf"{split}-\d{{6}}\.tar"), set(written.get(split, ()))
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if own.fullmatch(e.name) and e.name not in keep and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                log.info("removed %s: a shard of an earlier run", e.path)


def _write_split(
    split: str, items: list[Item], out_dir: Path, shard_size: int, limits: tuple[int, str, int, int],
    workers: int,
) -> dict[str, Any]:
    """Write one split's shards; `limits` is (min_size, verify, max_bytes, max_pixels)."""
    split_dir = out_dir / split
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"{split_dir}: cannot create output folder: {e}") from e
    jobs = [
        _ShardJob(split_dir, split, k, items[i : i + shard_size], *limits)
        for k, i in enumerate(range(0, len(items), shard_size))
    ]
    bar = tqdm(total=len(items), desc=f"shard {split}", unit="img", mininterval=1.0)
    try:
        results = _run_jobs(jobs, workers, lambda r: bar.update(r.written + len(r.skipped)))
    except OSError as e:
        raise PipelineError(f"{split_dir}: writing shards failed: {e}") from e
    finally:
        bar.close()
    return {
        "written": sum(r.written for r in results),
        "skipped": sum(len(r.skipped) for r in results),
        "converted": sum(len(r.converted) for r in results),
        "shards": [r.name for r in results if r.name],
        "_skipped": [s for r in results for s in r.skipped],
        "_converted": [c for r in results for c in r.converted],
    }


def write_shards(
    source: Source, out_dir: str | Path, shard_size: int, min_size: int, workers: int,
    verify: str = "structure", max_file_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Shard every split of `source` into `out_dir` and write `manifest.json`; returns the manifest.

    Files over `max_file_bytes` or `max_pixels` are skipped (rcg.data.images.prepare). The module
    docstring says what happens to files already in `out_dir`.
    """
    out_dir = Path(out_dir)
    for key, value in (("shard_size", shard_size), ("max_file_bytes", max_file_bytes), ("max_pixels", max_pixels)):
        if value <= 0:
            raise PipelineError(f"shard.{key} must be positive, got {value}")
    manifest_path = out_dir / "manifest.json"
    _tidy_out_dir(out_dir)
    # The old manifest goes first: while shards are being rewritten the folder is not "complete".
    manifest_path.unlink(missing_ok=True)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source.description,
        "fingerprint": source.fingerprint,
        "classes": source.classes,
        "labelled": bool(source.classes),
        "val_split": source.val_split,
        "limits": {"min_size": min_size, "max_file_bytes": max_file_bytes, "max_pixels": max_pixels},
        "splits": {},
        "skipped": [],
        "converted": [],
    }
    workers = max(1, min(workers, os.cpu_count() or 1))
    limits = (min_size, verify, max_file_bytes, max_pixels)
    for split, items in source.splits.items():
        info = _write_split(split, items, out_dir, shard_size, limits, workers)
        manifest["skipped"].extend({"split": split, **s} for s in info.pop("_skipped"))
        manifest["converted"].extend({"split": split, **c} for c in info.pop("_converted"))
        manifest["splits"][split] = info
        log.info("%s: %d written, %d skipped -> %s", split, info["written"], info["skipped"], out_dir / split)
    _remove_stale(out_dir, {s: v["shards"] for s, v in manifest["splits"].items()})
    if sum(s["written"] for s in manifest["splits"].values()) == 0:
        raise PipelineError(f"{source.description}: no usable images (all {len(manifest['skipped'])} skipped)")
    if "train" not in manifest["splits"] or manifest["splits"]["train"]["written"] == 0:
        raise PipelineError(f"{source.description}: no usable training images")
    for s in manifest["skipped"][:20]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if len(manifest["skipped"]) > 20:
        log.warning("... and %d more skips (see %s)", len(manifest["skipped"]) - 20, manifest_path)
    write_json(manifest_path, manifest)
    return manifest
