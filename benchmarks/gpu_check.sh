#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): LLaVA-1.5-7B geometry DPO on one GPU, under
# 9 minutes on one H100, no network, no Ray / DeepSpeed / vLLM needed.
#   bash benchmarks/gpu_check.sh [--dry] [--out gpu_check.json] [--pairs 8] [--steps 5]
# PYTHON picks the interpreter (default python3). Modules the machine lacks can come as
# wheels in GPU_CHECK_WHEELS (a folder that travels with the tree; docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "peft", "pydantic", "yaml", "PIL", "numpy", "safetensors")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ] && [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" \
    $(echo "$missing" | sed 's/\bPIL\b/pillow/; s/\byaml\b/pyyaml/') >&2
elif [ -n "$missing" ]; then
  echo "gpu_check: missing Python modules: $missing (set GPU_CHECK_WHEELS to a folder of wheels)" >&2
  exit 2
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu_check.py "$@"
