"""benchmarks/gpu_check.sh --dry: the GPU check's code on the CPU at a tiny geometry, so it
cannot rot before a GPU runs it (docs/training.md)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, timeout=300)


def test_the_dry_gpu_check_packs_equals_separate_and_times_both_layouts(tmp_path):
    out = tmp_path / "check.json"
    done = run_check("--dry", "--out", str(out), "--pairs", "3", "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["geometry"] == "tiny" and report["environment"]["device"] == "cpu"
    check = report["packed_vs_separate"]
    assert check["packed"]  # the pair forward packed (no silent fallback to two forwards)
    assert check["logp_relative_error"] <= 1e-4 and check["grad_relative_error"] <= 1e-3
    assert check["grad_cosine"] > 0.999
    for layout in ("vlrlhf_packed", "trl_concatenated"):
        step = report["dpo_step"][layout]
        assert step["step_s"] > 0 and step["pairs_per_s"] == 3 / step["step_s"]
    tokens = report["tokens"]
    # one image and prompt per pair: the useful tokens are fewer than both rows in full
    assert 0 < tokens["useful_per_step"] < 2 * 3 * tokens["row_width"]
    assert all(shared > (56 // 14) ** 2 for shared in tokens["shared_per_pair"])  # the image's tokens are shared
    plan = report["memory_plan"]
    assert plan["total_gb"] == plan["states_gb"] + plan["activations_gb"] > 0


def test_without_a_gpu_the_full_check_says_to_use_dry(tmp_path):
    done = run_check("--out", str(tmp_path / "x.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "--dry" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_missing_modules_are_named_before_anything_runs(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec " + sys.executable + " -S \"$@\"\n")  # -S: no site-packages
    fake.chmod(0o755)
    done = run_check("--dry", env={"PYTHON": str(fake), "GPU_CHECK_WHEELS": ""})
    assert done.returncode == 2
    assert "missing Python modules: torch transformers peft pydantic" in done.stderr
