"""Multi-node runs on one machine, in a process of their own (a `ray.cluster_utils.Cluster`
cannot share a process with the test session's Ray): `python -m tests.cluster.scenario OUT`.

The cluster is KubeRay's layout: a head with 0 CPUs (the driver only) and worker nodes
with their own logical GPUs and their own local folders (TMPDIR) standing in for
separate disks; checkpoints go to S3 (moto on loopback) or a shared folder.

1. offline DPO: the policy SPREAD over nodes A and B (custom resource `trainer`), the
   reference stage on node C (the only free GPUs). During the run a reference worker is
   killed while it scores (from a thread: the stage runs ahead of the policy), then a
   policy worker before step 3, then the node of policy rank 0 (the checkpoint writer)
   before step 4, and a replacement node is added, as KubeRay would. trainer.max_failures
   restarts the job each time (the pipeline's actors do not restart themselves: a lost one
   fails the stream, and the job resumes from its newest complete checkpoint).
2. the same spec resumed from that run's step-2 checkpoint with no failure: the final
   weights must be equal.
3. online GRPO with the rollout on node C and the policy on node A.
4. online GRPO (checkpoint every 2 steps, trainer.max_failures=3): its rollout engine is
   killed at the start of step 4, its policy worker at the start of step 6, the engine's
   node is removed (and replaced) at the start of step 8; then the same spec resumed by
   hand from step 6: the final weights must be equal.
5. async PPO (the next step's rollout in flight, the critic beside the policy): its rollout
   engine killed at the start of step 4 (trainer.max_failures=1); the same comparison.
Results go to OUT/results.json; tests/cluster/test_multinode.py asserts on them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
BUCKET = "vlrlhf"
# a reward that differs inside a group of a random model's answers (exact match is 0 for all of
# them): GRPO's advantages are then not all zero and the policy moves
LENGTH_REWARD = ("online.rewards=[{function: length_penalty, weight: 1.0, "
                 "options: {max_chars: 1, penalty_per_char: 0.1}}]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_args(name: str, cpus: int, gpus: int, resources: dict, disks: pathlib.Path) -> dict:
    disk = disks / name
    disk.mkdir(parents=True, exist_ok=True)
    return {"num_cpus": cpus, "num_gpus": gpus, "resources": resources, "env_vars": {"TMPDIR": str(disk)},
            "metrics_export_port": free_port(), "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port(), "dashboard_agent_listen_port": free_port()}


class Tee(io.TextIOBase):
    """The driver's output, kept for the assertions and still printed."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, data):
        self.text.append(data)
        return self.stream.write(data)

    def flush(self):
        self.stream.flush()


