"""Offline training driver: SFT, the DPO family, KTO and reward models.

    batches (Ray Data, in seeded order) -> shard over policy workers
      -> reference.logprobs   (ObjectRefs, submitted one step ahead)
      -> policy.train_step    (micro-batches, gradient accumulation, all-reduce)
      -> log / eval / checkpoint

SFT and reward-model training (algorithm.name=reward: a scalar head, Bradley-Terry on
preference pairs) have no reference; DPO and KTO take it from a separate reference group, from the
policy with its LoRA adapters disabled, or not at all (reference-free loss types);
DPO can also precompute it in a first pass (jobs.precompute) and release the group.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import time

from tqdm import tqdm

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.checkpoints import open_checkpoints, resume_from
from jobs.common import (Tracker, colocation_reserve, normaliser_for, pipeline_budget, plot_curves, prepare_data,
                         shard, split_shares)
from jobs.precompute import lookup, precompute_reference
from vlrlhf.config import JobSpec
from vlrlhf.data.pipeline import encoded_dataset, iter_encoded, ordered
from vlrlhf.models.registry import load_adapter
from vlrlhf.training import finish_metrics


NO_REFERENCE = ("sft", "reward")  # reward: Bradley-Terry on the reward model's own scores


def chunks(iterable, size: int):
    """Lists of `size` items; an incomplete tail is dropped (it would change the batch size)."""
    iterator = iter(iterable)
    while len(batch := list(itertools.islice(iterator, size))) == size:
        yield batch


class OfflineJob:
    def __init__(self, spec: JobSpec, run_dir: pathlib.Path):
        self.spec, self.run_dir = spec, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.data = prepare_data(spec, run_dir)
        self.adapter = load_adapter(spec.model.path, adapter=spec.model.adapter)  # driver side: collation only
        trainer = spec.trainer
        self.steps_per_epoch = len(self.data.train) // trainer.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train has {len(self.data.train)} records, fewer than one batch "
                             f"(trainer.batch_size={trainer.batch_size})")
        self.total_steps = min(trainer.max_steps or math.inf, trainer.epochs * self.steps_per_epoch)
        uses_reference = spec.algorithm.name not in NO_REFERENCE and spec.reference.mode in ("separate", "precomputed")
        roles = ("policy", "reference") if uses_reference else ("policy",)
        self.data.resources = pipeline_budget(spec, roles)  # before any group: a spec that would hang stops here
        self.policy = ActorGroup(PolicyWorker, spec.resources.policy, name="policy",
                                 args=(spec.model, spec.algorithm, spec.trainer, self.total_steps),
                                 reserve=colocation_reserve(spec, ("reference",) if uses_reference else ()))
        self.reference = self._reference_group()
        self.precomputed = None
        if spec.reference.mode == "precomputed":  # one forward pass now, then the reference is released
            self.precomputed = precompute_reference(self.reference, self.data, self.adapter, trainer.batch_size,
                                                    trainer.micro_batch_size)
            self.reference.shutdown()
            self.reference = None
        self.checkpoints = open_checkpoints(spec.checkpoint.dir, spec.checkpoint.keep_last, run_dir / "staging")
        self.tracker = Tracker(spec, run_dir)
        self.step, self.epoch, self.position = 0, 0, 0
        self.eval_items = None

    def _reference_group(self):
        mode = self.spec.reference.mode
        if self.spec.algorithm.name in NO_REFERENCE or mode == "none":
            return None
        if mode == "policy":
            return self.policy
        resources = self.spec.resources.reference
        return ActorGroup(ReferenceWorker, resources, name="reference",
                          args=(self.spec.model, self.spec.reference.path),
                          share=self.policy if resources.colocate else None)

    def reference_logps(self, items: list, shards: list) -> list:
        """ObjectRefs (or values, in-process) of the reference log-probs, one per policy worker."""
        if self.precomputed is not None:
            return lookup(self.precomputed, split_shares(items, len(shards), self.spec.trainer.micro_batch_size))
        if self.reference is None:
            return [None] * len(shards)
        if self.reference.local is not None and len(shards) > 1:  # one in-process reference serves every share
            return [self.reference.local.logprobs(share) for share in shards]
        return self.reference.map("logprobs", shards)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        spec = self.spec
        resumed = resume_from(spec, self.checkpoints)
        if resumed is not None:
            state = self.policy.get(self.policy.broadcast("read_checkpoint", str(resumed)))[0]
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            print(f"resumed from {resumed}: step {self.step}, epoch {self.epoch}, position {self.position}")
        world = self.policy.world_size
        progress = tqdm(total=self.total_steps, initial=self.step, desc=spec.name, unit="step", dynamic_ncols=True)
        last = {}
        while self.step < self.total_steps:
            dataset = encoded_dataset(ordered(self.data.train, spec.trainer.seed, self.epoch),
                                      self.data.settings, start=self.position, resources=self.data.resources)
            pending = None
            for items in chunks(iter_encoded(dataset, self.data.bad), spec.trainer.batch_size):
                # ---- reference for this batch, submitted before the policy trains the previous one
                shards = shard(items, world, spec.trainer.micro_batch_size, self.adapter)
                current = (items, shards, self.reference_logps(items, shards))
                if pending is not None:
                    last = self.train_step(*pending, progress)
                    if self.step >= self.total_steps:
                        break
                pending = current
            else:
                if pending is not None and self.step < self.total_steps:
                    last = self.train_step(*pending, progress)
                self.epoch += 1
                self.position = 0
        progress.close()
        final_eval = self.evaluate()
        checkpoint = self.save()
        self.tracker.close()
        plot = plot_curves(self.tracker.path, self.run_dir / "curves.png")
        summary = {"steps": self.step, "train": last, "eval": final_eval, "checkpoint": str(checkpoint),
                   "local_checkpoint": str(self.checkpoints.local_path(self.step)),
                   "curves": str(plot) if plot else None, "bad_records": self.data.bad.summary()}
        print_summary(summary)
        return summary

    def train_step(self, items, shards, reference_refs, progress) -> dict:
        started = time.perf_counter()
        normaliser = normaliser_for(self.spec, items)
        results = self.policy.get(self.policy.map("train_step", shards, reference_refs,
                                                  [normaliser] * len(shards)))
        metrics = finish_metrics([s for r in results for s in r["sums"]])
        self.step += 1
        self.position = items[-1].position + 1
        elapsed = time.perf_counter() - started
        values = {f"train/{k}": v for k, v in metrics.items() if k != "examples"}
        values.update({"train/grad_norm": results[0]["grad_norm"], "train/lr": results[0]["lr"],
                       "train/step_time": elapsed, "train/samples_per_s": len(items) / elapsed})
        progress.update(1)
        progress.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in values.items()
                              if k in ("train/loss", "train/reward_accuracy", "train/samples_per_s")})
        if self.step % self.spec.trainer.log_every == 0:
            print(f"step {self.step}/{self.total_steps} " + " ".join(
                f"{k.split('/')[1]}={v:.4g}" for k, v in values.items()), flush=True)
        every = self.spec.trainer.eval_every
        if every and self.step % every == 0 and self.step < self.total_steps:
            values.update(self.evaluate())
        self.tracker.log(self.step, values)
        if self.checkpoints.due(self.step, self.spec.checkpoint) and self.step < self.total_steps:
            self.save()
        return values

    def evaluate(self) -> dict:
        if not self.data.held_out:
            return {}
        if self.eval_items is None:
            self.eval_items = list(iter_encoded(encoded_dataset(self.data.held_out, self.data.settings,
                                                                resources=self.data.resources),
                                                self.data.bad))
        batch_size = self.spec.trainer.batch_size
        sums = []
        world = self.policy.world_size
        for start in range(0, len(self.eval_items), batch_size):
            items = self.eval_items[start:start + batch_size]
            if len(items) < world:
                continue
            items = items[: len(items) // world * world]
            shards = shard(items, world, self.spec.trainer.micro_batch_size, self.adapter)
            results = self.policy.get(self.policy.map("evaluate", shards, self.reference_logps(items, shards)))
            sums.extend(s for r in results for s in r["sums"])
        metrics = finish_metrics(sums)
        values = {f"eval/{k}": v for k, v in metrics.items()}
        self.tracker.log(self.step, values)
        print(f"eval at step {self.step}: " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in values.items()))
        return values

    def save(self) -> str:
        state = {"epoch": self.epoch, "position": self.position, "spec": self.spec.model_dump()}
        path = self.checkpoints.save(self.step, lambda folder: self.policy.get(
            self.policy.broadcast("write_checkpoint", folder, state)))  # from each worker's node
        print(f"checkpoint: {path}")
        return path

    def shutdown(self) -> None:
        for group in (self.policy, self.reference):
            if group is not None:
                group.shutdown()


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
