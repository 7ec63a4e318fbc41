"""Soak runs: does anything grow with the number of steps? (docs/training.md)

    .venv/bin/python benchmarks/soak.py [--dpo-steps 3000] [--grpo-steps 1000] [--every 100] [key=value ...]

The tiny DPO (configs/demo_dpo.yaml, policy on a Ray worker, the reference a pipeline
stage) and the tiny GRPO (configs/demo_grpo.yaml, policy and rollout engine on Ray
workers, reference in the driver), each on local Ray in a fresh process, for many
epochs of the bundled shapes data. Every --every steps, at the end of a step, it records
the RSS of every process of the run (the driver, each Ray worker and actor, Ray's own
processes) and the object store's usage. Per process it prints the RSS at the first
sample, at the middle and at the end, and the least-squares slope over the second half
in MB per 100 steps (the first half holds warm-up: allocator pools, compiled kernels,
caches that fill once). A process that lives for only part of the run is reported over
the samples it has. Flat means a slope under 1 MB per 100 steps.

The peer is the same run's first half: a leak shows as a slope that the second half
keeps; a one-off growth does not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "TOKENIZERS_PARALLELISM": "false", "VLRLHF_DASHBOARD": "0"}
FLAT_MB_PER_100 = 1.0


def process_name(process) -> str:
    """A stable name: Ray's process title without the method it runs now."""
    import psutil

    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "?"
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]  # ray::PolicyWorker.train_step -> ray::PolicyWorker
    for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if known in title:
            return known
    return process.name()


def object_store_mb() -> float:
    """Plasma memory in use on this node (Ray's memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)  # this run's cluster
    found = re.search(r"Plasma memory usage ([\d.]+) MiB", text)
    return float(found.group(1)) if found else float("nan")


def sample(me, step: int, samples: list) -> None:
    import psutil

    rss = {}
    for member in [me, *me.children(recursive=True)]:
        try:
            key = "driver" if member.pid == me.pid else f"{process_name(member)} [{member.pid}]"
            rss[key] = member.memory_info().rss / 2**20
        except psutil.Error:
            continue
    samples.append({"step": step, "time": time.time(), "rss_mb": rss, "object_store_mb": object_store_mb()})


def traced(job) -> list:
    """The job's actor groups whose Python heap --trace follows."""
    names = ("policy", "rollout") if hasattr(job, "rollout") else ("policy",)
    return [g for g in (getattr(job, name, None) for name in names) if g is not None and g.local is None]


def measure(kind: str, steps: int, every: int, extra: list[str], trace: bool = False) -> dict:
    """One run in this process; a sample every `every` steps, taken by the job's own loop."""
    import psutil

    os.environ.update(ENV)
    folder = pathlib.Path(tempfile.mkdtemp())
    samples: list = []
    me = psutil.Process()
    if kind == "dpo":
        import jobs.offline as module

        job_class, spec = module.OfflineJob, "demo_dpo.yaml"
        overrides = ["data.eval=[]", "trainer.eval_every=0", "trainer.epochs=1000", "trainer.batch_size=8",
                     "trainer.micro_batch_size=8", "resources.policy={num_workers: 1, cpus: 1}"]
    else:
        import jobs.online as module

        job_class, spec = module.OnlineJob, "demo_grpo.yaml"
        overrides = ["trainer.epochs=1000", "online.prompts_per_step=4", "online.n=4", "online.max_tokens=6",
                     "resources.policy={num_workers: 1, cpus: 0.5}", "resources.rollout={num_workers: 1, cpus: 0.5}"]
    original = job_class.train_step

    def train_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.step % every == 0 or self.step == 1:
            sample(me, self.step, samples)
            if trace and self.step > 1:  # the first call starts tracing: growth is counted from there
                samples[-1]["heap"] = {group.name: group.get(group.broadcast("heap"))
                                       for group in traced(self)}
        return result

    job_class.train_step = train_step
    from jobs.run import run_job

    started = time.perf_counter()
    code = run_job(str(ROOT / "configs" / spec), overrides + extra + [
        f"trainer.max_steps={steps}", "trainer.log_every=100", f"checkpoint.dir={folder / 'ck'}",
        "checkpoint.every=1000000"], run_dir=str(folder / "run"))
    return {"kind": kind, "steps": steps, "code": code, "wall_s": time.perf_counter() - started, "samples": samples}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (step, MB), in MB per 100 steps."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


def report(result: dict) -> bool:
    samples = [s for s in result["samples"] if s["step"] > 1]  # step 1: before the first `every`
    steps = [s["step"] for s in samples]
    half = steps[len(steps) // 2] if steps else 0
    print(f"\n{result['kind'].upper()}: {result['steps']} steps in {result['wall_s']:.0f} s (exit {result['code']}), "
          f"{len(samples)} samples; slope over steps {half}-{steps[-1] if steps else 0}")
    print(f"{'process':<44}{'first MB':>10}{'middle MB':>11}{'last MB':>10}{'MB/100 steps':>14}")
    names = sorted({name for s in samples for name in s["rss_mb"]}, key=lambda n: (n != "driver", n))
    flat = True
    rows = [(name, [(s["step"], s["rss_mb"][name]) for s in samples if name in s["rss_mb"]]) for name in names]
    rows.append(("object store (plasma)", [(s["step"], s["object_store_mb"]) for s in samples]))
    for name, points in rows:
        late = [p for p in points if p[0] >= half]
        rate = slope(late) if len(late) >= 3 else float("nan")
        flat &= not rate > FLAT_MB_PER_100  # NaN (too few samples) is not a verdict
        middle = min(points, key=lambda p: abs(p[0] - half))[1]
        print(f"{name[:43]:<44}{points[0][1]:>10.1f}{middle:>11.1f}{points[-1][1]:>10.1f}{rate:>14.3f}")
    print(f"every process flat (< {FLAT_MB_PER_100} MB per 100 steps over the second half): {flat}")
    heaps = [s for s in samples if s.get("heap")]
    if heaps:
        print(f"Python allocations grown between steps {heaps[0]['step']} and {heaps[-1]['step']} (tracemalloc):")
        for group, workers in heaps[-1]["heap"].items():
            for rank, lines in enumerate(workers):
                print(f"  {group} worker {rank}:" + "".join(f"\n    {line}" for line in lines))
    return flat


def in_fresh_process(kind: str, steps: int, every: int, extra: list[str], trace: bool = False) -> dict:
    done = subprocess.run([sys.executable, __file__, "_run", kind, str(steps), str(every), str(int(trace)), *extra],
                          capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **ENV})
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(done.stdout[-2000:], done.stderr[-4000:])
        raise SystemExit(f"the {kind} soak run failed")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dpo-steps", type=int, default=3000)
    parser.add_argument("--grpo-steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--json", help="also write the samples here")
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc in the policy and rollout workers from the first sample on; prints "
                             "the Python allocations that grew most by the last sample")
    parser.add_argument("overrides", nargs="*", help="spec overrides for both runs (key=value)")
    args = parser.parse_args()
    results = [in_fresh_process(kind, steps, args.every, args.overrides, args.trace)
               for kind, steps in (("dpo", args.dpo_steps), ("grpo", args.grpo_steps)) if steps]
    flat = [report(result) for result in results]
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    raise SystemExit(0 if all(flat) else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        result = measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6:], bool(int(sys.argv[5])))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        main()
