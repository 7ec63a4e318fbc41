"""`ray job submit --working-dir . -- vlrlhf run ...` against a head the test starts itself."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def head():
    """`ray start --head` on 127.0.0.1 with its own temp dir; stopped by killing its own processes
    (never `ray stop`, which would stop every cluster on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="vh", dir="/tmp")
    dashboard = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    # Every port is free-picked: the session's own test cluster already holds Ray's defaults
    # (a clash on the dashboard agent's port leaves the head without a job agent).
    gcs_port = free_port()
    ports = [f"--port={gcs_port}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
             f"--object-manager-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    started = subprocess.run([str(BIN / "ray"), "start", "--head", *ports, "--num-cpus=2",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                              f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # The head's processes name its temp dir (or address) on their command line; their children
        # (dashboard and runtime-env agents) rename themselves, so take them by parentage.
        own = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                # the client server names only the head's address
                if any(temp_dir in part or f"127.0.0.1:{gcs_port}" in part for part in process.info["cmdline"] or []):
                    own += [process, *process.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for process in own:
            try:
                process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_spec_and_logs_progress(head, tmp_path):
    address, env = head
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--submission-id", "vlrlhf-smoke", "--",
               "vlrlhf", "run", "configs/demo_sft.yaml", "trainer.max_steps=2", "trainer.eval_every=0",
               "evaluation=null",
               f"checkpoint.dir={tmp_path / 'ck'}", "--run-dir", str(tmp_path / "run")]
    for _ in range(20):  # the head's job agent takes a few seconds to come up after `ray start`
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, "vlrlhf-smoke"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower()  # "Job 'vlrlhf-smoke' succeeded"
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, "vlrlhf-smoke"], env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert "demo_sft:" in logs and ("step/s" in logs or "s/step" in logs)  # the tqdm progress line
    assert "finished after 2 steps" in logs
    assert (tmp_path / "ck" / "step-000002" / "model.safetensors").is_file()
