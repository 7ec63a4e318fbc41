"""ActorGroup: N workers of one role on a placement group, or one in-process worker.

    group = ActorGroup(PolicyWorker, spec.resources.policy, name="policy", args=(spec,))
    refs = group.map("train_step", shards, ref_logps)    # one call per worker -> ObjectRefs
    metrics = group.get(refs)

`num_workers: 0` runs the same class in the driver (no Ray): calls return values, and
`breakpoint()` works. Colocation (`resources.reference.colocate: policy`): the policy's
bundles are made large enough for both roles and reference worker i joins bundle i,
so both models share a GPU (or a node's CPUs) instead of needing their own.
With workers, each gets one bundle of the group's placement
group ({"CPU": cpus, "GPU": gpus} + custom_resources) and the workers join one
torch.distributed group (gloo on CPU, nccl on GPU) with rank = bundle index.

Cluster behaviour comes from `cluster_settings(spec.trainer)` (jobs.recovery sets it for
a job): how long placement waits and how often it says what it waits for, and the
collectives' timeout, so a lost peer fails an all-reduce instead of blocking it.
`get` returns as soon as any worker fails, so a dead actor surfaces at once even
while its peers are stuck in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import socket
import time
from typing import Any

from vlrlhf.config import GroupSpec


@dataclasses.dataclass
class ClusterSettings:
    placement_timeout_s: float = 1800.0
    placement_report_s: float = 30.0
    collective_timeout_s: float = 600.0


SETTINGS = ClusterSettings()


@contextlib.contextmanager
def cluster_settings(trainer):
    """Groups created inside take their placement and collective timeouts from `trainer` (TrainerSpec)."""
    global SETTINGS
    previous = SETTINGS
    SETTINGS = ClusterSettings(trainer.placement_timeout_s, trainer.placement_report_s, trainer.collective_timeout_s)
    try:
        yield SETTINGS
    finally:
        SETTINGS = previous


class PlacementTimeout(RuntimeError):
    """A group's bundles could not be placed within trainer.placement_timeout_s."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerBase:
    """Distributed set-up shared by every role's worker class."""

    rank = 0
    world_size = 1
    collective_timeout_s = 600.0

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup_distributed(self, master: str, port: int, rank: int, world_size: int) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{master}:{port}", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=self.collective_timeout_s))

    def set_collective_timeout(self, seconds: float) -> None:
        """Before setup_distributed: a collective whose peer is gone fails after `seconds`."""
        self.collective_timeout_s = seconds

    def ping(self) -> int:
        return self.rank

    def process(self) -> dict:
        """This worker's process and node (tests kill them on purpose)."""
        import os

        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def heap(self, top: int = 8) -> list[str]:
        """Python allocations grown since the first call (which starts tracemalloc, 12 frames):
        the `top` tracebacks by growth, innermost frame last. For soak runs (benchmarks/soak.py
        --trace); tracing slows the worker's Python allocations."""
        import tracemalloc

        if not tracemalloc.is_tracing():
            tracemalloc.start(12)
            self._heap_base = tracemalloc.take_snapshot()
            return []
        grown = tracemalloc.take_snapshot().compare_to(self._heap_base, "traceback")
        return [f"{stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks: " +
                " <- ".join(f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in
                            reversed(stat.traceback)) for stat in grown[:top]]

    def write_checkpoint(self, destination: str, *args) -> dict:
        """`self.save(folder, *args)` into a folder on this node, then to `destination` (a URI,
        uploaded from here; or a shared path, written in place). Returns what was written."""
        from actors.storage import write_folder

        return write_folder(destination, lambda folder: self.save(folder, *args))

    def read_checkpoint(self, source: str):
        """`self.load_state(folder)` from `source` (a URI is downloaded to this node first)."""
        from actors.storage import local_copy

        with local_copy(source) as folder:
            return self.load_state(folder)

    def placement(self) -> dict:
        """Where this worker runs: its placement group and the resources it holds there
        (Ray names bundle resources `CPU_group_<index>_<pg id>`)."""
        import ray

        context = ray.get_runtime_context()
        return {"placement_group": context.get_placement_group_id(), "node": context.get_node_id(),
                "resources": context.get_assigned_resources()}


