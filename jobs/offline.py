"""Offline training driver: SFT, the DPO family, KTO and reward models.

    records (count pass: per-unit counts)  -> windows of epochs e..E (vlrlhf.data.order)
      -> window readers (actors: read, convert, shuffle inside the window)
      -> encoders (actors, the processor loaded once: images, the adapter)
      -> [reference stage: an actor pool adds reference log-prob columns, ahead of the policy]
      -> step slices: worker w of W gets rows [w B/W, (w+1) B/W) of the step as block refs
      -> policy.train_step (each worker fetches and collates its share; metrics back)
      -> log / eval / checkpoint

The driver coordinates: it sees the spec, per-unit record counts, block refs with row
counts, metrics and checkpoint paths, never a record or a tensor. One Ray Data execution
streams every remaining epoch, so the pipeline's actors stay warm across epoch ends and
a step may take the last rows of one epoch and the first of the next. `time/data_wait_s`
is how long each step waited for its rows (the driver for the pipeline, then the workers
to fetch and collate them). SFT and reward models (Bradley-Terry on preference pairs)
have no reference; DPO and KTO take it from a reference stage
(`resources.reference.num_workers >= 1`), a reference model inside each policy worker
(`num_workers: 0`), the policy with its LoRA adapters disabled (`reference.mode: policy`),
a precomputed Parquet table (`precomputed`, DPO: jobs.precompute), or not at all.
"""

from __future__ import annotations

import math
import pathlib
import time

from tqdm import tqdm

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from jobs.benchmarks import due, run_benchmarks, step_output
from jobs.checkpoints import open_checkpoints, resume_from
from jobs.recovery import report_restart
from jobs.common import (ORDER, Tracker, check_order, colocation_reserve, pipeline_budget, plot_curves, prepare_data,
                         surfacing_bad_records)
from vlrlhf.config import JobSpec
from vlrlhf.data.order import split_key
from vlrlhf.data.pipeline import NO_RESTARTS, encoded_dataset, quiet_remote_args
from vlrlhf.data.shares import Share, split_slices, step_slices
from vlrlhf.data.stream import Stream, rows_in
from vlrlhf.training import finish_metrics

NO_REFERENCE = ("sft", "reward")  # reward: Bradley-Terry on the reward model's own scores


