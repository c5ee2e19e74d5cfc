"""The evaluation table as Markdown, with the paper's ImageNet numbers beside it (`rcg report`).

One row per generation mode of metrics/eval.json, the real-data floor, and whether the paper's
claims (Table 9a's ordering) hold at this scale; then CAS (rcg.metrics.cas) and, from the train_rdm
stage's record, how far the RDM's and the hypersphere prior's representations are from the real
ones. The paper's numbers are ImageNet 256x256 FID / IS with 50k samples: orientation, not a
target; our `fd` is only comparable to them when the extractor is Inception.
"""

from __future__ import annotations

import math
from typing import Any

# mode -> (paper FID / IS on ImageNet 256x256, where it comes from): docs/paper.md#headline-numbers and
# docs/paper.md#what-conditions-the-generator (Table 9a).
PAPER: dict[str, tuple[str, str]] = {
    "uncond": ("27.32 / -", "DiT-XL/2 without RCG (MAGE-L: 7.04)"),
    "label": ("5.83 / 147.3", "MAGE-B on class labels, Table 9a"),
    "rcg": ("5.07 / 142.5", "MAGE-B on RDM reps, Table 9a (DiT-XL/2: 4.89 / 143.2)"),
    "rcg_cfg": ("3.19 / 214.9", "MAGE-B, cfg 1.0, README"),
    "rcg_class": ("3.50 / 194.9", "MAGE-B, class-conditional RDM, README"),
    "oracle": ("4.37 / 149.0", "MAGE-B on real-image reps, Table 9a"),
    "oracle_val": ("-", "not in the paper: the oracle on held-out images' reps"),
    "cluster": ("6.60 / 121.9", "MAGE-B on k-means cluster labels of MoCo v3 reps, Table 9a"),
    "hypersphere": ("-", "not in the paper: a prior raised in its review"),
    "contrastive": ("-", "not in the paper: a posterior raised in its review"),
}
# Paper Table 9a (MAGE-B, FID), the rows our modes stand for: what `rcg report` sets the table beside.
TABLE_9A = {"oracle": 4.37, "rcg": 5.07, "label": 5.83, "cluster": 6.60}
LABELS = {
    "uncond": "uncond (no condition)",
    "label": "label (real class labels)",
    "rcg": "rcg (RDM reps)",
    "rcg_cfg": "rcg_cfg (RDM reps + guidance)",
    "rcg_class": "rcg_class (class-cond. RDM)",
    "oracle": "oracle (real train reps)",
    "oracle_val": "oracle_val (real val reps)",
    "cluster": "cluster (k-means cluster labels)",
    "hypersphere": "hypersphere (uniform prior reps)",
    "contrastive": "contrastive (posterior-trained, hypersphere reps)",
}


def _num(row: dict[str, Any], key: str, digits: int = 3) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _claims(results: dict[str, Any]) -> list[str]:
    """The paper's claims at small scale (section 4.1's gain, Table 9a's ordering), checked on the
    numbers; an ordering of two seeded rows is called beyond the noise when the difference of their
    means exceeds twice its standard error over the seeds."""
    modes = results.get("modes", {})
    fd = {m: r.get("fd_mean", r.get("fd")) for m, r in modes.items()}  # over the seeds, as the table
    n_seeds = len(results.get("seeds", [0]))
    floor = results.get("floor", {}).get("fd")
    out = []

    def check(ok: bool | None, text: str) -> None:
        mark = "n/a" if ok is None else ("yes" if ok else "NO")
        out.append(f"- [{mark}] {text}")

    def both(a: str, b: str) -> bool:
        return fd.get(a) is not None and fd.get(b) is not None

    def order(a: str, b: str, paper: str) -> None:
        if not both(a, b):
            return check(None, f"{a} fd <= {b} fd")
        text = f"{a} fd <= {b} fd ({_num(fd, a)} vs {_num(fd, b)}; {paper})"
        sa, sb = modes[a].get("fd_std"), modes[b].get("fd_std")
        if sa is not None and sb is not None:
            se = math.sqrt((sa**2 + sb**2) / n_seeds)
            text += f", {'beyond' if abs(fd[b] - fd[a]) > 2 * se else 'within'} the noise (2 x s.e. {2 * se:.3f})"
        check(fd[a] <= fd[b], text)

    check(fd["rcg"] <= 0.5 * fd["uncond"] if both("rcg", "uncond") else None,
          f"rcg fd <= 0.5 x uncond fd ({_num(fd, 'rcg')} vs 0.5 x {_num(fd, 'uncond')}; paper MAGE-L 3.44 vs 7.04)")
    order("oracle", "rcg", "paper 4.37 vs 5.07")
    order("rcg", "label", "paper 5.07 vs 5.83")
    order("label", "cluster", "paper 5.83 vs 6.60")
    order("rcg", "hypersphere", "the RDM against the simplest prior")
    check(fd["rcg"] <= 10 * floor if fd.get("rcg") is not None and floor else None,
          f"rcg fd <= 10 x the floor's ({_num(fd, 'rcg')} vs 10 x {_num({'f': floor}, 'f')})")
    acc = modes.get("rcg_class", {}).get("class_accuracy")
    check(None if acc is None else acc >= 0.8,
          f"rcg_class samples classified as the asked-for class >= 0.8 ({_num({'a': acc}, 'a')})")
    return out


