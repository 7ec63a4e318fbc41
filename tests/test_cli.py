"""The `vlrlhf` console script: --help on every subcommand, tiny-model end to end."""

import subprocess
import sys

import pytest

from jobs.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", [[]] + [[name] for name in subcommands()])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    assert "usage: vlrlhf" in capsys.readouterr().out


def test_console_script_writes_a_tiny_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "tiny-model", "qwen2_vl", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "video_preprocessor_config.json").is_file()  # vLLM needs it


def test_unknown_family_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tiny-model", "gpt5", "out"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_demo_help_names_every_stage(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "then DPO and GRPO from the SFT checkpoint" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "SFT, then DPO and GRPO" in " ".join(capsys.readouterr().out.split())


def test_start_ray_starts_the_dashboard_on_localhost_unless_told_not_to(monkeypatch, capsys):
    import ray

    from jobs import run

    calls = []

    class Context:
        dashboard_url = "127.0.0.1:8265"

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options) or Context())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("VLRLHF_DASHBOARD", "1")
    run.start_ray()
    assert calls[-1]["include_dashboard"] is True and calls[-1]["dashboard_host"] == "127.0.0.1"
    assert "Ray dashboard: http://127.0.0.1:8265\n" in capsys.readouterr().out
    run.start_ray(dashboard=False)
    assert calls[-1]["include_dashboard"] is False
    # `vlrlhf run SPEC --no-dashboard` says so to start_ray through the environment
    monkeypatch.setattr(run, "run_job", lambda *args, **kwargs: 0)
    assert main(["run", "spec.yaml", "--no-dashboard"]) == 0
    run.start_ray()
    assert calls[-1]["include_dashboard"] is False


def test_start_ray_keeps_a_running_ray(ray_cluster):
    from jobs.run import start_ray

    address = ray_cluster.get_runtime_context().gcs_address
    start_ray()  # a second ray.init here would raise; a restart would change the address
    assert ray_cluster.is_initialized() and ray_cluster.get_runtime_context().gcs_address == address


def test_a_local_cluster_runs_the_jobs_workers_at_the_drivers_priority():
    """Ray starts workers at niceness 15: behind a driver that trains in-process they would
    get a few percent of a busy CPU and the pipeline that feeds the training would stall."""
    import os
    import pathlib
    import shutil
    import tempfile

    from tests.conftest import RAY_ENV

    script = ("import os, ray\n"
              "from jobs.run import start_ray\n"
              "start_ray(dashboard=False)\n"
              "worker = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())\n"
              "print('NICENESS', os.nice(0), worker)\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # socket paths must stay short
    env.update(RAY_ENV, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), RAY_TMPDIR=temp_dir)
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    line = [text for text in out.stdout.splitlines() if text.startswith("NICENESS")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    driver, worker = map(int, line[0].split()[1:])
    assert worker == driver


def test_the_drivers_accelerator_setting_stays_on_its_machine_when_it_joins_a_cluster():
    """A driver in the CPU image (DS_ACCELERATOR=cpu) that joins a GPU cluster must not put
    DeepSpeed on CPU on the GPU workers; a cluster it starts itself is its own machine."""
    from jobs.run import worker_env

    environ = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PATH": "/bin"}
    assert worker_env(environ, joining=True) == {"TOKENIZERS_PARALLELISM": "false", "RAY_worker_niceness": "0"}
    assert worker_env(environ, joining=False) == {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                                  "RAY_worker_niceness": "0"}
