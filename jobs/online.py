"""Online RL driver: GRPO, RLOO and REINFORCE++.

    prompts (seeded order) -> rollout.generate         n samples per prompt, behaviour log-probs
      -> rewards (rule functions, weighted)             per completion
      -> reference token log-probs (when kl_coef > 0)
      -> advantages: group-normalised (GRPO), leave-one-out (RLOO), or whitened returns of
         token rewards with the KL in the reward (REINFORCE++)   vlrlhf.losses.policy
      -> policy.train_step                              PPO-clip over every sample, one optimizer step
      -> sync_weights(policy -> rollout)                the engine samples from the new policy
      -> log, checkpoint

One update per rollout batch (on-policy: the clip is a guard, ratio = 1 at the start
of the step). Each stage is timed. Groups whose rewards are all equal carry no
gradient with group baselines and are skipped when `online.skip_equal_groups`.
Not built yet: PPO with a critic, a reward-model role, asynchronous (one-step-off)
rollouts, collective (multi-node) weight broadcast.
"""

from __future__ import annotations

import itertools
import pathlib
import time

import torch
from tqdm import tqdm

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from actors.rollout import RolloutWorker, Sampling, sync_weights
from jobs.checkpoints import open_checkpoints
from jobs.common import Tracker, colocation_reserve, plot_curves
from vlrlhf.config import JobSpec
from vlrlhf.data.images import load_image
from vlrlhf.data.pipeline import ordered
from vlrlhf.data.reader import BadRecords, read_records
from vlrlhf.losses.policy import group_advantages, rloo_advantages
from vlrlhf.models.batch import EncodedExample
from vlrlhf.models.registry import load_adapter
from vlrlhf.rewards import RewardSet, RewardTerm
from vlrlhf.training import RLBatch, finish_metrics


def rl_examples(adapter, prompt: EncodedExample, samples) -> list[EncodedExample]:
    """Prompt + completion rows; labels (and log-prob slots) on the completion tokens."""
    rows = []
    for sample in samples:
        arrays = {name: values + [0] * sample.length for name, values in prompt.token_arrays.items()}
        rows.append(EncodedExample(prompt.input_ids + sample.token_ids,
                                   [-100] * len(prompt.input_ids) + sample.token_ids, arrays, prompt.extras))
    return rows


def collate_rl(adapter, rows: list[tuple]) -> RLBatch:
    """rows: (example, behaviour log-probs, advantage: a float, or one per completion token)."""
    batch = adapter.collate([row[0] for row in rows])
    old = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    token_level = bool(rows) and isinstance(rows[0][2], list)
    advantages = torch.zeros(batch.input_ids.shape) if token_level else torch.zeros(len(rows))
    for index, (example, logps, advantage) in enumerate(rows):
        start = len(example.input_ids) - len(logps)
        old[index, start:start + len(logps)] = torch.tensor(logps)
        if token_level:
            advantages[index, start:start + len(logps)] = torch.tensor(advantage)
        else:
            advantages[index] = advantage
    return RLBatch(batch, old, advantages)


