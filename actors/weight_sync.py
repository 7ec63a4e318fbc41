"""Weight sync from the policy to the rollout engines, both sides and the driver's part.

Send side (policy ranks): `merged_state` is what an engine must refresh, under the plain
model's names (LoRA merged, ZeRO-3 gathered); `state_manifest` / `send_staged` broadcast it.
Receive side (rollout workers): `receive_broadcast`. Driver: `sync_weights(policy, rollout)`
over the object store (one put, every engine reads it) or a gloo/NCCL broadcast group of
policy rank 0 and the engines (`weight_group`, apart from the policy's data-parallel group).

Imports no role: the policy and rollout modules import this one.
"""

from __future__ import annotations

import time

import torch

WEIGHT_SYNC_TIMEOUT_S = 1800  # a broadcast waits for an engine still busy with an asynchronous rollout


@torch.no_grad()
def merged_state(model, rank: int, deepspeed=None, dtype: torch.dtype | None = None, to_cpu: bool = True) -> dict:
    """The tensors a rollout engine must refresh, under the plain model's parameter names
    (rank 0; the other ranks return {} and merge nothing): trainable parameters (full
    fine-tuning), or with LoRA the merged weights of the adapted layers (W + scale * B A,
    computed beside W, which stays untouched) plus any other trainable parameter. `dtype`:
    the engines' (model.dtype): fp32 master weights and fp32 LoRA deltas travel at the
    engines' width, not twice it. `to_cpu=False` keeps them on the device (a broadcast sends
    them from there). ZeRO-3 gathers each tensor first: every rank must call this."""
    from actors.deepspeed_engine import gathered

    modules = dict(model.named_modules())
    out = {}
    for name, parameter in model.named_parameters():
        adapted = ".base_layer." in name
        if "lora_" in name or not (parameter.requires_grad or adapted):
            continue
        layer = modules[name.split(".base_layer.")[0]] if adapted else None
        with gathered(list(layer.parameters()) if adapted else [parameter], deepspeed):
            if rank != 0:
                continue
            tensor = parameter.detach()
            if adapted and name.endswith(".base_layer.weight"):
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            tensor = tensor.to(dtype or parameter.dtype)
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out[plain] = tensor.cpu().clone() if to_cpu else tensor.clone()
    return out


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def state_manifest(state: dict) -> list:
    """[(name, shape, dtype)] of a staged state: what the engines need to receive the broadcast."""
    return [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()]


def send_staged(group, state: dict, device: torch.device) -> int:
    """Broadcast every staged tensor from rank 0 of the weight group; returns how many."""
    for tensor in state.values():
        group.broadcast(tensor.to(device).contiguous(), 0).wait()
    return len(state)


def receive_broadcast(group, manifest: list) -> dict:
    """The tensors of a manifest, received in its order from rank 0 of the weight group."""
    on = "cuda" if torch.cuda.is_available() else "cpu"
    received = {}
    for name, shape, dtype in manifest:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=on)
        group.broadcast(tensor, 0).wait()
        received[name] = tensor
    return received


def weight_group(host: str, port: int, rank: int, world_size: int):
    """A process group of the policy's rank 0 (rank 0 here) and the rollout workers, apart
    from the policy's own data-parallel group: gloo on CPU, NCCL on GPU."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=WEIGHT_SYNC_TIMEOUT_S)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if torch.cuda.is_available():
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def sync_weights(policy, rollout, method: str = "object_store") -> dict:
    """Policy rank 0's changed tensors -> every rollout worker. object_store: one put,
    every engine reads the same object; collective: a gloo/NCCL broadcast from policy rank 0
    (both groups on Ray workers; the path across nodes). Returns counts and the time taken."""
    started = time.perf_counter()
    if method == "collective" and policy.local is None and rollout.local is None:
        if getattr(rollout, "weight_address", None) is None:
            rollout.weight_address = policy.get([policy.call(0, "address")])[0]
        host, port = rollout.weight_address
        world = 1 + rollout.world_size
        manifest = policy.get(policy.broadcast("stage_weights"))[0]  # every rank: ZeRO-3 gathers
        sent = policy.call(0, "send_weights", host, port, world)
        received = [actor.receive_weights.remote(host, port, 1 + index, world, manifest)
                    for index, actor in enumerate(rollout.actors)]
        results = rollout.get(received)
        policy.get([sent])
    else:
        state = policy.broadcast("sync_state")[0]  # an ObjectRef (a value in-process)
        results = rollout.get(rollout.broadcast("load_weights", state))
    return {"tensors": results[0]["tensors"], "bytes": results[0]["bytes"],
            "load_s": max(r["seconds"] for r in results), "sync_s": time.perf_counter() - started}
