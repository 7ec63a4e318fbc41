"""`vlrlhf plan SPEC [--cluster FILE|NxGgpu:Ccpu|RAY_ADDRESS]`: what a job needs, before it starts.

Prints every group's bundles in creation order (colocated roles inside the policy's
bundles), the GPUs and CPUs held at the peak, whether the bundles fit the cluster's
nodes (placed as Ray would: PACK, SPREAD, STRICT_*), the CPUs left for the data
pipeline (jobs.common.pipeline_budget) and, when the model and data are on this
machine, token lengths after image expansion of the first records against
data.max_length, and the GiB per GPU of every role that holds GPUs (jobs.plan_memory; a
config.json at model.path is enough). A spec that cannot fit is refused (exit code 2).

Clusters: `2x8gpu:64cpu` (nodes x GPUs:CPUs each; `+` joins node kinds), a KubeRay
RayCluster/RayJob manifest (worker groups at maxReplicas, the head's rayStartParams),
a YAML `nodes: [{count, cpus, gpus, resources}]`, or a running cluster (RAY_ADDRESS).
The groups mirror what jobs/offline.py and jobs/online.py create.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import yaml

from actors.group import group_bundle
from jobs.common import PipelineBudgetError, colocation_reserve, pipeline_budget
from jobs.plan_memory import memory_report
from vlrlhf.config import ONLINE_ALGORITHMS, JobSpec

NO_REFERENCE = ("sft", "reward")


@dataclasses.dataclass
class Group:
    role: str
    count: int
    bundle: dict[str, float]
    strategy: str  # a placement group's strategy, or "actors" (a Ray Data actor pool: each actor anywhere)
    note: str = ""


@dataclasses.dataclass
class Plan:
    nodes: list[dict[str, float]]
    groups: list[Group]
    peak: dict[str, float]
    pipeline_cpus: float = 0.0  # free CPUs once the groups are placed
    problems: list[str] = dataclasses.field(default_factory=list)
    tokens: dict | None = None
    memory: list[str] = dataclasses.field(default_factory=list)  # jobs.plan_memory's lines

    @property
    def fits(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------- clusters

def parse_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def nodes_from_manifest(manifest: dict) -> list[dict[str, float]]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])

    def node(group: dict) -> dict[str, float]:
        params = group.get("rayStartParams") or {}
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        out = {"CPU": parse_quantity(params.get("num-cpus", limits.get("cpu", 0))),
               "GPU": parse_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        out.update(json.loads(params["resources"].strip("'\"").replace('\\"', '"')) if "resources" in params else {})
        return out

    nodes = [node(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [node(group) for _ in range(int(group.get("maxReplicas", group.get("replicas", 1))))]
    return nodes


def parse_cluster(text: str | None) -> list[dict[str, float]]:
    """Nodes as resource dicts, from a description (see the module docstring)."""
    if text is None and os.environ.get("RAY_ADDRESS"):
        text = os.environ["RAY_ADDRESS"]
    if text is None:  # this machine, as `vlrlhf run` would start it
        import torch

        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
    if re.fullmatch(r"(\d+x\d+(\.\d+)?gpu:\d+(\.\d+)?cpu\+?)+", text):
        nodes = []
        for part in text.split("+"):
            count, gpus, cpus = re.fullmatch(r"(\d+)x([\d.]+)gpu:([\d.]+)cpu", part).groups()
            nodes += [{"CPU": float(cpus), "GPU": float(gpus)} for _ in range(int(count))]
        return nodes
    path = pathlib.Path(text)
    if path.is_file():
        data = yaml.safe_load(path.read_text())
        if data.get("kind") in ("RayCluster", "RayJob"):
            return nodes_from_manifest(data)
        return [{"CPU": float(n.get("cpus", 0)), "GPU": float(n.get("gpus", 0)), **n.get("resources", {})}
                for n in data["nodes"] for _ in range(int(n.get("count", 1)))]
    if "://" in text or ":" in text:  # a running cluster
        import ray

        ray.init(address=text, logging_level="ERROR")
        return [{k: v for k, v in n["Resources"].items() if not k.startswith(("node:", "memory", "object_store"))}
                for n in ray.nodes() if n["Alive"]]
    raise ValueError(f"--cluster {text!r}: not a file, a running cluster's address or NxGgpu:Ccpu (e.g. 2x8gpu:64cpu)")


# ---------------------------------------------------------------- groups

def offline_groups(spec: JobSpec) -> tuple[list[Group], tuple[str, ...]]:
    mode, reference = spec.reference.mode, spec.resources.reference
    uses_stage = spec.algorithm.name not in NO_REFERENCE and mode in ("separate", "precomputed") \
        and reference.num_workers > 0
    roles = ("policy", "reference") if uses_stage else ("policy",)
    groups = [Group("policy", spec.resources.policy.num_workers,
                    group_bundle(spec.resources.policy, colocation_reserve(spec, roles[1:])),
                    spec.resources.policy.placement)]
    if uses_stage and not reference.colocate:
        note = "released after the precompute pass" if mode == "precomputed" else "reference stage of the pipeline"
        groups.append(Group("reference", reference.num_workers, group_bundle(reference), "actors", note))
    return groups, roles


def online_groups(spec: JobSpec) -> tuple[list[Group], tuple[str, ...]]:
    online, resources = spec.online, spec.resources
    separate_reference = online.kl_coef > 0 and spec.reference.mode != "policy"
    guests = ("rollout", "reward", "critic", "judge") + (("reference",) if separate_reference else ())
    groups = [Group("policy", resources.policy.num_workers,
                    group_bundle(resources.policy, colocation_reserve(spec, guests)), resources.policy.placement)]
    roles = ["rollout"] + (["reference"] if separate_reference else []) + \
        (["reward"] if online.reward_model is not None else []) + \
        (["judge"] if online.judge is not None and online.judge.path is not None else []) + \
        (["critic"] if spec.algorithm.name == "ppo" else [])
    for role in ("reference", "reward", "judge", "critic", "rollout"):  # jobs/online.py's order
        group = getattr(resources, role)
        if role in roles and not group.colocate:
            groups.append(Group(role, group.num_workers, group_bundle(group), group.placement))
    return groups, ("policy", *guests)


# ---------------------------------------------------------------- placement

def fits(free: dict, bundle: dict) -> bool:
    return all(free.get(key, 0.0) + 1e-9 >= value for key, value in bundle.items())


def take(free: dict, bundle: dict) -> None:
    for key, value in bundle.items():
        free[key] = free.get(key, 0.0) - value


def place(nodes: list[dict], group: Group) -> str | None:
    """Place the group's bundles on `nodes` (free resources, updated); a problem, or None."""
    bundles = [group.bundle] * group.count
    total = {key: value * group.count for key, value in group.bundle.items()}
    if group.strategy in ("PACK", "STRICT_PACK"):
        home = next((node for node in nodes if fits(node, total)), None)
        if home is not None:
            take(home, total)
            return None
        if group.strategy == "STRICT_PACK":
            return f"no node holds all {group.count} bundle(s) together (STRICT_PACK)"
    used: set[int] = set()
    for bundle in bundles:
        order = sorted(range(len(nodes)), key=lambda i: (i in used) if group.strategy != "PACK" else (i not in used))
        if group.strategy == "STRICT_SPREAD":
            order = [i for i in order if i not in used]
        index = next((i for i in order if fits(nodes[i], bundle)), None)
        if index is None:
            free = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in bundle}
            return (f"{group.count} x {_show(bundle)} ({group.strategy}) do not fit: no node left with room for "
                    f"one more (most free on a node: {_show(free)}; the group needs {_show(total)})")
        take(nodes[index], bundle)
        used.add(index)
    return None


