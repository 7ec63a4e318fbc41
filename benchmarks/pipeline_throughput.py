"""The data plane, measured: encode throughput and its scaling, and what a training run holds.

    .venv/bin/python benchmarks/pipeline_throughput.py encode [--pairs 2000]
    .venv/bin/python benchmarks/pipeline_throughput.py scaling [--pairs 3000] [--nodes 1 2] [--node-cpus 1]
    .venv/bin/python benchmarks/pipeline_throughput.py driver [--sizes 500 5000] [--steps 20] [--shape rlaifv]
    .venv/bin/python benchmarks/pipeline_throughput.py online [--sizes 2000 20000] [--steps 8]

`encode`: the same synthetic preference pairs through the pipeline (window readers and
warm encoders, the seeded windowed order) with 1 and with 2 encoders, against a
single-process loop (the peer) measured in the same run: pairs/s of each, from the first
encoded block to the last (the encoders warm), and the start-up (first block) apart.

`scaling`: the pipeline on a `ray.cluster_utils.Cluster` with a 0-CPU head and 1, then 2
worker nodes of --node-cpus CPUs (the pipeline gets every worker CPU): rows/s and the
cluster's CPU-seconds per encoded row from the first block to the last (flat = no per-row
cost grows with the cluster). The nodes share this machine: keep nodes x node-cpus within
its cores, or the figure measures oversubscription rather than the pipeline.

`online`: a tiny-LLaVA GRPO run (configs/demo_grpo.yaml, policy and rollout engine on Ray
workers) on N image prompts for each N in --sizes, each in a fresh process: the driver's
peak RSS (the prompts stream through the pipeline; the driver holds a step's references).

`driver`: a tiny-LLaVA DPO run (`vlrlhf run configs/demo_dpo.yaml`, policy on a Ray
worker) on N pairs for each N in --sizes, each in a fresh process: the driver's peak RSS,
the peak memory of the whole process tree (driver, Ray's own processes, workers, the
object store) as the sum of RSS and as the sum of PSS (shared pages counted once), and
the driver's share of the tree's CPU time from the first logged step to the end.
`--shape shapes`: the bundled shapes pairs (56 px PNG files); `rlaifv`: RLAIF-V's layout,
Parquet files with the images inside (448 px JPEG bytes, ~100 KB each).
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


def pairs_and_model(pairs: int):
    from vlrlhf.data.synthetic import synthesize
    from vlrlhf.models.tiny import build_tiny_model

    folder = pathlib.Path(tempfile.mkdtemp())
    synthesize(folder / "data", ("preference",), num_train=pairs, num_test=1)
    return folder, build_tiny_model("llava", folder / "model")


def timed_stream(dataset, cpu=None) -> dict:
    """Consume an encoded dataset as the trainer does (Stream, RowStream): seconds to the first
    block, rows and seconds (and `cpu()` seconds, if given) from the first block to the last."""
    from vlrlhf.data.stream import Stream, rows_in

    started = time.perf_counter()
    stream = Stream(dataset)
    stream.rows.take(1)
    warm, warm_cpu = time.perf_counter(), cpu() if cpu else 0.0
    rows = 0  # after the first: the encoders are warm
    while piece := stream.rows.take(64):
        rows += rows_in(piece)
    ended = time.perf_counter()
    stream.close()
    return {"startup_s": warm - started, "rows": rows, "steady_s": ended - warm,
            "cpu_s": (cpu() - warm_cpu) if cpu else 0.0}


def encode(pairs: int) -> None:
    os.environ.update(ENV)
    import ray

    from vlrlhf.data.order import plan_windows
    from vlrlhf.data.pipeline import (EncodeSettings, PipelineResources, RecordSource, count_records, encode_record,
                                      encoded_dataset, record_dataset)
    from vlrlhf.data.reader import read_records
    from vlrlhf.data.sources import expand_sources
    from vlrlhf.models.registry import load_adapter

    folder, model = pairs_and_model(pairs)
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
    windows = plan_windows(count_records(source), 0, range(0, 1), 1024)
    runs = {}
    for encoders in (1, 2, 1, 2):  # alternating; the second of each counts
        resources = PipelineResources(encoders=encoders, encoder_cpus=1.75 / encoders)
        runs[encoders] = timed_stream(encoded_dataset(record_dataset(source, windows, resources), settings,
                                                      resources=resources))
    ray.shutdown()
    print(f"tiny llava, {pairs} preference pairs, read + window order + encode, 2 CPUs")
    print(f"single-process loop       {single:8.1f} pairs/s")
    for encoders, run in runs.items():
        rate = run["rows"] / run["steady_s"]
        print(f"pipeline, {encoders} encoder(s)    {rate:8.1f} pairs/s   ({rate / single:.2f}x the loop; "
              f"first block after {run['startup_s']:.1f} s)")


def cluster_cpu(cluster_processes) -> float:
    import psutil

    total = 0.0
    for process in cluster_processes():
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def scaling(pairs: int, node_counts: list[int], node_cpus: int) -> None:
    os.environ.update(ENV)
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from vlrlhf.data.order import plan_windows
    from vlrlhf.data.pipeline import (READ_CPUS, EncodeSettings, PipelineResources, RecordSource, count_records,
                                      encoded_dataset, record_dataset)
    from vlrlhf.data.sources import expand_sources

    folder, model = pairs_and_model(pairs)
    settings = EncodeSettings(model_path=str(model), task="preference", image_root=str(folder / "data"))
    me = psutil.Process()
    rows = []
    for nodes in node_counts:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(nodes):
            cluster.add_node(num_cpus=node_cpus)
        ray.init(address=cluster.address, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        source = RecordSource(tuple(expand_sources(str(folder / "data" / "preference.json"))), "plain_dpo")
        windows = plan_windows(count_records(source), 0, range(0, 1), 256)  # windows for every reader
        # one encoder per worker CPU, sized so that one reader fits beside them on any node
        resources = PipelineResources(encoders=node_cpus * nodes, encoder_cpus=1.0 - READ_CPUS)
        run = timed_stream(encoded_dataset(record_dataset(source, windows, resources), settings,
                                           resources=resources), cpu=lambda: cluster_cpu(
            lambda: me.children(recursive=True)))
        ray.shutdown()
        cluster.shutdown()
        rows.append((nodes, resources, run))
    print(f"tiny llava, {pairs} preference pairs, 0-CPU head + worker nodes of {node_cpus} CPU(s) (one machine, "
          f"{os.cpu_count()} cores)")
    print(f"{'worker nodes':>12}{'encoders':>10}{'readers':>9}{'rows/s':>9}{'CPU-ms per row':>16}")
    for nodes, resources, run in rows:
        print(f"{nodes:>12}{resources.encoders:>10}{resources.readers:>9}{run['rows'] / run['steady_s']:>9.1f}"
              f"{1000 * run['cpu_s'] / run['rows']:>16.2f}")


def rlaifv_parquet(folder: pathlib.Path, pairs: int) -> pathlib.Path:
    """RLAIF-V's layout (question, chosen, rejected, image {bytes, path}) in Parquet shards of 500
    rows (one row group each), with 448 px JPEG images of noise and shapes (~100 KB)."""
    import io
    import random

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = folder / "rlaifv"
    out.mkdir(parents=True)
    rng = random.Random(0)
    base = np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)
    for shard in range(0, pairs, 500):
        rows = []
        for index in range(shard, min(pairs, shard + 500)):
            pixels = np.roll(base, rng.randrange(448), axis=rng.randrange(2))
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=60)
            colour = rng.choice(["red", "green", "blue"])
            rows.append({"question": f"Describe the picture {index}.", "chosen": f"A {colour} pattern.",
                         "rejected": "A cat.", "image": {"bytes": buffer.getvalue(), "path": f"{index}.jpg"}})
        pq.write_table(pa.Table.from_pylist(rows), out / f"train-{shard // 500:05d}.parquet")
    return out


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


def measure_run(pairs: int, steps: int, shape: str) -> dict:
    """Run in this process: make the data, then train while a thread samples memory and CPU."""
    import psutil

    os.environ.update(ENV)
    from jobs.run import run_job
    from vlrlhf.data.synthetic import synthesize

    folder = pathlib.Path(tempfile.mkdtemp())
    if shape == "rlaifv":
        data = [f"data.train={rlaifv_parquet(folder, pairs)}", "data.format=rlaifv"]
    else:
        synthesize(folder / "data", ("preference",), num_train=pairs, num_test=1)
        data = [f"data.train={folder / 'data' / 'preference.json'}", f"data.image_root={folder / 'data'}"]
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
        *data, "data.eval=[]", f"trainer.max_steps={steps}", "trainer.eval_every=0", f"checkpoint.dir={folder / 'ck'}"],
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


def measure_online(prompts: int, steps: int) -> dict:
    """A GRPO run in this process with the policy and the engine on Ray workers; the driver's peak RSS."""
    import psutil

    os.environ.update(ENV)
    from jobs.run import run_job
    from vlrlhf.data.synthetic import synthesize

    folder = pathlib.Path(tempfile.mkdtemp())
    synthesize(folder / "data", ("prompts",), num_train=prompts, num_test=1)
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = run_job(str(ROOT / "configs" / "demo_grpo.yaml"), [
        f"data.train={folder / 'data' / 'prompts.jsonl'}", f"data.image_root={folder / 'data'}",
        f"trainer.max_steps={steps}", f"checkpoint.dir={folder / 'ck'}", "resources.policy={num_workers: 1, cpus: 0.5}",
        "resources.rollout={num_workers: 1, cpus: 0.25}", "online.kl_coef=0"], run_dir=str(folder / "run"))
    done.set()
    sampler.join()
    return {"prompts": prompts, "code": code, "driver_peak_mb": peak[0] / 2**20}


