"""What every offline driver shares: data set-up, sharding, checkpoints, tracking, plots."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from vlrlhf.config import JobSpec
from vlrlhf.data.pipeline import BadRows, EncodeSettings, PipelineResources, RecordSource, collate_items, record_dataset

TASK_OF = {"sft": "sft", "dpo": "preference", "kto": "kto", "reward": "preference"}


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class JobData:
    """The job's data as Ray Data datasets of converted records (nothing held in the driver)."""

    train: object  # ray.data.Dataset of (id, record) rows
    held_out: object | None
    num_train: int
    num_held_out: int
    settings: EncodeSettings
    sink: BadRows  # where tasks send bad rows (the ledger actor, under the spec's policy)
    resources: PipelineResources = PipelineResources()

    def summary(self) -> str:
        import ray

        return ray.get(self.sink.ledger.summary.remote())


def prepare_data(spec: JobSpec, run_dir: pathlib.Path) -> JobData:
    """Sources expanded (listings only), records read and converted in Ray Data tasks and
    counted: the first bad row stops here under `on_bad_record: raise`."""
    from vlrlhf.data.ledger import start_ledger
    from vlrlhf.data.sources import expand_sources

    data, seed = spec.data, spec.trainer.seed
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = BadRows(data.on_bad_record, start_ledger(data.on_bad_record, run_dir / "quarantine.jsonl"))
    units = tuple(expand_sources(data.train))
    common = dict(data_format=data.format, options=dict(data.format_options), seed=seed, sink=sink)
    if data.eval:
        train = RecordSource(units, **common)
        held_out = RecordSource(tuple(expand_sources(data.eval)), **common)
    else:
        train = RecordSource(units, split="train", eval_fraction=data.eval_fraction, **common)
        held_out = RecordSource(units, split="eval", eval_fraction=data.eval_fraction, **common) \
            if data.eval_fraction else None
    settings = EncodeSettings(model_path=spec.model.path, task=TASK_OF[spec.algorithm.name],
                              adapter=spec.model.adapter, max_length=data.max_length, image_root=data.image_root,
                              max_pixels=data.max_pixels, ddpo_gamma=spec.algorithm.ddpo_gamma,
                              corrupt_keep=spec.algorithm.mdpo.keep if spec.algorithm.mdpo else None,
                              processor=tuple(sorted(spec.model.processor.items())))
    train_records = record_dataset(train)
    held_out_records = record_dataset(held_out) if held_out is not None else None
    num_train = raising_bad_records(train_records.count)
    num_held_out = raising_bad_records(held_out_records.count) if held_out_records is not None else 0
    return JobData(train_records, held_out_records if num_held_out else None, num_train, num_held_out, settings,
                   sink)


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


def pipeline_budget(spec: JobSpec, roles: tuple[str, ...], cluster_cpus: float | None = None) -> PipelineResources:
    """CPUs for the Ray Data stages, budgeted against the groups' reservations.

    Ray Data tasks run outside placement groups: when the groups in `roles` reserve every
    CPU, data tasks are accepted but never scheduled and the job hangs without a word.
    So before anything starts: free = cluster CPUs - sum(num_workers * cpus) over the
    roles must hold one whole CPU (Ray Data's sort and read tasks take one each), else the
    job stops here naming the numbers and the fix. The encode stage then runs at most
    min(data.pipeline_cpus, free) tasks at once. Roles in-process (num_workers 0) reserve nothing."""
    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    reserved = {role: getattr(spec.resources, role).num_workers * getattr(spec.resources, role).cpus
                for role in roles if getattr(spec.resources, role).num_workers}
    free = cluster_cpus - sum(reserved.values())
    if free + 1e-9 < 1.0:
        held = ", ".join(f"{role} {getattr(spec.resources, role).num_workers} x "
                         f"{getattr(spec.resources, role).cpus:g}" for role in reserved)
        raise PipelineBudgetError(
            f"the actor groups reserve {sum(reserved.values()):g} of the cluster's {cluster_cpus:g} CPUs ({held}), "
            f"leaving {max(free, 0):g} for the data pipeline, which needs 1 (Ray Data tasks take a whole CPU "
            "and run outside placement groups, so the job would wait forever). Lower resources.<role>.cpus "
            "(fractions work, e.g. 0.5) or add CPUs to the cluster")
    return PipelineResources(task_cpus=1.0, concurrency=max(1, int(min(spec.data.pipeline_cpus, free) + 1e-9)))


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