def _show(resources: dict) -> str:
    return "{" + ", ".join(f"{key} {value:g}" for key, value in resources.items() if value) + "}"


# ---------------------------------------------------------------- the plan

def plan_spec(spec: JobSpec, nodes: list[dict[str, float]]) -> Plan:
    groups, roles = online_groups(spec) if spec.algorithm.name in ONLINE_ALGORITHMS else offline_groups(spec)
    groups = [g for g in groups if g.count > 0]  # num_workers 0: in the driver process
    peak: dict[str, float] = {}
    for group in groups:
        for key, value in group.bundle.items():
            peak[key] = peak.get(key, 0.0) + value * group.count
    free = [dict(node) for node in nodes]
    problems = [f"resources.{group.role}: {problem}" for group in groups if (problem := place(free, group))]
    plan = Plan(nodes, groups, peak, pipeline_cpus=sum(node.get("CPU", 0.0) for node in free), problems=problems)
    try:  # offline data and online prompts both stream through the pipeline
        budget = pipeline_budget(spec, roles, cluster_cpus=sum(node.get("CPU", 0.0) for node in nodes))
        largest = max((node.get("CPU", 0.0) for node in free), default=0.0)
        if not problems and largest + 1e-9 < max(budget.encoder_cpus, budget.reader_cpus):
            problems.append(f"data pipeline: no node has {max(budget.encoder_cpus, budget.reader_cpus):g} CPU left "
                            "for its actors")
    except PipelineBudgetError as error:
        problems.append(f"data pipeline: {error}")
    return plan


