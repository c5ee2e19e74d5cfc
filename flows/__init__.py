"""Prefect flows that schedule the DVC pipeline (flows.pipeline) and DVC experiment sweeps (flows.sweep).

Thin by design (docs/design.md, "Layout"): DVC owns the DAG and staleness, MLflow the records; these flows
only run `dvc` commands as tasks, tag GPU work, retry transient faults, stream each stage's
log into its task (flows.stage_log) and report the run (flows.run_report) and its failures.
"""
