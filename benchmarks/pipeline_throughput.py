"""The data plane, measured: encode throughput, and what the driver holds during training.

    .venv/bin/python benchmarks/pipeline_throughput.py encode [--pairs 800]
    .venv/bin/python benchmarks/pipeline_throughput.py driver [--sizes 2000 20000] [--steps 20]

`encode`: the same synthetic preference pairs through the pipeline's read/convert/sort/
encode stages with 1 and with 2 encode tasks at once (data.pipeline_cpus), against a
single-process loop (the peer) measured in the same run; pairs/s of each.

`driver`: a tiny-LLaVA DPO run (`vlrlhf run configs/demo_dpo.yaml`, policy on a Ray
worker) on N synthetic pairs for each N in --sizes, each in a fresh process: the
driver's peak RSS, the peak memory of the whole process tree (driver, Ray's own processes,
workers) as the sum of RSS and as the sum of PSS (shared library pages counted once), and
the driver's share of the tree's CPU time from the first logged step to the end (training,
the final evaluation and the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "TOKENIZERS_PARALLELISM": "false", "VLRLHF_DASHBOARD": "0"}


def encode(pairs: int) -> None:
    os.environ.update(ENV)
    import ray

    from vlrlhf.data.pipeline import (EncodeSettings, PipelineResources, RecordSource, encode_record,
                                      encoded_dataset, epoch_dataset, record_dataset)
    from vlrlhf.data.reader import read_records
    from vlrlhf.data.sources import expand_sources
    from vlrlhf.data.synthetic import synthesize
    from vlrlhf.models.registry import load_adapter
    from vlrlhf.models.tiny import build_tiny_model

    folder = pathlib.Path(tempfile.mkdtemp())
    synthesize(folder / "data", ("preference",), num_train=pairs, num_test=1)
    model = build_tiny_model("llava", folder / "model")
    settings = EncodeSettings(model_path=str(model), task="preference", image_root=str(folder / "data"))
    path = str(folder / "data" / "preference.json")

    adapter = load_adapter(model)
    records = read_records(path, "plain_dpo")
    started = time.perf_counter()
    for record in records:
        encode_record(adapter, record, settings)
    single = len(records) / (time.perf_counter() - started)

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    source = RecordSource(tuple(expand_sources(path)), "plain_dpo")
    rates = {}
    for tasks in (1, 2, 1, 2):  # alternating, the second of each counts (warm workers)
        dataset = encoded_dataset(epoch_dataset(record_dataset(source), 0, 0, rows=pairs), settings,
                                  resources=PipelineResources(1.0, tasks))
        started = time.perf_counter()
        count = dataset.count()
        rates[tasks] = count / (time.perf_counter() - started)
    ray.shutdown()
    print(f"tiny llava, {pairs} preference pairs, read + convert + sort + encode")
    print(f"single-process loop     {single:8.1f} pairs/s")
    for tasks, rate in rates.items():
        print(f"pipeline, {tasks} encode task(s) {rate:8.1f} pairs/s   ({rate / single:.2f}x the loop)")


def tree_memory(process) -> tuple[int, int, dict]:
    """(sum of RSS, sum of PSS, PSS by process name) over the process and its descendants.
    RSS counts a shared page (torch's libraries, mapped by every worker that imports torch)
    once per process that maps it; PSS splits it between them, so the PSS sum is the memory
    the tree holds."""
    import psutil

    rss = pss = 0
    named = {}
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
            name = "driver" if member.pid == process.pid else member.name()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
        named[name] = named.get(name, 0) + info.pss
    return rss, pss, named


def tree_cpu(process) -> tuple[float, float]:
    """(driver CPU seconds, whole tree CPU seconds)."""
    import psutil

    def seconds(member):
        times = member.cpu_times()
        return times.user + times.system

    driver, total = seconds(process), 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += seconds(member)
        except psutil.Error:
            pass
    return driver, total


def measure_run(pairs: int, steps: int) -> dict:
    """Run in this process: synthesize, then train while a thread samples memory and CPU."""
    import psutil

    os.environ.update(ENV)
    from jobs.run import run_job
    from vlrlhf.data.synthetic import synthesize

    folder = pathlib.Path(tempfile.mkdtemp())
    synthesize(folder / "data", ("preference",), num_train=pairs, num_test=1)
    me = psutil.Process()
    peaks = {"driver": 0, "tree": 0, "tree_pss": 0, "by_process": {}}
    done = threading.Event()
    metrics = folder / "run" / "metrics.jsonl"
    training = {}  # CPU times when the first step is logged: the share counts training only

    def sample():
        while not done.is_set():
            peaks["driver"] = max(peaks["driver"], me.memory_info().rss)
            rss, pss, named = tree_memory(me)
            peaks["tree"] = max(peaks["tree"], rss)
            if pss > peaks["tree_pss"]:
                peaks["tree_pss"], peaks["by_process"] = pss, named
            if not training and metrics.exists() and metrics.stat().st_size:
                training["cpu"] = tree_cpu(me)
            time.sleep(1.0)  # the sampler runs in the driver: keep its own CPU small

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    code = run_job(str(ROOT / "configs" / "demo_dpo.yaml"), [
        f"data.train={folder / 'data' / 'preference.json'}", "data.eval=[]", f"data.image_root={folder / 'data'}",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", f"checkpoint.dir={folder / 'ck'}"],
        run_dir=str(folder / "run"))
    wall = time.perf_counter() - started
    ended_cpu = tree_cpu(me)
    done.set()
    sampler.join()
    started_cpu = training.get("cpu", (0.0, 0.0))
    driver_cpu, tree_total = ended_cpu[0] - started_cpu[0], ended_cpu[1] - started_cpu[1]
    return {"pairs": pairs, "code": code, "wall_s": wall, "driver_peak_mb": peaks["driver"] / 2**20,
            "tree_peak_mb": peaks["tree"] / 2**20, "tree_pss_peak_mb": peaks["tree_pss"] / 2**20,
            "pss_by_process_mb": {k: round(v / 2**20) for k, v in sorted(peaks["by_process"].items(),
                                                                         key=lambda kv: -kv[1])},
            "driver_cpu_share": driver_cpu / max(tree_total, 1e-9)}


def driver(sizes: list[int], steps: int) -> None:
    rows = []
    for pairs in sizes:  # a fresh process each: peaks are per run
        out = subprocess.run([sys.executable, __file__, "_run", str(pairs), str(steps)], capture_output=True,
                             text=True, cwd=ROOT, env={**os.environ, **ENV})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"run with {pairs} pairs failed")
        rows.append(json.loads(line[-1][len("RESULT "):]))
    print(f"tiny-LLaVA DPO, {steps} steps, policy on a Ray worker, reference in it")
    print(f"{'pairs':>7}{'driver peak MB':>16}{'tree RSS sum MB':>17}{'tree PSS sum MB':>17}"
          f"{'driver CPU share':>18}{'wall s':>8}")
    for row in rows:
        print(f"{row['pairs']:>7}{row['driver_peak_mb']:>16.0f}{row['tree_peak_mb']:>17.0f}"
              f"{row['tree_pss_peak_mb']:>17.0f}{row['driver_cpu_share']:>18.1%}{row['wall_s']:>8.0f}")
        print(f"        PSS at the tree's peak, by process: {row['pss_by_process_mb']}")
    if len(rows) > 1:
        ratio = rows[-1]["driver_peak_mb"] / rows[0]["driver_peak_mb"]
        print(f"driver peak RSS, largest / smallest data set: {ratio:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        print("RESULT " + json.dumps(measure_run(int(sys.argv[2]), int(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("encode")
    one.add_argument("--pairs", type=int, default=800)
    two = commands.add_parser("driver")
    two.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    two.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.command == "encode":
        encode(args.pairs)
    else:
        driver(args.sizes, args.steps)


if __name__ == "__main__":
    main()
