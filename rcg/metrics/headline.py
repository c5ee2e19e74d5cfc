"""What `dvc metrics show` shows: a few headline numbers per stage, the whole record beside them.

DVC prints every metrics file as one row of a single table with a column per key (nested keys
flattened), so one file with a key per class and per draw makes the table thousands of characters
wide and `dvc exp show` unreadable. Each training stage therefore writes two files: its complete
record to a details file (a DVC output kept in git, not a metric), and to its metrics file only
the numbers runs are compared by, under the same names and with the same values as in the record.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rcg.io import write_json

# The headline keys of each stage's metrics file; a key the record lacks (a check skipped on these
# data, a converted encoder that was not pretrained) is left out, and a skip's reason is kept.
ENCODER = ("knn_top1", "knn_top1_pixels", "knn_top1_random_init", "knn_skipped", "train_seconds_total",
           "images_per_s")
RDM = ("fd_train", "fd_floor_train", "fd_train_over_floor", "fd_val", "train_steps", "train_seconds",
       "class_cond.fd_per_class_train", "class_cond.fd_per_class_floor_train", "class_cond.skipped")
GENERATOR = ("steps", "final_loss", "train_seconds_total", "images_per_s", "clusters.k", "clusters.purity",
             "posterior.info_bound", "skipped")
EVALNET = ("test_accuracy", "steps", "train_seconds_total", "skipped")


def evaluation_keys(record: dict[str, Any]) -> list[str]:
    """The headline of the evaluation table: each mode's fd, the floor's, the stage's time; IS,
    precision, recall, KID and per-class values stay in the details file."""
    return [*(f"modes.{m}.fd" for m in record.get("modes", {})), "floor.fd", "seconds"]


def headline(record: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The `keys` of `record` it has, in that order; `a.b` is key `b` of the mapping at `a`, kept nested."""
    out: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        node: Any = record
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = node[leaf]
    return out


def write_metrics(record: dict[str, Any], metrics_file: str | Path, details_file: str | Path,
                  keys: Iterable[str]) -> dict[str, Any]:
    """Write `record` to `details_file`, then its headline (`keys`) to `metrics_file`; returns the headline.

    The metrics file comes last, so that a stage killed in between has no metrics file (DVC reruns
    it) rather than one that describes another run than its details.
    """
    write_json(details_file, record)
    top = headline(record, keys)
    write_json(metrics_file, top)
    return top
