"""Stage entry points: `rcg.stages.<name>.run(cfg, **options)`, one module per `rcg` subcommand.

These are the thin edges of the pipeline: read the stage's inputs, call library functions, write
outputs atomically, log to MLflow. The CLI, DVC and Prefect all end up here.
"""