class OfflineJob:
    def __init__(self, spec: JobSpec, run_dir: pathlib.Path):
        self.spec, self.run_dir = spec, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = spec.trainer
        self.reference_mode = self._reference_mode()
        roles = ("policy", "reference") if self.reference_mode in ("column", "precomputed") else ("policy",)
        resources = pipeline_budget(spec, roles)  # before anything starts: a spec that would hang stops here
        self.data = prepare_data(spec, run_dir, resources)
        self.policy, self.stream, self.precomputed, self.held_out = None, None, None, []
        self.step, self.epoch, self.after_key = 0, 0, None
        self.checkpoints = open_checkpoints(spec.checkpoint.dir, spec.checkpoint.keep_last, run_dir / "staging")
        try:
            if self.data.num_train < trainer.batch_size:
                raise ValueError(f"data.train has {self.data.num_train} records, fewer than one batch "
                                 f"(trainer.batch_size={trainer.batch_size})")
            self.total_steps = min(trainer.max_steps or math.inf, trainer.epochs * self.data.num_train //
                                   trainer.batch_size)
            # The policy's bundles first, then the pipeline's actors on the room left, loading while the
            # policy's workers do; after them when the precomputed table or a checkpoint's resume point comes first.
            self.policy = ActorGroup(PolicyWorker, spec.resources.policy, name="policy",
                                     args=(spec.model, spec.algorithm, spec.trainer, self.total_steps),
                                     reserve=colocation_reserve(spec, ("reference",) if roles[1:] else ()),
                                     connect=False)
            if resume_from(spec, self.checkpoints) is None and self.reference_mode != "precomputed":
                self.stream = Stream(self.encoded(self.data.stream(range(0, trainer.epochs))))
            self.policy.connect()
            if self.reference_mode == "precomputed":  # one pass now, a Parquet table reused by every epoch
                from jobs.precompute import precompute_reference

                self.precomputed = precompute_reference(spec, self.data, self.reference_stage)
        except BaseException:
            self.shutdown()
            raise
        self.tracker = Tracker(spec, run_dir)

    def _reference_mode(self) -> str | None:
        """column: a reference stage in the pipeline; local: a reference model in each policy
        worker; policy: LoRA disabled; precomputed; None: no reference."""
        mode, workers = self.spec.reference.mode, self.spec.resources.reference.num_workers
        if self.spec.algorithm.name in NO_REFERENCE or mode == "none":
            return None
        if mode == "separate":
            return "column" if workers else "local"
        return mode

    # ------------------------------------------------------------------ the pipeline
    def reference_stage(self, dataset):
        return reference_stage(self.spec, dataset, self.policy.placement_group if self.policy else None)

    def encoded(self, records):
        dataset = encoded_dataset(records, self.data.settings, sink=self.data.sink, resources=self.data.resources)
        return self.reference_stage(dataset) if self.reference_mode == "column" else dataset

    def share(self, slices) -> Share:
        mode = self.reference_mode
        return Share(slices, self.spec.trainer.micro_batch_size, reference=mode if mode != "precomputed" else None,
                     precomputed=self.precomputed, reference_path=self.spec.reference.path)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        spec = self.spec
        resumed = resume_from(spec, self.checkpoints)
        if resumed is not None:
            state = self.policy.get(self.policy.broadcast("read_checkpoint", str(resumed)))[0]
            check_order(state, spec, resumed)
            self.step, self.epoch, self.after_key = state["step"], state["epoch"], state["after_key"]
            print(f"resumed from {resumed}: step {self.step}, epoch {self.epoch}")
        if self.stream is None:
            self.stream = Stream(self.encoded(self.data.stream(range(self.epoch, spec.trainer.epochs),
                                                               self.after_key)))
        batch_size = spec.trainer.batch_size
        progress = tqdm(total=self.total_steps, initial=self.step, desc=spec.name, unit="step", dynamic_ncols=True)
        last = {}
        with surfacing_bad_records():
            rows = self.stream.rows
            self.held_out = rows.take(self.data.num_held_out)  # the stream's first rows, kept for every eval
            rows.waited()  # a training step's wait starts from here
            upcoming = rows.take(batch_size)
            while rows_in(upcoming) == batch_size and self.step < self.total_steps:
                current, waited = upcoming, rows.waited()
                # the next step's rows when the pipeline already made them: the workers load them meanwhile
                upcoming = rows.take(batch_size, wait=False) if self.step + 1 < self.total_steps else None
                last = self.train_step(self.shares(current), progress, waited, self.shares(upcoming))
                report_restart(self)
                if upcoming is None and self.step < self.total_steps:
                    upcoming = rows.take(batch_size)
        progress.close()
        final_eval = self.evaluate()
        checkpoint = self.save()
        self.tracker.close()
        plot = plot_curves(self.tracker.path, self.run_dir / "curves.png")
        summary = {"steps": self.step, "train": last, "eval": final_eval, "checkpoint": str(checkpoint),
                   # a URI checkpoint comes to this machine only when the benchmarks need it here
                   "local_checkpoint": str(self.checkpoints.local_path(self.step))
                   if spec.evaluation is not None or "://" not in spec.checkpoint.dir else None,
                   "curves": str(plot) if plot else None, "bad_records": self.data.summary()}
        print_summary(summary)
        return summary

    def shares(self, slices) -> list[Share] | list[None]:
        """One Share per worker of a step's rows (None for each when there are no rows)."""
        if not slices:
            return [None] * self.policy.world_size
        return [self.share(piece) for piece in split_slices(slices, self.policy.world_size)]

    def train_step(self, shares: list[Share], progress, waited: float = 0.0, upcoming: list | None = None) -> dict:
        """One optimizer step on the workers' shares; `waited`: seconds the driver waited for them;
        `upcoming`: the next step's shares, which the workers load while this step computes."""
        started = time.perf_counter()
        batch_size = self.spec.trainer.batch_size
        token_mean = self.spec.algorithm.name == "sft" and self.spec.algorithm.sft_aggregation == "token-mean"
        normaliser = None if token_mean else float(batch_size)  # None: the workers sum their label tokens
        world = len(shares)
        results = self.policy.get(self.policy.map("train_step", shares, [None] * world, [normaliser] * world,
                                                  upcoming or [None] * world))
        metrics = finish_metrics([s for r in results for s in r["sums"]])
        self.step += 1
        self.after_key = max(r["last_key"] for r in results)
        self.epoch = split_key(self.after_key)[0]
        elapsed = time.perf_counter() - started
        values = {f"train/{k}": v for k, v in metrics.items() if k != "examples"}
        values.update({"train/grad_norm": results[0]["grad_norm"], "train/lr": results[0]["lr"],
                       "train/step_time": elapsed, "train/samples_per_s": batch_size / elapsed,
                       "train/epoch": self.epoch,
                       "time/data_wait_s": waited + max(r.get("load_s", 0.0) for r in results)})
        progress.update(1)
        progress.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in values.items()
                              if k in ("train/loss", "train/reward_accuracy", "train/samples_per_s",
                                       "time/data_wait_s")})
        if self.step % self.spec.trainer.log_every == 0:
            print(f"step {self.step}/{self.total_steps} " + " ".join(
                f"{k.split('/')[1]}={v:.4g}" for k, v in values.items()), flush=True)
        every = self.spec.trainer.eval_every
        if every and self.step % every == 0 and self.step < self.total_steps:
            values.update(self.evaluate())
        self.tracker.log(self.step, values)
        saved = self.checkpoints.due(self.step, self.spec.checkpoint) and self.step < self.total_steps
        if saved:
            self.save()
        if due(self.spec, self.step, self.total_steps):  # evaluation.every_steps: on this step's checkpoint
            if not saved:
                self.save()
            scores = run_benchmarks(self.spec, str(self.checkpoints.local_path(self.step)),
                                    step_output(self.run_dir, self.step))
            self.tracker.log(self.step, scores)
            values.update(scores)
        return values

    def evaluate(self) -> dict:
        """The objective's metrics on the held-out rows (encoded once, kept in the object store)."""
        if not self.held_out:
            return {}
        world, sums = self.policy.world_size, []
        for slices in step_slices(iter(self.held_out), self.spec.trainer.batch_size, keep_tail=True):
            pieces = split_slices(slices, world)
            if len(pieces) < world:
                continue
            results = self.policy.get(self.policy.map("evaluate", [self.share(p) for p in pieces], [None] * world))
            sums.extend(s for r in results for s in r["sums"])
        metrics = finish_metrics(sums)
        values = {f"eval/{k}": v for k, v in metrics.items()}
        self.tracker.log(self.step, values)
        print(f"eval at step {self.step}: " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in values.items()))
        return values

    def save(self) -> str:
        state = {"epoch": self.epoch, "after_key": self.after_key, "order": ORDER,
                 "shuffle_window": self.spec.data.shuffle_window, "seed": self.spec.trainer.seed,
                 "spec": self.spec.model_dump()}
        path = self.checkpoints.save(self.step, lambda folder: self.policy.get(
            self.policy.broadcast("write_checkpoint", folder, state)))  # from each worker's node
        print(f"checkpoint: {path}")
        return path

    def shutdown(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.policy is not None:
            self.policy.shutdown()
        self.data.close()

def reference_stage(spec: JobSpec, dataset, placement_group=None):
    """`dataset` (encoded rows) with a `reference` column from an actor pool of reference
    models: resources.reference.num_workers actors (one, taking no CPU, for num_workers: 0),
    on the policy's bundles when colocated."""
    import ray

    from actors.reference import ReferenceStage

    group, options = spec.resources.reference, {}
    if group.colocate and placement_group is not None:  # the policy's bundles reserved room for the pool
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, -1)
    elif group.custom_resources:  # e.g. a node label resource that pins the pool to some nodes
        options["resources"] = dict(group.custom_resources)
    with quiet_remote_args():
        return dataset.map_batches(
            ReferenceStage, fn_constructor_kwargs={"model": spec.model, "path": spec.reference.path,
                                                   "micro_batch_size": spec.trainer.micro_batch_size},
            batch_size=spec.trainer.micro_batch_size * 4, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, group.num_workers)),
            num_cpus=group.cpus if group.num_workers else 0, num_gpus=group.gpus or None, **options, **NO_RESTARTS)


def print_summary(summary: dict) -> None:
    print("=" * 60)
    print(f"finished after {summary['steps']} steps")
    for section in ("train", "eval"):
        shown = {k: v for k, v in summary[section].items() if not k.endswith(("step_time", "lr"))}
        if shown:
            print(f"{section:>6}: " + "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in shown.items()))
    print(f"checkpoint: {summary['checkpoint']}")
    if summary["curves"]:
        print(f"curves: {summary['curves']}")
    print(f"data: {summary['bad_records']}")
    print("=" * 60)


def run_offline(spec: JobSpec, run_dir: pathlib.Path) -> dict:
    """One job; after a worker or node failure, a new one from the last checkpoint (trainer.max_failures)."""
    from jobs.recovery import run_with_recovery

    return run_with_recovery(spec, lambda attempt: OfflineJob(attempt, run_dir))