class OnlineJob:
    def __init__(self, spec: JobSpec, run_dir: pathlib.Path):
        self.spec, self.run_dir, self.online = spec, run_dir, spec.online
        run_dir.mkdir(parents=True, exist_ok=True)
        self.bad = BadRecords(spec.data.on_bad_record, run_dir / "quarantine.jsonl")
        self.records = read_records(spec.data.train, spec.data.format, options=spec.data.format_options, bad=self.bad)
        if not self.records:
            raise ValueError(f"data.train: no prompts in {spec.data.train}")
        self.adapter = load_adapter(spec.model.path, adapter=spec.model.adapter)
        self.rewards = RewardSet([RewardTerm(**term.model_dump()) for term in self.online.rewards])
        steps_per_epoch = max(1, len(self.records) // self.online.prompts_per_step)
        self.total_steps = min(spec.trainer.max_steps or 10**9, spec.trainer.epochs * steps_per_epoch)
        separate_reference = self.online.kl_coef > 0 and spec.reference.mode != "policy"
        roles = ("rollout",) + (("reference",) if separate_reference else ())
        self.policy = ActorGroup(PolicyWorker, spec.resources.policy, name="policy",
                                 args=(spec.model, spec.algorithm, spec.trainer, self.total_steps, self.online),
                                 reserve=colocation_reserve(spec, roles))
        self.reference = None
        if self.online.kl_coef > 0:  # the reference only exists to price the KL
            resources = spec.resources.reference
            self.reference = self.policy if not separate_reference else ActorGroup(
                ReferenceWorker, resources, name="reference", args=(spec.model, spec.reference.path),
                share=self.policy if resources.colocate else None)
        resources = spec.resources.rollout
        self.rollout = ActorGroup(RolloutWorker, resources, name="rollout", args=(self.online.engine, spec.model.path),
                                  kwargs={"max_model_len": self.online.max_model_len}
                                  if self.online.engine == "vllm" else {},
                                  share=self.policy if resources.colocate else None)
        self.checkpoints = open_checkpoints(spec.checkpoint.dir, spec.checkpoint.keep_last, run_dir / "staging")
        self.tracker = Tracker(spec, run_dir)
        self.step = 0

    def prompts(self):
        """Batches of prompt records, epoch after epoch, in the seeded order."""
        for epoch in itertools.count():
            records = ordered(self.records, self.spec.trainer.seed, epoch)
            per_step = self.online.prompts_per_step
            for start in range(0, len(records) - per_step + 1, per_step):
                yield records[start:start + per_step]

    def request(self, record) -> dict:
        images = [load_image(source, image_root=self.spec.data.image_root, max_pixels=self.spec.data.max_pixels)
                  for source in record.images]
        return {"messages": [m.model_dump() for m in record.prompt], "images": images}

    def run(self) -> dict:
        online = self.online
        sampling = Sampling(n=online.n, temperature=online.temperature, top_p=online.top_p,
                            max_tokens=online.max_tokens, seed=self.spec.trainer.seed)
        progress = tqdm(total=self.total_steps, desc=self.spec.name, unit="step", dynamic_ncols=True)
        last = {}
        for records in self.prompts():
            if self.step >= self.total_steps:
                break
            last = self.train_step(records, sampling, progress)
        progress.close()
        checkpoint = self.checkpoints.save(self.step, lambda folder: self.policy.get(
            self.policy.broadcast("save", folder, {"epoch": 0, "position": 0, "spec": self.spec.model_dump()})))
        self.tracker.close()
        plot = plot_curves(self.tracker.path, self.run_dir / "curves.png")
        summary = {"steps": self.step, "train": last, "checkpoint": str(checkpoint),
                   "local_checkpoint": str(self.checkpoints.local_path(self.step)),
                   "curves": str(plot) if plot else None}
        print(f"finished after {self.step} steps: " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in last.items()
                                                              if k.startswith("train/")))
        print(f"checkpoint: {checkpoint}")
        return summary

    def train_step(self, records, sampling, progress) -> dict:
        timings, started = {}, time.perf_counter()
        requests = [self.request(record) for record in records]
        samples = self.rollout.get(self.rollout.broadcast("generate", requests, sampling))[0]
        timings["rollout_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        result = self.rewards.score([s.text for s in samples], [records[s.request] for s in samples])
        rewards = torch.tensor(result.total, dtype=torch.float32)
        name = self.spec.algorithm.name
        if name == "grpo":
            advantages = group_advantages(rewards, self.online.n, scale=self.online.advantage_scale)
        elif name == "rloo":
            advantages = rloo_advantages(rewards, self.online.n)
        groups = rewards.view(-1, self.online.n)
        keep = ~(groups == groups[:, :1]).all(dim=1) if self.online.skip_equal_groups and name != "reinforce_pp" \
            else torch.ones(len(groups), dtype=torch.bool)
        timings["reward_s"] = time.perf_counter() - mark
        values = {"train/reward": float(rewards.mean()), "train/reward_std": float(rewards.std()),
                  "train/groups_kept": float(keep.float().mean()),
                  "train/response_length": sum(s.length for s in samples) / len(samples),
                  "train/truncated": sum(s.finish_reason == "length" for s in samples) / len(samples)}
        values.update({f"train/reward_failures/{k}": float(v) for k, v in result.failures.items()})
        prompts = [self.adapter.encode_prompt(r["messages"], r["images"]) for r in requests]
        examples = [rl_examples(self.adapter, prompts[s.request], [s])[0] for s in samples]
        if name == "reinforce_pp":
            advantages = self.token_advantages(examples, samples, rewards)
        else:
            advantages = advantages.tolist()
        rows = [(example, sample.logprobs, advantage) for example, sample, advantage
                in zip(examples, samples, advantages, strict=True) if keep[sample.request]]
        if rows:
            mark = time.perf_counter()
            world = self.policy.world_size
            per_worker = max(1, len(rows) // world)
            micro = self.spec.trainer.micro_batch_size
            shares = [rows[w * per_worker:(w + 1) * per_worker] for w in range(world)]
            shards = [[collate_rl(self.adapter, share[i:i + micro]) for i in range(0, len(share), micro)]
                      for share in shares]
            reference = [None] * world
            if self.reference is not None and name != "reinforce_pp":  # reinforce_pp: the KL is in the reward
                reference = [self.reference.get([self.reference.call(0, "logprobs", shard)])[0] for shard in shards]
            normaliser = float(sum(len(r[1]) for share in shares for r in share))
            results = self.policy.get(self.policy.map("train_step", shards, reference, [normaliser] * world))
            timings["train_s"] = time.perf_counter() - mark
            metrics = finish_metrics([s for r in results for s in r["sums"]])
            values.update({f"train/{k}": v for k, v in metrics.items() if k not in ("examples", "tokens")})
            values["train/grad_norm"] = results[0]["grad_norm"]
            mark = time.perf_counter()
            sync = sync_weights(self.policy, self.rollout)
            timings["sync_s"] = time.perf_counter() - mark
            values["train/synced_tensors"] = float(sync["tensors"])
        self.step += 1
        values.update({f"time/{k}": v for k, v in timings.items()})
        values["time/step_s"] = time.perf_counter() - started
        progress.update(1)
        progress.set_postfix({"reward": f"{values['train/reward']:.3f}"})
        if self.step % self.spec.trainer.log_every == 0:
            print(f"step {self.step}/{self.total_steps} " + " ".join(f"{k.split('/', 1)[1]}={v:.4g}"
                                                                   for k, v in values.items()), flush=True)
        self.tracker.log(self.step, values)
        if self.spec.checkpoint.every and self.step % self.spec.checkpoint.every == 0:
            self.checkpoints.save(self.step, lambda folder: self.policy.get(self.policy.broadcast(
                "save", folder, {"epoch": 0, "position": 0, "spec": self.spec.model_dump()})))
        return values

    def token_advantages(self, examples, samples, rewards) -> list[list[float]]:
        """REINFORCE++: token rewards (the score on the last token, -kl_coef * k1 on each),
        returns-to-go whitened over the whole batch; per sample, one value per token."""
        from vlrlhf.losses.policy import kl_rewards, reinforce_pp_advantages

        full = collate_rl(self.adapter, [(e, s.logprobs, 0.0) for e, s in zip(examples, samples, strict=True)])
        mask = full.batch.loss_mask
        if self.reference is not None:
            ref = self.reference.get([self.reference.call(0, "logprobs", [full])])[0][0]
        else:
            ref = full.old_logps
        token_rewards = kl_rewards(rewards, full.old_logps, ref, mask, self.online.kl_coef, "k1")
        advantages = reinforce_pp_advantages(token_rewards, mask,
                                             group_size=self.online.n if self.online.reinforce_baseline else None)
        return [advantages[i][mask[i]].tolist() for i in range(len(samples))]

    def shutdown(self) -> None:
        for group in {id(g): g for g in (self.policy, self.reference, self.rollout) if g is not None}.values():
            group.shutdown()


def run_online(spec: JobSpec, run_dir: pathlib.Path) -> dict:
    job = OnlineJob(spec, run_dir)
    try:
        return job.run()
    finally:
        job.shutdown()
