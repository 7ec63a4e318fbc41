"""What every offline driver shares: data set-up, sharding, checkpoints, tracking, plots."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

from vlrlhf.config import JobSpec
from vlrlhf.data.order import Window, plan_windows
from vlrlhf.data.pipeline import (READ_CPUS, BadRows, EncodeSettings, PipelineResources, RecordSource, collate_items,
                                  count_records, record_dataset)

TASK_OF = {"sft": "sft", "dpo": "preference", "kto": "kto", "reward": "preference", "grpo": "prompt",
           "rloo": "prompt", "reinforce_pp": "prompt", "ppo": "prompt"}


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class JobData:
    """The job's data as sources, per-unit record counts and encode settings (the driver holds
    numbers, never records); `stream` and `held_out` make the Ray Data datasets."""

    train: RecordSource
    train_counts: list[int]  # records of each read unit of the train split
    held_out_source: RecordSource | None
    held_out_counts: list[int]
    settings: EncodeSettings
    sink: BadRows  # where tasks send bad rows (the ledger actor, under the spec's policy)
    seed: int = 0
    shuffle_window: int = 1024
    resources: PipelineResources = PipelineResources()

    @property
    def num_train(self) -> int:
        return sum(self.train_counts)

    @property
    def num_held_out(self) -> int:
        return sum(self.held_out_counts)

    def stream(self, epochs: range, after_key: int | None = None, held_out: bool = True):
        """The job's records as one dataset: the held-out records first (file order, exactly
        one row each, `num_held_out` rows), then the train records of `epochs` in the seeded
        order, after `after_key` (resume)."""
        windows = self.held_out_windows() if held_out else []
        windows += plan_windows(self.train_counts, self.seed, epochs, self.shuffle_window, after_key)
        return record_dataset((self.train, self.held_out_source or self.train), windows, self.resources)

    def held_out_windows(self) -> list:
        return [Window(0, index, (index,), count, source=1, exact=True)
                for index, count in enumerate(self.held_out_counts) if count]

    def held_out(self):
        """The held-out records alone, in file order (exactly one row each), or None."""
        if not self.num_held_out:
            return None
        return record_dataset((self.train, self.held_out_source), self.held_out_windows(), self.resources)

    def summary(self) -> str:
        import ray

        return ray.get(self.sink.ledger.summary.remote())

    def close(self) -> None:
        """End the job's ledger actor (the quarantine file stays)."""
        import ray

        if self.sink.ledger is not None:
            ray.kill(self.sink.ledger)
            self.sink = dataclasses.replace(self.sink, ledger=None)


def prepare_data(spec: JobSpec, run_dir: pathlib.Path, resources: PipelineResources | None = None,
                 held_out: bool = True) -> JobData:
    """Sources expanded (listings only), records read, converted and counted per unit in Ray Data
    tasks: the first bad row stops here under `on_bad_record: raise`."""
    from vlrlhf.data.ledger import start_ledger
    from vlrlhf.data.sources import expand_sources

    data, seed = spec.data, spec.trainer.seed
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = BadRows(data.on_bad_record, start_ledger(data.on_bad_record, run_dir / "quarantine.jsonl"))
    units = tuple(expand_sources(data.train))
    common = dict(data_format=data.format, options=dict(data.format_options), seed=seed, sink=sink)
    if not held_out:  # online prompts: every record trains
        train, held_out = RecordSource(units, **common), None
    elif data.eval:
        train = RecordSource(units, **common)
        held_out = RecordSource(tuple(expand_sources(data.eval)), **common)
    else:
        train = RecordSource(units, split="train", eval_fraction=data.eval_fraction, **common)
        held_out = RecordSource(units, split="eval", eval_fraction=data.eval_fraction, **common) \
            if data.eval_fraction else None
    settings = EncodeSettings(model_path=spec.model.path, task=TASK_OF[spec.algorithm.name],
                              adapter=spec.model.adapter, max_length=data.max_length, image_root=data.image_root,
                              image_overflow=data.image_overflow,
                              max_pixels=data.max_pixels, ddpo_gamma=spec.algorithm.ddpo_gamma,
                              corrupt_keep=spec.algorithm.mdpo.keep if spec.algorithm.mdpo else None,
                              processor=tuple(sorted(spec.model.processor.items())),
                              trust_remote_code=spec.model.trust_remote_code)
    train_counts = raising_bad_records(count_records, train)
    held_out_counts = raising_bad_records(count_records, held_out) if held_out is not None else []
    return JobData(train, train_counts, held_out, held_out_counts, settings, sink, seed, data.shuffle_window,
                   resources or PipelineResources())