def tensors_of(folder: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def reference_worker_pid(wait_s: float = 30) -> int:
    """A live actor of the reference stage (Ray Data's actor pool), from the GCS (no dashboard here)."""
    import ray

    deadline, names = time.monotonic() + wait_s, set()
    while time.monotonic() < deadline:
        actors = list(ray._private.state.actors().values())
        names = {(a["ActorClassName"], a["State"]) for a in actors}
        # Ray Data names its pool actors MapWorker(MapBatches(<stage>)): only the reference stage's
        alive = [a for a in actors if a["State"] == "ALIVE" and "ReferenceStage" in a["ActorClassName"]]
        if alive:
            return alive[0]["Pid"]
        time.sleep(0.2)
    raise RuntimeError(f"no live reference stage actor; actors: {sorted(names)}")


def offline_overrides(directory: str, resume: str) -> list[str]:
    return ["trainer.max_steps=5", "trainer.batch_size=8", "trainer.micro_batch_size=4", "trainer.eval_every=0",
            "trainer.log_every=1", "data.eval=[]", "data.pipeline_cpus=1", "checkpoint.every=1",
            "checkpoint.keep_last=10", f"checkpoint.dir={directory}", f"checkpoint.resume={resume}",
            "trainer.max_failures=3", "trainer.collective_timeout_s=30", "trainer.placement_timeout_s=120",
            "trainer.placement_report_s=5",
            "resources.policy={num_workers: 2, cpus: 0.5, gpus: 1, placement: SPREAD, "
            "custom_resources: {trainer: 1}}",
            "resources.reference={num_workers: 2, cpus: 0, gpus: 1}"]


def run_offline_with_failures(cluster, disks, out: pathlib.Path) -> dict:
    """Scenario 1: a killed reference worker, a killed policy worker, a removed node."""
    import ray

    import jobs.offline
    from jobs.plan import plan_spec
    from vlrlhf.config import load_spec

    seen = {"placement": None, "events": []}
    original = jobs.offline.OfflineJob.train_step

    def train_step(self, *args, **kwargs):
        step = self.step  # steps done; checkpoint step-N is committed (checkpoint.every=1)
        if seen["placement"] is None:
            seen["placement"] = {name: table["bundles"] for table in ray.util.placement_group_table().values()
                                 if table["state"] == "CREATED" for name in [table["name"]]}
            seen["policy_nodes"] = [ray.get(actor.process.remote())["node"] for actor in self.policy.actors]
        if step == 2 and "policy" not in seen["events"]:
            kill_pid(ray.get(self.policy.actors[1].process.remote())["pid"])
            seen["events"].append("policy")
        elif step == 3 and "node" not in seen["events"]:
            writer = ray.get(self.policy.actors[0].process.remote())["node"]
            (node,) = [n for n in cluster.worker_nodes if n.node_id == writer]
            seen["removed_node"] = writer
            cluster.remove_node(node)
            seen["events"].append("node")
            # KubeRay replaces the pod: a fresh node with the same resources (and its own disk)
            cluster.add_node(**node_args("d", 1, 1, {"trainer": 1}, disks))
        return original(self, *args, **kwargs)

    def kill_reference_worker():
        """The reference stage scores the epoch ahead of the policy (Ray Data's actor pool): kill
        one of its workers while it works, whenever that is."""
        with contextlib.suppress(RuntimeError, ProcessLookupError):  # the event is then missing: the test fails
            kill_pid(reference_worker_pid(wait_s=300))
            seen["events"].insert(0, "reference")

    jobs.offline.OfflineJob.train_step = train_step
    killer = threading.Thread(target=kill_reference_worker, daemon=True)
    killer.start()
    try:
        spec_path = ROOT / "configs" / "demo_dpo.yaml"
        overrides = offline_overrides(f"s3://{BUCKET}/dpo", "off")
        plan = plan_spec(load_spec(spec_path, overrides), [])
        summary = run_job(spec_path, overrides, out / "run-a")
    finally:
        jobs.offline.OfflineJob.train_step = original
    return {"summary": summary, "events": seen["events"], "placement": seen["placement"],
            "policy_nodes": seen.get("policy_nodes"), "removed_node": seen.get("removed_node"),
            "planned": {g.role: [g.bundle] * g.count for g in plan.groups}}


def run_job(spec_path, overrides, run_dir: pathlib.Path) -> dict:
    tee = Tee(sys.stdout)
    started = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        from jobs.run import run_job as run

        code = run(str(spec_path), overrides, run_dir=str(run_dir))
    return {"code": code, "log": "".join(tee.text), "seconds": time.perf_counter() - started}


def download(uri: str, folder: pathlib.Path) -> pathlib.Path:
    from actors.storage import local_copy

    import shutil

    with local_copy(uri) as local:
        shutil.copytree(local, folder)
    return folder


def run_online(out: pathlib.Path) -> dict:
    import ray

    import jobs.online

    seen = {}
    original = jobs.online.OnlineJob.train_step

    def train_step(self, *args, **kwargs):
        if not seen:
            seen["policy"] = ray.get(self.policy.actors[0].process.remote())["node"]
            seen["rollout"] = ray.get(self.rollout.actors[0].process.remote())["node"]
        return original(self, *args, **kwargs)

    jobs.online.OnlineJob.train_step = train_step
    overrides = ["trainer.max_steps=2", "online.prompts_per_step=4", "online.n=2", "online.max_tokens=4",
                 "trainer.micro_batch_size=8", f"checkpoint.dir=s3://{BUCKET}/grpo", "checkpoint.resume=off",
                 "online.skip_equal_groups=false",  # a random model's rewards are all equal: train and sync anyway
                 "resources.policy={num_workers: 1, cpus: 0.5, custom_resources: {trainer: 1}}",
                 "resources.rollout={num_workers: 1, cpus: 0.5, gpus: 1}"]
    try:
        result = run_job(ROOT / "configs" / "demo_grpo.yaml", overrides, out / "run-online")
    finally:
        jobs.online.OnlineJob.train_step = original
    return result | {"nodes": seen}


def online_overrides(directory: pathlib.Path, resume: str, max_steps: int, failures: int) -> list[str]:
    return [f"trainer.max_steps={max_steps}", "online.prompts_per_step=4", "online.n=2", "online.max_tokens=4",
            "trainer.micro_batch_size=8", "trainer.log_every=1", f"checkpoint.dir={directory}",
            f"checkpoint.resume={resume}", "checkpoint.every=2", "checkpoint.keep_last=10",
            f"trainer.max_failures={failures}", "trainer.collective_timeout_s=30", "trainer.placement_timeout_s=120",
            "trainer.placement_report_s=5", "online.skip_equal_groups=false",
            "resources.policy={num_workers: 1, cpus: 0.5, custom_resources: {trainer: 1}}",
            "resources.rollout={num_workers: 1, cpus: 0.5, gpus: 1}"]


def run_online_with_failures(cluster, disks, out: pathlib.Path, spec_name: str, faults: dict[str, int],
                             extra: list[str], max_steps: int) -> dict:
    """Scenario 4/5: an online run whose rollout engine is killed while a step runs, whose
    policy worker is killed, whose engine node is removed (and replaced), each at the start
    of the training step numbered in `faults` (steps done then); then the same spec resumed
    by hand from the checkpoint the last restart resumed from."""
    import ray

    import jobs.online

    seen: dict = {"events": []}
    original = jobs.online.OnlineJob.train_step

    def train_step(self, *args, **kwargs):
        for event, step in faults.items():
            if self.step == step and event not in seen["events"]:
                seen["events"].append(event)
                if event == "rollout":  # async: the next step's rollout is in flight on it now
                    kill_pid(ray.get(self.rollout.actors[0].process.remote())["pid"])
                elif event == "policy":
                    kill_pid(ray.get(self.policy.actors[0].process.remote())["pid"])
                elif event == "node":
                    engine = ray.get(self.rollout.actors[0].process.remote())["node"]
                    (node,) = [n for n in cluster.worker_nodes if n.node_id == engine]
                    seen["removed_node"] = engine
                    cluster.remove_node(node)
                    cluster.add_node(**node_args(f"{spec_name}-{step}", 2, 2, {}, disks))  # KubeRay's replacement
                break  # one fault a step
        return original(self, *args, **kwargs)

    spec_path = ROOT / "configs" / f"{spec_name}.yaml"
    folder = out / f"online-{spec_name}"
    jobs.online.OnlineJob.train_step = train_step
    try:
        failed = run_job(spec_path, online_overrides(folder / "failed", "off", max_steps, len(faults)) + extra,
                         out / f"run-{spec_name}-failed")
    finally:
        jobs.online.OnlineJob.train_step = original
    resumed_at = max(faults.values()) // 2 * 2  # checkpoint.every=2: the newest checkpoint before the last fault
    manual = run_job(spec_path, online_overrides(folder / "manual", str(folder / "failed" / f"step-{resumed_at:06d}"),
                                                 max_steps, 0) + extra, out / f"run-{spec_name}-manual")
    return {"failed": failed, "manual": manual, "events": seen["events"], "removed_node": seen.get("removed_node"),
            "resumed_at": resumed_at, "folder": str(folder)}


def main(out: pathlib.Path) -> None:
    os.environ.update(RAY_ENV)
    from tests.cluster.s3 import moto_server

    results: dict = {}
    temp = pathlib.Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))  # socket paths must stay short
    disks = temp / "disks"
    with moto_server(BUCKET):
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": str(temp), "gcs_server_port": free_port(), "include_dashboard": False,
            "ray_client_server_port": free_port(), "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(), "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port()})
        try:
            for name, cpus, gpus, resources in (("a", 1, 1, {"trainer": 1}), ("b", 1, 1, {"trainer": 1}),
                                                ("c", 2, 2, {})):
                cluster.add_node(**node_args(name, cpus, gpus, resources, disks))
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
            results["head"] = ray.get_runtime_context().get_node_id()
            for name, step in (("offline", lambda: run_offline_with_failures(cluster, disks, out)),
                               ("resumed", lambda: run_job(ROOT / "configs" / "demo_dpo.yaml",
                                                           offline_overrides(str(out / "shared" / "dpo"),
                                                                             f"s3://{BUCKET}/dpo/step-000002"),
                                                           out / "run-b")),
                               ("online", lambda: run_online(out)),
                               ("grpo_failures", lambda: run_online_with_failures(
                                   cluster, disks, out, "demo_grpo", {"rollout": 3, "policy": 5, "node": 7},
                                   [LENGTH_REWARD], 8)),
                               ("ppo_failures", lambda: run_online_with_failures(
                                   cluster, disks, out, "demo_ppo", {"rollout": 3}, ["online.async_rollout=true"],
                                   4))):
                try:
                    results[name] = step()
                except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
                    results[name] = {"error": traceback.format_exc()}
                shown = {k: v for k, v in results[name].items() if k not in ("log", "failed", "manual")}
                print(f"== {name}: {json.dumps(shown, default=str)[:2000]}", flush=True)
            # what the S3 run left: its final checkpoint and step 2, downloaded for the assertions
            if results.get("offline", {}).get("summary", {}).get("code") == 0:
                for step in (2, 5):
                    download(f"s3://{BUCKET}/dpo/step-{step:06d}", out / "s3" / f"step-{step:06d}")
            if results.get("online", {}).get("code") == 0:
                download(f"s3://{BUCKET}/grpo/step-000002", out / "s3" / "grpo-step-000002")
        finally:
            ray.shutdown()
            cluster.shutdown()
    (out / "results.json").write_text(json.dumps(results, default=str, indent=1))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