def in_fresh_process(command: str, *args: str) -> dict:
    """This script's `command` in a fresh process (peaks are per run): the dict it prints as RESULT."""
    out = subprocess.run([sys.executable, __file__, command, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **ENV})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(out.stdout[-2000:], out.stderr[-4000:])
        raise SystemExit(f"{command} {' '.join(args)} failed")
    return json.loads(line[-1][len("RESULT "):])


def online(sizes: list[int], steps: int) -> None:
    rows = [in_fresh_process("_online", str(prompts), str(steps)) for prompts in sizes]
    print(f"tiny-LLaVA GRPO, {steps} steps, policy and rollout engine on Ray workers, image prompts")
    for row in rows:
        print(f"{row['prompts']:>7} prompts   driver peak RSS {row['driver_peak_mb']:7.0f} MB")
    ratio = rows[-1]["driver_peak_mb"] / rows[0]["driver_peak_mb"]
    print(f"driver peak RSS, largest / smallest prompt set: {ratio:.3f}x")


def driver(sizes: list[int], steps: int, shape: str) -> None:
    rows = [in_fresh_process("_run", str(pairs), str(steps), shape) for pairs in sizes]
    print(f"tiny-LLaVA DPO, {steps} steps, policy on a Ray worker, reference in it, {shape} data")
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
        print("RESULT " + json.dumps(measure_run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_online":
        print("RESULT " + json.dumps(measure_online(int(sys.argv[2]), int(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("encode")
    one.add_argument("--pairs", type=int, default=2000)
    two = commands.add_parser("scaling")
    two.add_argument("--pairs", type=int, default=3000)
    two.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    two.add_argument("--node-cpus", type=int, default=1)
    three = commands.add_parser("driver")
    three.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    three.add_argument("--steps", type=int, default=20)
    three.add_argument("--shape", choices=("shapes", "rlaifv"), default="rlaifv")
    four = commands.add_parser("online")
    four.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    four.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.command == "online":
        online(args.sizes, args.steps)
    elif args.command == "encode":
        encode(args.pairs)
    elif args.command == "scaling":
        scaling(args.pairs, args.nodes, args.node_cpus)
    else:
        driver(args.sizes, args.steps, args.shape)


if __name__ == "__main__":
    main()