ORDER = "windows-1"  # the data order a checkpoint's after_key belongs to (vlrlhf.data.order)


def check_order(state: dict, spec: JobSpec, checkpoint) -> None:
    """A checkpoint resumes exactly only in the order it was trained in."""
    if state.get("order") != ORDER:
        raise ValueError(f"checkpoint.resume: {checkpoint} was written by an earlier version of vlrlhf, whose data "
                         "order this one does not reproduce, so the run cannot resume exactly. Start a new run from "
                         f"its weights instead: model.path={checkpoint} checkpoint.resume=off")
    if (state.get("shuffle_window"), state.get("seed")) != (spec.data.shuffle_window, spec.trainer.seed):
        raise ValueError(f"checkpoint.resume: {checkpoint} was trained with trainer.seed={state.get('seed')} and "
                         f"data.shuffle_window={state.get('shuffle_window')}; resuming needs the same values (they "
                         "decide the order of the data)")


def raising_bad_records(call, *args):
    """Run a Ray Data consumption; a bad row raised in a task surfaces as BadRecordError (file,
    row and reason), not as Ray's wrapped task error."""
    with surfacing_bad_records():
        return call(*args)


class surfacing_bad_records:  # noqa: N801 - a context manager, used like a function
    """`with surfacing_bad_records(): ...` re-raises a BadRecordError found in the cause chain
    of any error (Ray wraps task errors) as a plain BadRecordError naming file, row and reason."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from vlrlhf.data.reader import BadRecordError

        cause = error
        while cause is not None and not isinstance(cause, BadRecordError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if cause is not None and cause is not error:
            raise BadRecordError(cause.where, cause.reason, cause.message) from None
        return False


def split_shares(items: list, world_size: int, micro_batch_size: int) -> list[list[list]]:
    """A global batch -> per worker, its micro-batches of items (contiguous slices)."""
    per_worker = len(items) // world_size
    shares = [items[w * per_worker:(w + 1) * per_worker] for w in range(world_size)]
    return [[share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)] for share in shares]


def shard(items: list, world_size: int, micro_batch_size: int, adapter) -> list[list]:
    """A global batch -> per worker, a list of collated micro-batches (contiguous slices)."""
    return [[collate_items(adapter, micro) for micro in share]
            for share in split_shares(items, world_size, micro_batch_size)]


def normaliser_for(spec: JobSpec, items: list) -> float:
    """The global denominator of the loss (see vlrlhf.training)."""
    if spec.algorithm.name == "sft" and spec.algorithm.sft_aggregation == "token-mean":
        return float(sum(item.encoded.num_label_tokens for item in items))
    return float(len(items))


# ---------------------------------------------------------------- tracking

class Tracker:
    """Metrics to a JSONL file always, and to TensorBoard or W&B when the spec asks."""

    def __init__(self, spec: JobSpec, run_dir: pathlib.Path):
        self.path = run_dir / "metrics.jsonl"
        self.kind = spec.tracking.kind
        self.writer = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif self.kind == "wandb":
            import wandb

            self.writer = wandb.init(project=spec.tracking.project, name=spec.name, dir=str(run_dir),
                                     mode="offline" if spec.tracking.offline else "online",
                                     config=spec.model_dump())
        self.metrics = None
        try:
            from ray.util import metrics as ray_metrics

            self.metrics = {"step_time": ray_metrics.Gauge("vlrlhf_step_time_s", "seconds per optimizer step"),
                            "throughput": ray_metrics.Gauge("vlrlhf_samples_per_s", "training examples per second")}
        except Exception:  # no Ray worker context (in-process runs)
            self.metrics = None

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        elif self.kind == "wandb":
            self.writer.log(values, step=step)
        if self.metrics is not None:
            if "train/step_time" in values:
                self.metrics["step_time"].set(values["train/step_time"])
            if "train/samples_per_s" in values:
                self.metrics["throughput"].set(values["train/samples_per_s"])

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()


def plot_curves(metrics_path: pathlib.Path, out: pathlib.Path) -> pathlib.Path | None:
    """A PNG of every logged curve (train and eval), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    keys = sorted({k for row in rows for k in row if "/" in k and not k.endswith("/examples")
                   and isinstance(row[k], (int, float))})
    if not keys:
        return None
    columns = min(3, len(keys))
    lines = (len(keys) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=False):
        points = [(row["step"], row[key]) for row in rows if key in row]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