class ActorGroup:
    """`reserve`: extra per-bundle resources for groups that will colocate on these bundles;
    `share`: an existing group whose bundles this one's workers join (worker i on bundle i)."""

    def __init__(self, worker_class: type, resources: GroupSpec, *, name: str, args: tuple = (),
                 kwargs: dict | None = None, reserve: dict | None = None, share: ActorGroup | None = None,
                 connect: bool = True):
        self.name = name
        self.num_workers = resources.num_workers
        self.local = None
        self.actors: list = []
        self.placement_group = None
        self.owns_placement = share is None
        kwargs = kwargs or {}
        if self.num_workers == 0:
            self.local = worker_class(*args, **kwargs)
            self.local.setup_distributed("127.0.0.1", 0, 0, 1)
            return
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if share is not None:  # colocated: the other group's bundles, which reserved room for these workers
            if share.num_workers != self.num_workers or share.placement_group is None:
                raise ValueError(f"resources.{name}: colocating needs {self.num_workers} worker(s) like "
                                 f"resources.{share.name}, on Ray (num_workers >= 1)")
            self.placement_group = share.placement_group
        else:
            bundle = group_bundle(resources, reserve)
            self.placement_group = placement_group([dict(bundle) for _ in range(self.num_workers)],
                                                   strategy=resources.placement, name=f"vlrlhf-{name}")
            wait_for_placement(self.placement_group, name, self.num_workers, bundle, resources.placement)
        remote = ray.remote(worker_class)
        custom = resources.custom_resources if share is None else {}
        for index in range(self.num_workers):
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)
            self.actors.append(remote.options(num_cpus=resources.cpus, num_gpus=resources.gpus,
                                              resources=dict(custom), scheduling_strategy=strategy,
                                              name=f"{name}-{index}-{id(self)}").remote(*args, **kwargs))
        for actor in self.actors:  # before the process group exists (calls on an actor run in order)
            actor.set_collective_timeout.remote(SETTINGS.collective_timeout_s)
        if connect:
            self.connect()

    def connect(self) -> None:
        """Wait for the workers (their processes start and load their models in the background
        from the moment the group is placed) and join them in one torch.distributed group.
        `ActorGroup(..., connect=False)` leaves this to the caller, who may start other work
        (the data pipeline) on the room the placement left meanwhile."""
        if self.local is not None or not self.actors:
            return
        master, port = self.get([self.actors[0].address.remote()])[0]
        self.get([actor.setup_distributed.remote(master, port, rank, self.num_workers)
                  for rank, actor in enumerate(self.actors)])

    @property
    def world_size(self) -> int:
        return max(self.num_workers, 1)

    def map(self, method: str, *per_worker_args: list) -> list:
        """Call `method` on worker i with the i-th element of each argument list."""
        for values in per_worker_args:
            if len(values) != self.world_size:
                raise ValueError(f"{self.name}.{method}: {len(values)} argument shares for {self.world_size} workers")
        if self.local is not None:
            return [getattr(self.local, method)(*(values[0] for values in per_worker_args))]
        return [getattr(actor, method).remote(*(values[i] for values in per_worker_args))
                for i, actor in enumerate(self.actors)]

    def call(self, index: int, method: str, *args: Any):
        """One call on worker `index` (an ObjectRef, or the value in-process)."""
        if self.local is not None:
            return getattr(self.local, method)(*args)
        return getattr(self.actors[index], method).remote(*args)

    def broadcast(self, method: str, *args: Any) -> list:
        """The same call on every worker."""
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        return [getattr(actor, method).remote(*args) for actor in self.actors]

    def get(self, results: list) -> list:
        """The calls' values. Fails as soon as any call fails (a dead worker's peers may be
        blocked in a collective: waiting for them first would wait out its timeout)."""
        if self.local is not None:
            return [resolve(r) for r in results]
        import ray

        pending = [r for r in results if isinstance(r, ray.ObjectRef)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raises the worker's error (RayActorError when it died)
        return ray.get(results)

    def shutdown(self) -> None:
        """Kill the workers and free the bundles; safe on workers or nodes that are already gone."""
        if self.local is not None:
            self.local = None
            return
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if self.placement_group is not None and self.owns_placement:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.placement_group)
                wait_removed(self.placement_group)
        self.actors = []


def wait_removed(group, timeout_s: float = 10.0) -> bool:
    """Wait until the cluster has taken a removed placement group back (removal is
    asynchronous): a job started right after this one (a retry, the next test) then sees its
    CPUs free. False when it is still there after timeout_s."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.util.placement_group_table(group).get("state") == "REMOVED":
            return True
        time.sleep(0.05)
    return False


def group_bundle(resources: GroupSpec, reserve: dict | None = None) -> dict[str, float]:
    """One worker's bundle: its CPUs, GPUs and custom resources, plus what colocated roles reserve."""
    bundle = {"CPU": resources.cpus} | ({"GPU": resources.gpus} if resources.gpus else {})
    bundle |= {key: value for key, value in resources.custom_resources.items() if value}
    for key, value in (reserve or {}).items():
        if value:
            bundle[key] = bundle.get(key, 0) + value
    return bundle


def wait_for_placement(group, name: str, count: int, bundle: dict, strategy: str) -> None:
    """Wait for a placement group as long as the settings allow, saying every
    placement_report_s seconds what it waits for; on timeout remove it (a pending group
    would take the resources later) and raise PlacementTimeout."""
    import ray

    ready = group.ready()
    started = time.monotonic()
    while True:
        left = SETTINGS.placement_timeout_s - (time.monotonic() - started)
        done, _ = ray.wait([ready], timeout=max(0.0, min(SETTINGS.placement_report_s, left)))
        if done:
            ray.get(done)
            return
        message = describe_wait(name, count, bundle, strategy, time.monotonic() - started)
        if time.monotonic() - started >= SETTINGS.placement_timeout_s:
            ray.util.remove_placement_group(group)
            raise PlacementTimeout(f"{message}; gave up after trainer.placement_timeout_s="
                                   f"{SETTINGS.placement_timeout_s:g}")
        print(message, flush=True)


def describe_wait(name: str, count: int, bundle: dict, strategy: str, waited: float) -> str:
    """What a pending group asks for and which resources the cluster is short of."""
    import ray

    needed = {key: value * count for key, value in bundle.items()}
    free, total = ray.available_resources(), ray.cluster_resources()
    short = {key: value - free.get(key, 0.0) for key, value in needed.items() if value > free.get(key, 0.0) + 1e-9}
    shortage = ", ".join(f"{key} {value:g} (free {free.get(key, 0.0):g} of {total.get(key, 0.0):g})"
                         for key, value in short.items()) or "nothing in total: no single node has room for " \
                                                               "a bundle (or the strategy cannot be met)"
    shown = "{" + ", ".join(f"{key}: {value:g}" for key, value in bundle.items()) + "}"
    return f"resources.{name}: waiting {waited:.0f}s for {count} bundle(s) of {shown} ({strategy}); short of {shortage}"


def resolve(value):
    """An ObjectRef's value (in-process workers may be handed refs by remote groups), else the value."""
    try:
        import ray

        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
    except ImportError:
        pass
    return value
