"""Tracking failures: an unusable MLflow store fails fast naming its URI (`tracking.on_error: fail`)
or the stage runs untracked after one warning (`continue`); MLFLOW_TRACKING_URI wins over
tracking.uri."""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcg import config, tracking
from rcg.io import PipelineError


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def dead_uri() -> str:
    """An http URI on a local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_uri() -> Iterator[str]:
    """An http URI whose port accepts connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshake; nobody reads or writes
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def bad_gateway_uri() -> Iterator[str]:
    """An http URI that answers every request with 502 (a proxy in front of a stopped server)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_error(502)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the tests that need a working one (making one takes seconds); each test
    uses its own experiment prefix."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _cfg(uri: str, on_error: str = "fail", **tracking_values: object) -> config.Config:
    return config.preset_config("tiny", {"tracking": {"enabled": True, "uri": uri, "on_error": on_error,
                                                      **tracking_values}})


@pytest.mark.parametrize("server", ["dead_uri", "silent_uri", "bad_gateway_uri"])
def test_fail_stops_within_seconds_naming_the_uri(server: str, request: pytest.FixtureRequest) -> None:
    uri = request.getfixturevalue(server)
    checks = (lambda: tracking.preflight(_cfg(uri).tracking),
              lambda: tracking.stage_run(_cfg(uri), "shard").__enter__())
    for check in checks:
        t0 = time.monotonic()
        with pytest.raises(PipelineError) as e:
            check()
        assert time.monotonic() - t0 < tracking.SETUP_TIMEOUT_S + 5
        msg = str(e.value)
        assert msg.startswith(f"tracking: the MLflow store {uri} cannot be used (") and "\n" not in msg
        assert "tracking.on_error=continue" in msg
    reason = {"dead_uri": "(connection refused)", "silent_uri": f"(no answer within {tracking.SETUP_TIMEOUT_S} s)",
              "bad_gateway_uri": "(too many 502 error responses)"}[server]
    assert reason in msg
    # the quick settings were only for the start: MLflow's own retries apply again afterwards
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_continue_warns_once_and_runs_the_stage_untracked(dead_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    ran = False
    with caplog.at_level(logging.WARNING, logger="rcg.tracking"):
        t0 = time.monotonic()
        with tracking.stage_run(_cfg(dead_uri, "continue"), "shard") as tracker:
            tracker.log_metrics({"written": 1.0})
            tracker.log_artifact(__file__)
            ran = True
        assert time.monotonic() - t0 < tracking.SETUP_TIMEOUT_S
    assert ran and not tracker.active
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and dead_uri in warnings[0] and "without tracking" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rcg.tracking"):
        tc = tracking.preflight(_cfg(dead_uri, "continue").tracking)
    assert not tc.enabled and tc.uri == dead_uri and len(caplog.records) == 1


def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")  # never read: the runs below use --preset


def test_cli_fail_is_one_line_before_any_work(dead_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from rcg import cli

    _in_tmp(tmp_path, monkeypatch)
    t0 = time.monotonic()
    rc = cli.main(["shard", "--preset", "tiny", "--set", "tracking.enabled=true", "--set", f"tracking.uri={dead_uri}"])
    assert rc == 1 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith(f"rcg shard: error: tracking: the MLflow store {dead_uri} cannot be used "
                          "(connection refused)")
    assert err.count("\n") == 1
    assert not (tmp_path / "data").exists()  # stopped before the stage started


def test_cli_continue_finishes_the_stage(dead_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from rcg import cli

    _in_tmp(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        rc = cli.main(["shard", "--preset", "tiny", "--set", "tracking.enabled=true",
                       "--set", f"tracking.uri={dead_uri}", "--set", "tracking.on_error=continue",
                       "--set", "shard.max_per_split=32"])
    assert rc == 0 and (tmp_path / "data" / "shards" / "manifest.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "rcg.tracking"]
    assert len(warnings) == 1 and dead_uri in warnings[0]


def test_environment_uri_wins_and_is_logged(dead_uri: str, store: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import mlflow
    from mlflow import MlflowClient

    env_uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    cfg = _cfg(dead_uri, artifact_dir=str(tmp_path / "artifacts"), experiment_prefix="env")  # a dead server
    with caplog.at_level(logging.INFO, logger="rcg.tracking"):
        assert tracking.preflight(cfg.tracking).uri == env_uri
        with tracking.stage_run(cfg, "shard") as tracker:
            tracker.log_metrics({"written": 3.0})
    assert f"MLFLOW_TRACKING_URI={env_uri} from the environment wins over tracking.uri ({dead_uri})" in caplog.text
    runs = MlflowClient(env_uri).search_runs(
        [MlflowClient(env_uri).get_experiment_by_name("env-pipeline").experiment_id], "tags.stage = 'shard'")
    assert len(runs) == 1 and runs[0].data.metrics["written"] == 3.0 and runs[0].info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_local_store_whose_folder_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path}/a_file/mlruns/mlflow.db"
    with pytest.raises(PipelineError) as e:
        tracking.preflight(_cfg(uri).tracking)
    assert str(e.value).startswith(f"tracking: the MLflow store {uri} cannot be used (cannot create the folder "
                                   f"{tmp_path}/a_file/mlruns: Not a directory); fix tracking.uri")
    with pytest.raises(PipelineError, match="cannot create the folder"):
        with tracking.stage_run(_cfg(uri), "shard"):
            pass


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_a_store_lost_during_the_run(on_error: str, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Logging that fails mid-run: `fail` ends the stage with one line naming the URI (the run is
    marked FAILED), `continue` warns once and the stage goes on untracked."""
    import mlflow
    from mlflow import MlflowClient

    uri = store
    cfg = _cfg(uri, on_error, artifact_dir=str(tmp_path / "artifacts"), experiment_prefix=f"lost-{on_error}")

    def gone(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    steps = 0
    with caplog.at_level(logging.WARNING, logger="rcg.tracking"):
        try:
            with tracking.stage_run(cfg, "train_rdm") as tracker:
                monkeypatch.setattr(mlflow, "log_metrics", gone)
                for step in range(3):
                    tracker.log_metrics({"loss": 1.0}, step=step)
                    steps += 1
        except PipelineError as e:
            assert on_error == "fail"
            assert str(e).startswith(f"tracking: logging metrics (MLflow at {uri}) failed (connection refused)")
    assert steps == (3 if on_error == "continue" else 0)
    assert len(caplog.records) == (1 if on_error == "continue" else 0)
    assert mlflow.active_run() is None
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(f"lost-{on_error}-pipeline").experiment_id],
                             "tags.stage = 'train_rdm'")[0]
    assert run.info.status == ("FINISHED" if on_error == "continue" else "FAILED")
