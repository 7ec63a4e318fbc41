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