def token_lengths(spec: JobSpec, limit: int) -> dict | None:
    """Tokens after image expansion of the first `limit` records, text and image tokens apart,
    and what each `data.image_overflow` would do with the records over the limit (None: model
    or data not here). Records are read and encoded by Ray Data tasks, not in this process."""
    import ray

    from jobs.common import TASK_OF
    from jobs.data_check import quiet_ray_data, record_tokens, token_report
    from vlrlhf.data.ledger import start_ledger
    from vlrlhf.data.pipeline import BadRows, EncodeSettings, RecordSource, record_dataset
    from vlrlhf.data.sources import expand_sources

    local = [spec.model.path, *spec.data.train]
    if any("://" in path or not pathlib.Path(path).exists() for path in local):
        return None
    online = spec.algorithm.name in ONLINE_ALGORITHMS
    limit_tokens = spec.data.max_length
    if online:  # vLLM holds the prompt and the completion
        limit_tokens = min(limit_tokens, spec.online.max_model_len - spec.online.max_tokens)
    if not ray.is_initialized():  # RAY_ADDRESS joins a cluster; otherwise a local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()  # the plan is the output
    settings = EncodeSettings(model_path=spec.model.path, task="prompt" if online else TASK_OF[spec.algorithm.name],
                              adapter=spec.model.adapter, image_root=spec.data.image_root,
                              max_pixels=spec.data.max_pixels, processor=tuple(sorted(spec.model.processor.items())),
                              trust_remote_code=spec.model.trust_remote_code)
    sink = BadRows("skip", start_ledger("skip", None))  # unreadable rows: `vlrlhf data check` says why
    source = RecordSource(tuple(expand_sources(spec.data.train)), spec.data.format, dict(spec.data.format_options),
                          sink=sink)
    rows = record_dataset(source).limit(limit).map_batches(
        record_tokens, fn_kwargs={"settings": settings, "limit": limit_tokens}, batch_size=16,
        batch_format="numpy").take_all()
    return token_report(rows, limit_tokens)


def report(spec: JobSpec, plan: Plan) -> str:
    kinds: dict[str, int] = {}
    for node in plan.nodes:
        kinds[_show(node)] = kinds.get(_show(node), 0) + 1
    lines = [f"plan of {spec.name} ({spec.algorithm.name}) on {len(plan.nodes)} node(s): "
             + ", ".join(f"{count} x {kind}" for kind, count in kinds.items()),
             "groups, in creation order:"]
    for group in plan.groups:
        how = "Ray Data actors" if group.strategy == "actors" else f"placement group {group.strategy}"
        lines.append(f"  {group.role:<10} {group.count} x {_show(group.bundle):<28} {how}"
                     + (f" ({group.note})" if group.note else ""))
    capacity = {key: sum(node.get(key, 0.0) for node in plan.nodes) for key in ("GPU", "CPU")}
    lines.append(f"peak: GPU {plan.peak.get('GPU', 0):g} of {capacity['GPU']:g}, "
                 f"CPU {plan.peak.get('CPU', 0):g} of {capacity['CPU']:g}")
    if spec.algorithm.name not in ONLINE_ALGORITHMS:
        lines.append(f"data pipeline: {plan.pipeline_cpus:g} CPU left by the groups, data.pipeline_cpus="
                     f"{spec.data.pipeline_cpus:g}")
    tokens = plan.tokens
    if tokens is None:
        lines.append("tokens: model or data not on this machine; not checked")
    else:
        image, text, fate = tokens["image_tokens"], tokens["text_tokens"], tokens["overflow"]
        lines.append(f"tokens after image expansion, first {tokens['records']} records: median {tokens['median']}, "
                     f"max {tokens['max']}; {tokens['too_long']} over the limit of {tokens['limit']}, "
                     f"{tokens['failed']} not encodable")
        lines.append(f"  image tokens p50 {image['p50']} p90 {image['p90']} max {image['max']}; "
                     f"text tokens p50 {text['p50']} p90 {text['p90']} max {text['max']}")
        if tokens["too_long"]:
            lines.append(f"  over the limit, data.image_overflow ({spec.data.image_overflow}): resize would resize "
                         f"{fate['resize']['resized']} and skip {fate['resize']['skipped']}; skip would skip "
                         f"{fate['skip']['skipped']}; raise would stop the job")
    lines += plan.memory
    lines += [f"DOES NOT FIT: {problem}" for problem in plan.problems] or ["fits"]
    return "\n".join(lines)


def run_plan(spec_path: str, overrides: list[str], cluster: str | None, records: int) -> int:
    from vlrlhf.config import load_spec

    spec = load_spec(spec_path, overrides)
    plan = plan_spec(spec, parse_cluster(cluster))
    plan.tokens = token_lengths(spec, records) if records else None
    plan.memory, problems = memory_report(spec, plan.tokens)
    plan.problems += problems
    print(report(spec, plan))
    return 0 if plan.fits else 2