def _skipped(skipped: dict[str, str]) -> list[str]:
    """Lines saying which modes (or metrics) could not run on these data, and why."""
    if not skipped:
        return []
    return ["", "Not measured on these data:", *(f"- `{k}`: {why}" for k, why in skipped.items())]


def _evalnet_line(evalnet: dict[str, Any]) -> str:
    steps = f"{evalnet.get('steps')} steps, {evalnet.get('train_seconds_total')} s"
    if evalnet.get("test_accuracy") is None:
        return f"Evaluation network: trained without labels (SimCLR), {steps}; it has no test accuracy."
    return f"Evaluation classifier: test accuracy {evalnet['test_accuracy']:.4f} ({steps})."


def _fd_cell(row: dict[str, Any]) -> str:
    """The fd of a row: mean +- std over the seeds when there were several, else the one draw's."""
    if row.get("fd_mean") is not None:
        return f"{row['fd_mean']:.3f} ± {row['fd_std']:.3f}"
    return _num(row, "fd")


def _table(results: dict[str, Any], fd_name: str) -> list[str]:
    """The mode rows and the floor row of the Markdown table."""
    n = results.get("n_samples")
    lines = [
        f"| mode | {fd_name} | IS | KID | precision | recall | class acc | CAS | seconds | paper FID / IS | paper setting |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in results.get("modes", {}).items():
        paper, where = PAPER.get(mode, ("-", ""))
        lines.append(
            f"| {LABELS.get(mode, mode)} | {_fd_cell(row)} | {_num(row, 'is', 2)} | {_num(row, 'kid')} | "
            f"{_num(row, 'precision')} | {_num(row, 'recall')} | {_num(row, 'class_accuracy')} | "
            f"{_num(row, 'cas')} | {_num(row, 'seconds', 0)} | {paper} | {where} |"
        )
    floor = results.get("floor")
    if floor:
        lines.append(
            f"| *floor: {n} real train images* | {_num(floor, 'fd')} | {_num(floor, 'is', 2)} | "
            f"{_num(floor, 'kid')} | {_num(floor, 'precision')} | {_num(floor, 'recall')} | - | - | "
            f"{_num(floor, 'seconds', 0)} | - | |"
        )
    return lines


def _table_9a(results: dict[str, Any], fd_name: str) -> list[str]:
    """The paper's Table 9a beside ours, with the caveat that the two are different measures."""
    modes = results.get("modes", {})
    ours = ", ".join(f"{m} {_fd_cell(modes[m])}" for m in TABLE_9A if m in modes) or "none of its rows"
    paper = ", ".join(f"{m} {v:.2f}" for m, v in TABLE_9A.items())
    return ["", f"Paper Table 9a (MAGE-B, ImageNet 256x256, FID): {paper}. Ours ({fd_name}): {ours}. "
                "A different measure on different data: compare the ordering, not the values."]


def _cas_lines(results: dict[str, Any]) -> list[str]:
    """CAS (Ravuri & Vinyals 2019) beside real-data training, when it was measured."""
    cas = results.get("cas")
    if not cas:
        return []
    real = cas.get("real_evalnet")
    return ["", f"CAS (Ravuri & Vinyals 2019): the evaluation classifier's architecture trained on "
                f"{cas['images']} generated images per mode ({cas['steps']} steps; `cluster`: each image "
                f"labelled with its cluster's majority class of train labels), tested on {cas['test']}: "
                + ", ".join(f"{m} {a:.4f}" for m, a in cas["modes"].items())
                + f". Real data: {cas['real_same_budget']:.4f} with the same training on {cas['images']} real "
                  f"train images; {'-' if real is None else f'{real:.4f}'} for the evaluation network (its own training)."]


def _prior_lines(rdm: dict[str, Any] | None) -> list[str]:
    """The representation FDs of the train_rdm stage: RDM and hypersphere samples beside the floor."""
    if not rdm or "hypersphere" not in rdm or "fd_train" not in rdm:
        return []
    h = rdm["hypersphere"]
    return ["", f"Representation FD against the train reps (train_rdm, {rdm.get('n_eval')} samples, "
                f"mean of {rdm.get('eval_repeats')} draws): RDM {rdm['fd_train']:.4f}, hypersphere prior "
                f"{h['fd_train']:.4f}, floor (real train reps) {rdm['fd_floor_train']:.4f}."]


def format_report(results: dict[str, Any], evalnet: dict[str, Any] | None = None,
                  rdm: dict[str, Any] | None = None) -> str:
    """The Markdown report of an eval.json mapping (and the evalnet and train_rdm records, if given)."""
    ext = results.get("extractor", "?")
    fd_name = "FID" if ext == "inception-v3-compat" else f"fd ({ext})"
    seeds = results.get("seeds") or [0]
    spread = (f" Where the fd column shows mean ± std, over {len(seeds)} seeds (evaluate.seed_modes); the "
              "other rows are one draw." if len(seeds) > 1 else "")
    lines = [
        f"## RCG evaluation: {results.get('n_samples')} samples per mode, {results.get('sample_steps')} sampling "
        f"steps, against {results.get('n_reference')} real val images",
        "",
        f"`{fd_name}`: {results.get('fd_is', '')}. IS, KID, precision and recall use the same "
        f"extractor. Paper columns: ImageNet 256x256, 50k samples, Inception FID / IS.{spread}",
        *_skipped(results.get("skipped", {})),
        "",
        *_table(results, fd_name),
        *_table_9a(results, fd_name),
        "", "Claims (paper Table 9a ordering, checked at this scale):", *_claims(results),
        *_cas_lines(results),
        *_prior_lines(rdm),
    ]
    per_class = results.get("class_accuracy", {})
    if per_class:
        lines += ["", "Per-class accuracy of the evaluation classifier on conditional samples:", ""]
        names = list(next(iter(per_class.values()))["per_class"])
        lines.append("| mode | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for mode, acc in per_class.items():
            lines.append(f"| {mode} | " + " | ".join(_num(acc["per_class"], c, 2) for c in names) + " |")
    if evalnet:
        lines += ["", _evalnet_line(evalnet)]
    if "seconds" in results:
        lines.append(f"Evaluate stage wall time: {results['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation table (metrics/eval.json) one row per mode, then the floor; a skipped mode is
    a row with its reason. The columns say which extractor `fd` is measured with."""
    rows: list[dict[str, Any]] = []
    for mode, row in results["modes"].items():
        rows.append({"mode": mode, "what": LABELS.get(mode, mode), **row})
    for mode, why in results.get("skipped", {}).items():
        if mode in LABELS:
            rows.append({"mode": mode, "what": LABELS[mode], "skipped": why})
    rows.append({"mode": "floor", "what": f"{results['n_samples']} real train images: the best a mode can reach",
                 **results["floor"]})
    first = ["mode", "what", "fd", "precision", "recall", "is", "class_accuracy"]
    columns = [c for c in first if any(c in r for r in rows)]
    columns += [c for r in rows for c in r if c not in columns and c != "skipped"]
    columns += ["skipped"] if any("skipped" in r for r in rows) else []
    return [{**{c: r.get(c) for c in columns}, "extractor": results["extractor"]} for r in rows]


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The pipeline run's MLflow metrics from an evaluation: `<mode>.fd`, `<mode>.precision`,
    `<mode>.recall`, and the same for `floor`."""
    rows = {**results["modes"], "floor": results["floor"]}
    return {f"{mode}.{k}": float(row[k]) for mode, row in rows.items() for k in ("fd", "precision", "recall")
            if row.get(k) is not None}