# ---------------------------------------------------------------- placement

class PipelineBudgetError(RuntimeError):
    """The actor groups leave the data pipeline no CPU: the job would hang, so it does not start."""


# data.pipeline_memory_mb's defaults. Ray Data bounds the blocks queued ahead in bytes, and the
# driver keeps each queued block's metadata (~10 KB): online prompt blocks hold a few KB of
# records, so 256 MiB of them is tens of thousands of blocks, and a 1,000-step GRPO soak
# (benchmarks/soak.py) saw the driver grow 11.5 MB per 100 steps; at 16 MiB it stayed flat.
ROWS_MEMORY_MB, PROMPT_MEMORY_MB = 256, 16


def pipeline_budget(spec: JobSpec, roles: tuple[str, ...], cluster_cpus: float | None = None) -> PipelineResources:
    """CPUs for the Ray Data stages, budgeted against the groups' reservations.

    Ray Data's actors and tasks run outside placement groups: when the groups in `roles`
    reserve every CPU, they are accepted but never scheduled and the job hangs without a
    word. So before anything starts: free = cluster CPUs - sum(num_workers * cpus) over the
    roles must hold what the pipeline needs, else the job stops here naming the numbers and
    the fix. Offline data needs one whole CPU: the pipeline's actor pools share
    min(data.pipeline_cpus, free), a window reader per four CPUs (READ_CPUS each), the rest
    split between encoders of at most one CPU each. Online prompts need a reader only (the
    rollout engines encode them). Roles in-process (num_workers 0) reserve nothing."""
    from vlrlhf.config import ONLINE_ALGORITHMS

    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    reserved = {role: getattr(spec.resources, role).num_workers * getattr(spec.resources, role).cpus
                for role in roles if getattr(spec.resources, role).num_workers}
    free = cluster_cpus - sum(reserved.values())
    online = spec.algorithm.name in ONLINE_ALGORITHMS
    needed = READ_CPUS if online else 1.0
    if free + 1e-9 < needed:
        held = ", ".join(f"{role} {getattr(spec.resources, role).num_workers} x "
                         f"{getattr(spec.resources, role).cpus:g}" for role in reserved)
        what = "its prompt reader" if online else "its readers and encoders"
        raise PipelineBudgetError(
            f"the actor groups reserve {sum(reserved.values()):g} of the cluster's {cluster_cpus:g} CPUs ({held}), "
            f"leaving {max(free, 0):g} for the data pipeline, which needs {needed:g} (Ray Data runs {what} "
            "outside placement groups, so the job would wait forever). Lower resources.<role>.cpus "
            "(fractions work, e.g. 0.5) or add CPUs to the cluster")
    memory = spec.data.pipeline_memory_mb or (PROMPT_MEMORY_MB if online else ROWS_MEMORY_MB)
    if online:
        return PipelineResources(encoders=0, encoder_cpus=0.0, readers=1, reader_cpus=READ_CPUS, memory_mb=memory)
    return dataclasses.replace(pipeline_resources(min(float(spec.data.pipeline_cpus), free)), memory_mb=memory)


def pipeline_resources(cpus: float) -> PipelineResources:
    """`cpus` (>= 1) split between window readers and encoders."""
    readers = max(1, int(cpus + 1e-9) // 4)
    room = cpus - READ_CPUS * readers
    encoders = max(1, math.ceil(room - 1e-9))
    return PipelineResources(encoders=encoders, encoder_cpus=min(1.0, room / encoders), readers=readers)


def colocation_reserve(spec: JobSpec, roles: tuple[str, ...]) -> dict[str, float]:
    """Per-bundle resources the policy's placement group must add for the roles in `roles`
    that colocate with it (their workers join the policy's bundles)."""
    reserve = {"CPU": 0.0, "GPU": 0.0}
    for role in roles:
        group = getattr(spec.resources, role)
        if group.colocate == "policy":
            reserve["CPU"] += group.cpus
            reserve["GPU"] += group.gpus
    return reserve
