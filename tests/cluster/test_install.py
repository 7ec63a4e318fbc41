"""An installed vlrlhf (a wheel, not the checkout) finds its own specs and bundled data:
`vlrlhf demo --help` and a 2-step `vlrlhf run configs/demo_sft.yaml` from a temporary
virtual environment, in a working directory outside the repository. This is what the
container image runs (docker/Dockerfile.cpu installs the same wheel)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "vlrlhf", "actors", "jobs", "configs", "data")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """A venv holding only the vlrlhf wheel; its dependencies come from the test
    interpreter's site-packages through a path file (not processed as a site folder, so
    the checkout's editable install stays out of it)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and egg-info next to the sources
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(base / "dist")],
                   check=True, cwd=base)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")], check=True)
    python = base / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    pathlib.Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel, = (base / "dist").glob("vlrlhf-*.whl")
    subprocess.run(pip + ["--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    return base / "venv"


def run_installed(venv: pathlib.Path, args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    return subprocess.run([str(venv / "bin" / "vlrlhf"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    done = subprocess.run([str(installed / "bin" / "python"), "-c",
                           "import jobs.demo, vlrlhf.bundle; print(vlrlhf.bundle.bundle_root())"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    root = pathlib.Path(done.stdout.strip())
    assert root.is_relative_to(installed) and root.name == "bundled"
    assert (root / "configs" / "demo_sft.yaml").is_file() and (root / "data" / "shapes" / "sft.json").is_file()
    assert not root.is_relative_to(ROOT)


def test_installed_vlrlhf_demo_help_and_a_two_step_run_outside_the_repository(installed, tmp_path):
    done = run_installed(installed, ["demo", "--help"], tmp_path)
    assert done.returncode == 0 and "usage: vlrlhf demo" in done.stdout, done.stderr
    done = run_installed(installed, ["run", "configs/demo_sft.yaml", "trainer.max_steps=2", "evaluation=null",
                                     "--no-dashboard"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "using the spec that ships with vlrlhf" in done.stderr
    checkpoint = tmp_path / "runs" / "demo_sft" / "checkpoints" / "step-000002"
    assert (checkpoint / "config.json").is_file() and list(checkpoint.glob("*.safetensors"))
    steps = [row["step"] for row in map(json.loads, (tmp_path / "runs" / "demo_sft" / "metrics.jsonl").open())
             if "train/loss" in row]
    assert steps and max(steps) == 2
    assert not list((installed / "lib").rglob("runs"))  # nothing written into the installed package
    done = run_installed(installed, ["run", "configs/no_such_spec.yaml"], tmp_path)
    assert done.returncode != 0 and "configs/no_such_spec.yaml does not exist" in done.stdout + done.stderr
