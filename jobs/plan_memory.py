"""The memory part of `vlrlhf plan`: GiB per GPU for every role that holds GPUs.

Needs the model's config.json only (model.path may be a folder holding just that file).
Roles colocated on the policy share its GPU and add up there; a total above
resources.gpu_memory_gb (80 when unset) is a problem that stops the job before anything
is placed. The estimates are vlrlhf.memory's.
"""

from __future__ import annotations

import dataclasses
import pathlib

from vlrlhf.config import ONLINE_ALGORITHMS, JobSpec
from vlrlhf.memory import BYTES, GIB, activation_bytes, kv_cache_tokens, model_shape, training_states

FIXES = ("model.lora, trainer.strategy=deepspeed with trainer.zero_stage=3, a smaller trainer.micro_batch_size, "
         "model.gradient_checkpointing=true, or more GPUs")


@dataclasses.dataclass
class RoleMemory:
    role: str
    gpus: float
    parts: dict[str, float]  # GiB by kind
    colocated: bool = False

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def shape_of(path: str, trust_remote_code: bool = False):
    folder = pathlib.Path(path)
    return model_shape(path, trust_remote_code) if (folder / "config.json").is_file() else None


def row_tokens(spec: JobSpec, measured: dict | None) -> int:
    """Tokens of one training row: the longest measured, else data.max_length; a packed
    preference pair holds the prompt and both answers (at most twice that)."""
    longest = measured["max"] if measured and measured.get("max") else spec.data.max_length
    if spec.algorithm.name in ONLINE_ALGORITHMS:
        return min(longest + spec.online.max_tokens, spec.online.max_model_len, spec.data.max_length)
    return longest * (2 if spec.algorithm.name in ("dpo", "reward") else 1)


def role_memory(spec: JobSpec, measured: dict | None = None) -> tuple[list[RoleMemory], str | None]:
    """GiB per GPU for each role with GPUs; (roles, why not) when config.json is not readable."""
    if not any(getattr(spec.resources, role).gpus > 0 for role in ("policy", "reference", "rollout", "reward", "judge",
                                                                   "critic")):
        return [], None
    shape = shape_of(spec.model.path, spec.model.trust_remote_code)
    if shape is None:
        return [], f"no config.json at model.path={spec.model.path}"
    model, trainer, resources = spec.model, spec.trainer, spec.resources
    width = BYTES[model.dtype]
    tokens = trainer.micro_batch_size * row_tokens(spec, measured)
    rank = model.lora.r if model.lora else None
    roles = []
    if resources.policy.gpus > 0:
        states = training_states(shape, model.dtype, rank, model.freeze_vision, trainer.strategy, trainer.zero_stage,
                                 max(resources.policy.num_workers, 1))
        roles.append(RoleMemory("policy", resources.policy.gpus, {
            "weights, gradients, optimizer": states / GIB,
            "activations": activation_bytes(shape, tokens, model.dtype, model.gradient_checkpointing) / GIB}))
    online = spec.online
    others = []
    if online is not None:
        if online.engine == "vllm" and resources.rollout.gpus > 0:
            share = online.gpu_memory_utilization * gpu_memory_gb(spec)
            others.append(("rollout", {"vLLM (weights and KV cache)": share}))
        elif resources.rollout.gpus > 0:
            others.append(("rollout", {"weights": width * shape.total / GIB}))
        if online.kl_coef > 0 and spec.reference.mode != "policy" and resources.reference.gpus > 0:
            others.append(("reference", {"weights": width * shape.total / GIB}))
        if online.reward_model is not None and resources.reward.gpus > 0:
            reward = shape_of(online.reward_model.path) or shape
            others.append(("reward", {"weights": width * reward.total / GIB}))
        judge = online.judge
        if judge is not None and judge.path is not None and resources.judge.gpus > 0:
            if judge.engine == "vllm":
                others.append(("judge", {"vLLM (weights and KV cache)": judge.gpu_memory_utilization *
                                         gpu_memory_gb(spec)}))
            else:
                others.append(("judge", {"weights": width * (shape_of(judge.path) or shape).total / GIB}))
        if spec.algorithm.name == "ppo" and resources.critic.gpus > 0:
            critic = online.critic
            states = training_states(shape, model.dtype, critic.lora.r if critic.lora else None, model.freeze_vision)
            others.append(("critic", {"weights, gradients, optimizer": states / GIB,
                                      "activations": activation_bytes(shape, tokens, model.dtype,
                                                                      model.gradient_checkpointing) / GIB}))
    elif spec.algorithm.name not in ("sft", "reward") and spec.reference.mode in ("separate", "precomputed") \
            and resources.reference.gpus > 0:
        others.append(("reference", {"weights": width * shape.total / GIB}))
    for role, parts in others:
        group = getattr(resources, role)
        roles.append(RoleMemory(role, group.gpus, parts, colocated=bool(group.colocate)))
    return roles, None


def gpu_memory_gb(spec: JobSpec) -> float:
    return spec.resources.gpu_memory_gb or 80.0


def memory_report(spec: JobSpec, measured: dict | None = None) -> tuple[list[str], list[str]]:
    """(lines, problems) of the memory plan."""
    roles, missing = role_memory(spec, measured)
    if missing:
        return [f"memory: {missing}; not planned"], []
    if not roles:
        return ["memory: no role holds a GPU; not planned"], []
    budget = gpu_memory_gb(spec)
    lines = [f"memory per GPU (GiB; of {budget:g}, resources.gpu_memory_gb), rows of "
             f"{row_tokens(spec, measured)} tokens:"]
    for role in roles:
        where = " (on the policy's GPU)" if role.colocated else ""
        parts = ", ".join(f"{name} {value:.1f}" for name, value in role.parts.items())
        lines.append(f"  {role.role:<10} {role.total:6.1f}{where}: {parts}")
    problems = []
    policy = next((r for r in roles if r.role == "policy"), None)
    shared = sum(r.total for r in roles if r.colocated) + (policy.total if policy else 0.0)
    if policy and shared > budget:
        guests = " with " + ", ".join(r.role for r in roles if r.colocated) if any(r.colocated for r in roles) else ""
        problems.append(f"resources.policy: {shared:.1f} GiB per GPU{guests} exceeds {budget:g} GiB; fixes: {FIXES}")
    problems += [f"resources.{r.role}: {r.total:.1f} GiB per GPU exceeds {budget:g} GiB"
                 for r in roles if not r.colocated and r.role != "policy" and r.total > budget * max(r.gpus, 1)]
    shape = shape_of(spec.model.path, spec.model.trust_remote_code)
    rollout = next((r for r in roles if r.role == "rollout" and spec.online.engine == "vllm"), None)
    if rollout is not None and shape is not None:
        kv = kv_cache_tokens(shape, spec.model.dtype, budget * GIB, spec.online.gpu_memory_utilization)
        if kv == 0:
            weights = BYTES[spec.model.dtype] * shape.total / GIB
            problems.append(f"online.gpu_memory_utilization={spec.online.gpu_memory_utilization:g}: the engine's "
                            f"{rollout.total:.1f} GiB do not hold its weights ({weights:.1f} GiB) and a KV cache")
        else:
            lines.append(f"  vLLM KV cache: ~{kv} tokens, {kv // spec.online.max_model_len} sequences of "
                         f"online.max_model_len={spec.online.max_model_len} at once")
    return lines, problems
