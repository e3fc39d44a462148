"""optuna-dashboard on a sweep's storage, as the README documents it: started on a study
shaped like ftx's (quality against peak memory, the user attributes ftx's sweeper
records on each trial), its server answers on localhost with the study, its trials
and the dashboard page. Skips when optuna-dashboard (a [dev] extra) is not installed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[dev]')")

STUDY = "quality_vs_vram"
# No proxy for localhost, whatever the environment sets for reaching PyPI.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def sweep_storage(tmp_path) -> str:
    """SWEEP_DIR/optuna.db as `ftx sweep quality_vs_vram` leaves it: two objectives, three finished trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize", "minimize"])
    space = {"method.r": CategoricalDistribution([8, 16, 64]), "optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for number, (rank, score, peak) in enumerate([(8, 0.61, 350), (16, 0.64, 366), (64, 0.66, 420)]):
        trial = study.ask(space)
        trial.set_user_attr("run_dir", str(tmp_path / f"{number}-pydoc-tiny-lora-none"))
        trial.set_user_attr("memory.peak_bytes", peak * 2**20)
        trial.set_user_attr("overrides", [f"method.r={rank}"])
        study.tell(trial, [score, peak * 2**20])
    return storage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[str, bytes]:
    with LOCAL.open(url, timeout=5) as response:
        return response.headers.get_content_type(), response.read()


def wait_until_up(server: subprocess.Popen, url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"optuna-dashboard exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            get(url)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    pytest.fail(f"optuna-dashboard did not answer {url} within {seconds:.0f} s")


def test_optuna_dashboard_serves_a_sweeps_study(sweep_storage):
    executable = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert executable, "optuna-dashboard is importable but its console script is not beside this Python"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [executable, sweep_storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(server, f"{base}/api/meta")
        kind, body = get(f"{base}/api/studies")
        assert kind == "application/json"
        (study,) = json.loads(body)["study_summaries"]
        assert study["study_name"] == STUDY and study["directions"] == ["maximize", "minimize"]
        _, body = get(f"{base}/api/studies/{study['study_id']}")
        trials = json.loads(body)["trials"]
        assert [t["state"] for t in trials] == ["Complete"] * 3
        assert {a["key"] for a in trials[0]["user_attrs"]} == {"run_dir", "memory.peak_bytes", "overrides"}
        kind, page = get(f"{base}/")  # redirects to /dashboard, the single-page app
        assert kind == "text/html" and b'<div id="dashboard">' in page
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
