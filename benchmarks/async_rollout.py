"""One-step-off asynchronous rollouts vs synchronous ones: seconds per online step.

    .venv/bin/python benchmarks/async_rollout.py [--steps 8] [--config configs/demo_ppo.yaml] [--engine transformers]

The same job (tiny model, policy and rollout on separate Ray workers, one CPU each)
runs twice: `online.async_rollout=false`, where the rollout of step t+1 starts after
step t's weight sync, and `true`, where it runs while step t trains. Prints the mean
step time after the first step of each, the ratio sync / async (> 1: async is
faster) and the mean approx KL between the behaviour and the trained policy at the
first mini-batch, the price of being one step off.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(config: str, steps: int, asynchronous: bool, engine: str, out: pathlib.Path) -> dict:
    from jobs.run import run_job

    run_dir = out / ("async" if asynchronous else "sync")
    overrides = [f"trainer.max_steps={steps}", f"checkpoint.dir={run_dir / 'ck'}", "trainer.log_every=1000",
                 f"online.async_rollout={str(asynchronous).lower()}", f"online.engine={engine}",
                 "online.mini_batches=1", "resources.policy={num_workers: 1, cpus: 1}",
                 "resources.rollout={num_workers: 1, cpus: 1}"]
    if run_job(config, overrides, run_dir=str(run_dir)) != 0:
        raise SystemExit(f"the {'async' if asynchronous else 'sync'} run failed")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [row for row in rows if "time/step_s" in row][1:]  # the first step waits for a cold rollout
    return {"step_s": sum(r["time/step_s"] for r in steps_rows) / len(steps_rows),
            "rollout_wait_s": sum(r["time/rollout_wait_s"] for r in steps_rows) / len(steps_rows),
            "approx_kl": sum(r.get("train/approx_kl", 0.0) for r in steps_rows) / len(steps_rows),
            "reward": sum(r["train/reward"] for r in steps_rows) / len(steps_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_ppo.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as folder:
        results = {mode: run(args.config, args.steps, mode == "async", args.engine, pathlib.Path(folder))
                   for mode in ("sync", "async")}
    print(f"\n{'mode':<8}{'step s':>10}{'rollout wait s':>16}{'approx KL':>12}{'reward':>9}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['step_s']:>10.3f}{r['rollout_wait_s']:>16.3f}{r['approx_kl']:>12.2e}{r['reward']:>9.3f}")
    print(f"speed-up (sync step time / async step time): {results['sync']['step_s'] / results['async']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
