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
