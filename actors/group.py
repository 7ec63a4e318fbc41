"""ActorGroup: N workers of one role on a placement group, or one in-process worker.

    group = ActorGroup(PolicyWorker, spec.resources.policy, name="policy", args=(spec,))
    refs = group.map("train_step", shards, ref_logps)    # one call per worker -> ObjectRefs
    metrics = group.get(refs)

`num_workers: 0` runs the same class in the driver (no Ray): calls return values, and
`breakpoint()` works. Colocation (`resources.reference.colocate: policy`): the policy's
bundles are made large enough for both roles and reference worker i joins bundle i,
so both models share a GPU (or a node's CPUs) instead of needing their own.
With workers, each gets one bundle of the group's placement
group ({"CPU": cpus, "GPU": gpus}) and the workers join one torch.distributed group
(gloo on CPU, nccl on GPU) with rank = bundle index.
"""

from __future__ import annotations

import socket
from typing import Any

from vlrlhf.config import GroupSpec

PLACEMENT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerBase:
    """Distributed set-up shared by every role's worker class."""

    rank = 0
    world_size = 1

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
                                    world_size=world_size)

    def ping(self) -> int:
        return self.rank

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
                 kwargs: dict | None = None, reserve: dict | None = None, share: ActorGroup | None = None):
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
            bundle = {"CPU": resources.cpus} | ({"GPU": resources.gpus} if resources.gpus else {})
            for key, value in (reserve or {}).items():
                if value:
                    bundle[key] = bundle.get(key, 0) + value
            self.placement_group = placement_group([dict(bundle) for _ in range(self.num_workers)],
                                                   strategy=resources.placement, name=f"vlrlhf-{name}")
            try:
                ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"resources.{name}: {self.num_workers} bundle(s) of {bundle} could not be "
                                   f"placed within {PLACEMENT_TIMEOUT_S}s; the cluster has "
                                   f"{ray.cluster_resources()}") from None
        remote = ray.remote(worker_class)
        for index in range(self.num_workers):
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)
            self.actors.append(remote.options(num_cpus=resources.cpus, num_gpus=resources.gpus,
                                              scheduling_strategy=strategy,
                                              name=f"{name}-{index}-{id(self)}").remote(*args, **kwargs))
        master, port = ray.get(self.actors[0].address.remote())
        ray.get([actor.setup_distributed.remote(master, port, rank, self.num_workers)
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
        if self.local is not None:
            return [resolve(r) for r in results]
        import ray

        return ray.get(results)

    def shutdown(self) -> None:
        if self.local is not None:
            self.local = None
            return
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None and self.owns_placement:
            ray.util.remove_placement_group(self.placement_group)
        self.actors = []


def resolve(value):
    """An ObjectRef's value (in-process workers may be handed refs by remote groups), else the value."""
    try:
        import ray

        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
    except ImportError:
        pass
    return value
