"""Online RL driver: PPO, GRPO, RLOO and REINFORCE++.

    prompts (Ray Data: count pass, seeded windows, readers, encoders; refs to the driver)
      -> rollout.rollout(prompt slices)      each engine fetches its prompts, loads their
                                             images, samples n per prompt (behaviour log-probs)
      -> in parallel: reward model scores, reference log-probs, critic values (PPO), each
         worker building its rows from the prompt slices and the samples' tokens; and, in
         the driver, the rule rewards (completion text and the prompts' answers)
      -> advantages (vlrlhf.losses.policy), from numbers:
           grpo          group-normalised scores;  KL to the reference in the loss (k3)
           rloo          leave-one-out scores;     KL in the loss (k3)
           reinforce_pp  whitened returns of token rewards, KL in the reward (k1)
           ppo           GAE over the critic's values, KL in the reward (k1), whitened
      -> online.epochs x online.mini_batches optimizer steps of the policy (PPO-clip)
         and, for PPO, of the critic (clipped value loss): rows built and collated on the
         workers (vlrlhf.rows.RowsShare)
      -> weight sync policy -> rollout (object store, or a gloo/NCCL broadcast; ZeRO-3 gathers first)
      -> log (and Ray gauges), checkpoint

The driver holds the step's prompt slices (object references), the samples' tokens,
log-probs and texts, the prompts' answers and the scores: never a prompt's pixels or a
collated batch. Prompts stream from the same pipeline as offline data (one execution
over every epoch, after the resume point), so the driver's memory does not grow with
the prompt set. The step's prompts are split across the rollout engines (contiguous
shares, a seed of its own each) and the samples gathered back in prompt order
(actors.rollout). `checkpoint.resume` restores every role (policy and critic
optimizers, schedules, RNG), the place in the prompt order, the sampling seeds and,
with async rollouts, the samples already drawn for the next step: a resumed run
repeats the uninterrupted one.

Each stage is timed (time/*). With `online.async_rollout` the rollout of step t+1 runs
while step t trains (one step off-policy): its behaviour log-probs come from the
weights before step t's update, and the PPO ratio pi/pi_behaviour (clipped) is the
importance correction. Groups whose rewards are all equal carry no gradient with group
baselines and are skipped when `online.skip_equal_groups` (grpo, rloo), or replaced by
groups of further prompts with `online.dynamic_sampling` (DAPO; jobs.sampling); completions cut
at max_tokens are left out of the loss when `online.truncated: mask` (they still count
in the rewards and the baselines).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import torch
from tqdm import tqdm

from actors.critic import CriticWorker
from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from actors.judge import JudgeWorker
from actors.reward import RewardModelWorker
from actors.rollout import RolloutResult, RolloutWorker, Sample, Sampling, collect_rollout, start_rollout
from actors.storage import is_uri, open_uri, write_folder
from actors.weight_sync import sync_weights
from jobs.benchmarks import due, run_benchmarks, step_output
from jobs.checkpoints import open_checkpoints, resume_from
from jobs.recovery import report_restart
from jobs.sampling import informative, merged, merged_metrics, selected
from jobs.common import (ORDER, Tracker, check_order, colocation_reserve, pipeline_budget, plot_curves, prepare_data,
                         surfacing_bad_records)
from vlrlhf.config import JobSpec
from vlrlhf.models.groups import groups_of
from vlrlhf.data.order import split_key
from vlrlhf.data.stream import Stream
from vlrlhf.losses.policy import gae, group_advantages, kl_rewards, reinforce_pp_advantages, rloo_advantages, whiten
from vlrlhf.rewards import RewardSet, RewardTerm
from vlrlhf.rows import Row, RowsShare, padded, unpadded
from vlrlhf.training import finish_metrics

GROUP_BASELINES = ("grpo", "rloo")
ONLINE_STATE = "online_state.json"  # the driver's part of a checkpoint
GAUGES = {  # Ray metrics of the step (the dashboard's Metrics page; Prometheus as ray_<name>)
    "train/reward": ("vlrlhf_reward", "mean sampled reward of the step"),
    "train/reference_kl": ("vlrlhf_kl", "KL(behaviour || reference) per completion token (k1 on the samples)"),
    "time/step_s": ("vlrlhf_step_time_s", "seconds per step (wall time from the end of the previous one)"),
    "rollout/tokens_per_s": ("vlrlhf_rollout_tokens_per_s", "sampled tokens per second of rollout"),
}


@dataclasses.dataclass
class Pending:
    """A submitted rollout."""

    calls: list  # ObjectRef or RolloutResult per engine with prompts
    started: float  # perf_counter at submission
    result: RolloutResult | None = None  # once collected: samples in prompt order, records, last key, prompts


def make_gauges() -> dict:
    """One Ray gauge per GAUGES key; none when Ray is not running (in-process runs)."""
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util.metrics import Gauge

    return {key: Gauge(name, description) for key, (name, description) in GAUGES.items()}


def read_online_state(source: str) -> dict:
    """The driver's state file of a checkpoint folder or URI (JSON: nothing in it can run code)."""
    if is_uri(source):
        filesystem, root = open_uri(source)
        try:
            with filesystem.open_input_file(f"{root}/{ONLINE_STATE}") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            pass
    elif (pathlib.Path(source) / ONLINE_STATE).is_file():
        return json.loads((pathlib.Path(source) / ONLINE_STATE).read_text())
    raise ValueError(f"checkpoint.resume: {source} is not a checkpoint of an online job of this vlrlhf version (no "
                     f"{ONLINE_STATE}; an earlier version wrote online_state.pt, a pickle, which is not read). "
                     f"Start a new run from its weights instead: model.path={source} checkpoint.resume=off")


def advantages_for(name: str, online, scores: torch.Tensor, rows: list[Row]):
    """(advantages, returns or None) per row, over its completion tokens."""
    old, mask = padded(rows, "logprobs")
    if name in GROUP_BASELINES:
        per_sample = group_advantages(scores, online.n, scale=online.advantage_scale) if name == "grpo" \
            else rloo_advantages(scores, online.n)
        return unpadded(per_sample[:, None].float() * mask, mask), None
    ref = padded(rows, "ref_logprobs")[0] if rows[0].ref_logprobs is not None else old
    token_rewards = kl_rewards(scores, old, ref, mask, online.kl_coef, online.kl_estimator or "k1")
    if name == "reinforce_pp":
        group = online.n if online.reinforce_baseline else None
        return unpadded(reinforce_pp_advantages(token_rewards, mask, group_size=group), mask), None
    values = padded(rows, "values")[0]
    advantages, returns = gae(token_rewards, values, mask, gamma=online.gamma, lam=online.lam)
    return unpadded(whiten(advantages, mask), mask), unpadded(returns, mask)


class OnlineJob:
    def __init__(self, spec: JobSpec, run_dir: pathlib.Path):
        self.spec, self.run_dir, self.online = spec, run_dir, spec.online
        self.name = spec.algorithm.name
        run_dir.mkdir(parents=True, exist_ok=True)
        online = self.online
        separate_reference = online.kl_coef > 0 and spec.reference.mode != "policy"
        roles = ("rollout", "reward", "critic", "judge") + (("reference",) if separate_reference else ())
        used = ("policy", "rollout") + (("reference",) if separate_reference else ()) + \
            (("reward",) if online.reward_model is not None else ()) + (("critic",) if self.name == "ppo" else ()) + \
            (("judge",) if local_judge(online) else ())
        resources = pipeline_budget(spec, used)  # the prompt pipeline's CPUs, before anything starts
        self.data = prepare_data(spec, run_dir, resources, held_out=False)
        self.policy = self.reference = self.reward_model = self.critic = self.rollout = self.stream = None
        self.judge = None
        self.checkpoints = open_checkpoints(spec.checkpoint.dir, spec.checkpoint.keep_last, run_dir / "staging")
        # where the next prompts come from, and how many rollouts were submitted (the seeds)
        self.step, self.epoch, self.after_key, self.submitted = 0, 0, None, 0
        self.restored = None  # a checkpoint's samples for the next step (async_rollout)
        try:
            if self.data.num_train < online.prompts_per_step:
                raise ValueError(f"data.train: {self.data.num_train} prompts, fewer than online.prompts_per_step="
                                 f"{online.prompts_per_step}")
            self.total_steps = min(spec.trainer.max_steps or 10**9,
                                   spec.trainer.epochs * self.data.num_train // online.prompts_per_step)
            self.resumed = resume_from(spec, self.checkpoints)
            if self.resumed is not None:  # the driver's place first: the prompt stream starts from it
                state = read_online_state(str(self.resumed))
                check_order(state, spec, self.resumed)
                self.step, self.epoch, self.after_key, self.submitted = (
                    state[k] for k in ("step", "epoch", "after_key", "submitted"))
                self.restored = state["pending"]
            self.create_groups(separate_reference, roles)  # placed; their workers load in the background
            # the prompt pipeline's actors on the room the groups left, loading meanwhile
            # (records only: the rollout engines load and encode each step's prompts, once)
            self.stream = Stream(self.data.stream(range(self.epoch, spec.trainer.epochs), self.after_key,
                                                  held_out=False))
            groups = (self.policy, self.reference, self.reward_model, self.critic, self.rollout, self.judge)
            for group in {id(g): g for g in groups if g is not None}.values():
                group.connect()
        except BaseException:
            self.shutdown()
            raise
        self.rewards = RewardSet([RewardTerm(**t.model_dump()) for t in online.rewards]) if online.rewards else None
        # a colocated engine sleeps while the policy trains, unless it must keep sampling (async)
        self.sleeps = bool(spec.resources.rollout.colocate) and not online.async_rollout
        self.tracker = Tracker(spec, run_dir)
        self.gauges = make_gauges()
        self.sampling = Sampling(n=online.n, temperature=online.temperature, top_p=online.top_p,
                                 max_tokens=online.max_tokens, seed=spec.trainer.seed)
        self.clock = time.perf_counter()  # when the previous step ended (time/step_s)

    def create_groups(self, separate_reference: bool, roles: tuple[str, ...]) -> None:
        spec, online = self.spec, self.online
        updates = self.total_steps * online.epochs * online.mini_batches  # optimizer steps, for the schedules
        self.policy = ActorGroup(PolicyWorker, spec.resources.policy, name="policy",
                                 args=(spec.model, spec.algorithm, spec.trainer, updates, online),
                                 reserve=colocation_reserve(spec, roles), connect=False)
        share = lambda role: self.policy if getattr(spec.resources, role).colocate else None  # noqa: E731
        if online.kl_coef > 0:  # the reference only exists to price the KL
            self.reference = self.policy if not separate_reference else ActorGroup(
                ReferenceWorker, spec.resources.reference, name="reference", args=(spec.model, spec.reference.path),
                share=share("reference"), connect=False)
        if online.reward_model is not None:
            self.reward_model = ActorGroup(RewardModelWorker, spec.resources.reward, name="reward",
                                           args=(online.reward_model.path, spec.model.dtype,
                                                 spec.trainer.micro_batch_size, spec.model.trust_remote_code),
                                           share=share("reward"), connect=False)
        if local_judge(online):
            self.judge = ActorGroup(JudgeWorker, spec.resources.judge, name="judge",
                                    args=(online.judge.model_dump(), spec.model.dtype, spec.model.trust_remote_code),
                                    share=share("judge"), connect=False)
        if self.name == "ppo":
            self.critic = ActorGroup(CriticWorker, spec.resources.critic, name="critic",
                                     args=(spec.model, online.critic, spec.trainer, updates), share=share("critic"),
                                     connect=False)
        kwargs = {"dtype": spec.model.dtype, "processor": dict(spec.model.processor), "adapter": spec.model.adapter,
                  "trust_remote_code": spec.model.trust_remote_code}
        if online.engine == "vllm":
            kwargs |= {"max_model_len": online.max_model_len, "sleep_mode": bool(spec.resources.rollout.colocate),
                       "tensor_parallel_size": online.tensor_parallel_size,
                       "gpu_memory_utilization": online.gpu_memory_utilization}
        if online.tools:
            kwargs |= {"tools": [tool.model_dump() for tool in online.tools], "max_turns": online.max_turns,
                       "tool_timeout_s": online.tool_timeout_s, "episode_max_length": online.max_model_len}
        self.rollout = ActorGroup(RolloutWorker, spec.resources.rollout, name="rollout",
                                  args=(online.engine, spec.model.path), kwargs=kwargs, share=share("rollout"),
                                  connect=False)

    # ------------------------------------------------------------------ prompts and rollouts
    def next_prompts(self) -> list:
        """The next prompts_per_step prompts of the seeded order (block slices); a step may take
        the last prompts of one epoch and the first of the next."""
        return self.stream.rows.take(self.online.prompts_per_step)

    def submit(self, prompts: list) -> Pending:
        """Start a rollout across the engines (ObjectRefs on Ray workers; done at once in-process)."""
        self.submitted += 1  # a fresh seed per rollout: the same seed would redraw the same samples
        sampling = self.sampling if self.sampling.seed is None else dataclasses.replace(
            self.sampling, seed=self.sampling.seed * 1_000_003 + self.submitted)
        started = time.perf_counter()
        return Pending(start_rollout(self.rollout, prompts, sampling, self.data.settings, self.data.sink), started)

    def collect(self, pending: Pending) -> RolloutResult:
        if pending.result is None:
            with surfacing_bad_records():  # a bad prompt under on_bad_record: raise names its file and row
                pending.result = collect_rollout(self.rollout, pending.calls)
        return pending.result

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self.resume()
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.spec.name, unit="step",
                        dynamic_ncols=True)
        last, pending = {}, self.restored
        self.clock = time.perf_counter()
        if pending is None and self.step < self.total_steps:
            pending = self.submit(self.next_prompts())
        self.stream.rows.waited()
        while self.step < self.total_steps:
            mark = time.perf_counter()
            result = self.collect(pending)
            timings = {"rollout_wait_s": time.perf_counter() - mark, "rollout_s": time.perf_counter() - pending.started}
            pending = None
            more = self.step + 1 < self.total_steps
            if more and self.online.async_rollout:  # step t+1 samples from the weights step t starts with
                pending = self.submit(self.next_prompts())
            timings["data_wait_s"] = self.stream.rows.waited()  # for this step's and the next step's prompts
            last = self.train_step(result, timings, progress)
            report_restart(self)
            saved = more and self.checkpoints.due(self.step, self.spec.checkpoint)
            if saved:
                self.checkpoints.save(self.step, functools.partial(self.save, pending=pending))
            if due(self.spec, self.step, self.total_steps):  # evaluation.every_steps: on this step's checkpoint
                if not saved:
                    self.checkpoints.save(self.step, functools.partial(self.save, pending=pending))
                scores = run_benchmarks(self.spec, str(self.checkpoints.local_path(self.step)),
                                        step_output(self.run_dir, self.step))
                self.tracker.log(self.step, scores)
            if more and not self.online.async_rollout:
                pending = self.submit(self.next_prompts())
        progress.close()
        checkpoint = self.checkpoints.save(self.step, self.save)
        self.tracker.close()
        plot = plot_curves(self.tracker.path, self.run_dir / "curves.png")
        summary = {"steps": self.step, "train": last, "checkpoint": str(checkpoint),
                   "local_checkpoint": str(self.checkpoints.local_path(self.step)),
                   "curves": str(plot) if plot else None, "bad_records": self.data.summary()}
        print(f"finished after {self.step} steps: " + " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in last.items()
                                                              if k.startswith("train/")))
        print(f"checkpoint: {checkpoint}")
        return summary

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str, pending: Pending | None = None) -> list:
        """Every writer's part, from where it runs (returns their reports): the policy (weights,
        optimizer, schedule, RNG), the critic (the same, under critic/), and the driver's place:
        step, the prompt order's resume key, rollouts submitted (the sampling seeds) and, with
        async_rollout, the next step's samples (drawn from the weights before this step's
        update, they cannot be drawn again after a restart)."""
        state = {"epoch": self.epoch, "after_key": self.after_key, "spec": self.spec.model_dump()}
        reports = self.policy.get(self.policy.broadcast("write_checkpoint", folder, state))  # from each worker's node
        if self.critic is not None:  # the value model beside the policy: critic/ (HF folder + value head)
            reports += self.critic.get(self.critic.broadcast("write_checkpoint", f"{folder}/critic"))
        next_step = None
        if pending is not None:
            result = self.collect(pending)
            next_step = {"samples": [dataclasses.asdict(s) for s in result.samples], "last_key": result.last_key}
        driver = {"step": self.step, "epoch": self.epoch, "after_key": self.after_key, "submitted": self.submitted,
                  "pending": next_step, "order": ORDER, "shuffle_window": self.spec.data.shuffle_window,
                  "seed": self.spec.trainer.seed}
        reports.append(write_folder(folder, lambda local: (pathlib.Path(local) / ONLINE_STATE).write_text(
            json.dumps(driver))))
        return reports

    def resume(self) -> None:
        """checkpoint.resume (auto: the newest complete checkpoint under checkpoint.dir, if any):
        every role's state; the driver's place was read before the prompt stream started. The
        samples already drawn for the next step (async) pair with the stream's next prompts."""
        if self.resumed is None:
            return
        source = str(self.resumed)
        self.policy.get(self.policy.broadcast("read_checkpoint", source))
        if self.critic is not None:
            self.critic.get(self.critic.broadcast("read_checkpoint", f"{source}/critic"))
        if self.restored is not None:  # the stream's next prompts are the ones these samples answer
            saved = self.restored
            with surfacing_bad_records():
                prompts = self.rollout.get([self.rollout.call(0, "prompts", self.next_prompts(), self.data.settings,
                                                              self.data.sink)])[0]
            self.restored = Pending([], time.perf_counter(), RolloutResult(
                [Sample(**sample) for sample in saved["samples"]], prompts.records, saved["last_key"], prompts.ref))
        sync_weights(self.policy, self.rollout, self.online.weight_sync)
        print(f"resumed from {source}: step {self.step}, epoch {self.epoch}", flush=True)

    # ------------------------------------------------------------------ one step
    def train_step(self, result: RolloutResult, timings: dict, progress) -> dict:
        rows = rows_of(result.samples)
        mark = time.perf_counter()
        scores, values = self.score(result.prompts, result.records, result.samples, rows)
        timings["score_s"] = time.perf_counter() - mark
        keep = torch.ones(len(scores) // self.online.n, dtype=torch.bool)
        if self.online.dynamic_sampling is not None:
            result, rows, scores, values = self.sample_more(result, rows, scores, values, timings)
            keep = selected(scores, self.online.n, self.online.prompts_per_step)
        elif self.online.skip_equal_groups and self.name in GROUP_BASELINES:
            keep = informative(scores, self.online.n)
        samples, prompts = result.samples, result.prompts
        advantages, returns = advantages_for(self.name, self.online, scores, rows)
        for index, row in enumerate(rows):
            row.advantages = advantages[index]
            row.returns = returns[index] if returns is not None else None
        values.update({"train/reward": float(scores.mean()), "train/reward_std": float(scores.std()),
                       "train/groups_kept": float(keep.float().mean()),
                       "train/response_length": sum(s.length for s in samples) / len(samples),
                       "train/truncated": sum(s.finish_reason == "length" for s in samples) / len(samples),
                       "rollout/tokens_per_s": sum(s.length for s in samples) / timings["rollout_s"]})
        if self.online.tools:
            values.update({"rollout/turns": sum(s.turns for s in samples) / len(samples),
                           "rollout/tool_calls": sum(s.tool_calls for s in samples) / len(samples),
                           "rollout/tool_errors": sum(s.tool_errors for s in samples) / len(samples),
                           "rollout/broken_episodes": sum(s.broken for s in samples) / len(samples)})
        if rows[0].ref_logprobs is not None:  # how far the sampling policy is from the reference (k1)
            behaviour, mask = padded(rows, "logprobs")
            reference = padded(rows, "ref_logprobs")[0]
            values["train/reference_kl"] = float(((behaviour - reference) * mask).sum() / mask.sum())
        masked = self.online.truncated == "mask"  # DAPO's overlong filtering: cut answers teach nothing
        rows = [row for row in rows if keep[row.request] and not (masked and row.truncated)]
        values["train/trained_samples"] = float(len(rows))
        if rows:
            mark = time.perf_counter()
            if self.sleeps:
                self.rollout.get(self.rollout.broadcast("sleep"))
            values.update(self.update(prompts, rows))
            timings["train_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            if self.sleeps:
                self.rollout.get(self.rollout.broadcast("wake_up"))
            sync = sync_weights(self.policy, self.rollout, self.online.weight_sync)
            timings["sync_s"] = time.perf_counter() - mark
            values["train/synced_tensors"] = float(sync["tensors"])
            values["train/synced_bytes"] = float(sync["bytes"])
        self.step += 1
        self.after_key = result.last_key
        self.epoch = split_key(self.after_key)[0]
        values["train/epoch"] = float(self.epoch)
        values.update({f"time/{k}": v for k, v in timings.items()})
        values["time/step_s"] = time.perf_counter() - self.clock  # everything: rollout, scoring, update, sync
        self.clock = time.perf_counter()
        progress.update(1)
        progress.set_postfix({"reward": f"{values['train/reward']:.3f}"})
        if self.step % self.spec.trainer.log_every == 0:
            print(f"step {self.step}/{self.total_steps} " + " ".join(f"{k.split('/', 1)[1]}={v:.4g}"
                                                                   for k, v in values.items()), flush=True)
        self.tracker.log(self.step, values)
        for key, gauge in self.gauges.items():
            if key in values:
                gauge.set(values[key])
        return values

    def sample_more(self, result: RolloutResult, rows: list[Row], scores: torch.Tensor, values: dict,
                    timings: dict) -> tuple[RolloutResult, list[Row], torch.Tensor, dict]:
        """Dynamic sampling (jobs.sampling): roll out further prompts until the step holds
        prompts_per_step informative groups or online.dynamic_sampling.max_rounds rollouts."""
        n, wanted, rounds = self.online.n, self.online.prompts_per_step, 1
        while int(informative(scores, n).sum()) < wanted and rounds < self.online.dynamic_sampling.max_rounds:
            mark = time.perf_counter()
            more = self.collect(self.submit(self.next_prompts()))
            timings["rollout_s"] += time.perf_counter() - mark
            more_rows = rows_of(more.samples)
            mark = time.perf_counter()
            more_scores, more_values = self.score(more.prompts, more.records, more.samples, more_rows)
            timings["score_s"] += time.perf_counter() - mark
            values = merged_metrics(values, len(rows), more_values, len(more_rows))
            result, rows = merged(result, rows, more, more_rows)
            scores = torch.cat([scores, more_scores])
            rounds += 1
        values["train/sampling_rounds"] = float(rounds)
        values["train/informative_groups"] = float(informative(scores, n).sum())
        return result, rows, scores, values

    def score(self, prompts: list, records: list, samples: list[Sample], rows: list[Row]) -> tuple[torch.Tensor, dict]:
        """Sequence scores (N,) (rule rewards + reward model); fills the rows' reference
        log-probs and critic values. The remote parts run at the same time, each worker
        building its rows from the prompt slices."""
        model_scores = reference = critic = None
        if self.reward_model is not None:
            model_scores = self.spread(self.reward_model, "score_rows", prompts, rows, self.data.settings)
        if self.reference is not None:
            reference = self.spread(self.reference, "score_rows", prompts, rows)
        if self.critic is not None:
            critic = self.spread(self.critic, "score_rows", prompts, rows)
        judged = None
        if self.judge is not None:
            judged = (self.spread(self.judge, "judge_rows", prompts, rows, self.data.settings),
                      share_sizes(len(rows), self.judge.world_size))
        elif self.online.judge is not None:
            judged = start_judging(self.online.judge, prompts, rows, self.data.settings)
        metrics, total = {}, torch.zeros(len(samples))
        if self.rewards is not None:
            result = self.rewards.score([s.text for s in samples], [records[s.request] for s in samples])
            total += torch.tensor(result.total, dtype=torch.float32)
            metrics.update({f"train/reward_failures/{k}": float(v) for k, v in result.failures.items()})
            # each term's mean before its weight: e.g. the share of right answers beside the format's
            metrics.update({f"train/rewards/{k}": sum(v) / max(len(v), 1) for k, v in result.terms.items()})
        if model_scores is not None:
            scored = torch.tensor(self.gather(self.reward_model, model_scores), dtype=torch.float32)
            metrics["train/reward_model"] = float(scored.mean())
            total += self.online.reward_model.weight * scored
        if judged is not None:
            scores, failed = finish_judging(self.online.judge, *judged, wait=self.judge is not None)
            metrics["train/judge"] = float(scores.mean())
            metrics["train/judge_failures"] = float(failed)
            total += self.online.judge.weight * scores
        if reference is not None:
            for row, logps in zip(rows, self.gather(self.reference, reference), strict=True):
                row.ref_logprobs = logps
        if critic is not None:
            for row, value in zip(rows, self.gather(self.critic, critic), strict=True):
                row.values = value
        return total, metrics

    def spread(self, group, method: str, prompts: list, rows: list[Row], *args) -> list:
        """Split `rows` over the group's workers; one call each with a RowsShare of them (ObjectRefs,
        or values in-process)."""
        world, micro = group.world_size, self.spec.trainer.micro_batch_size
        size = -(-len(rows) // world)
        share = functools.partial(RowsShare, micro_batch_size=micro, temperature=self.online.temperature)
        return [group.call(w, method, share(prompts, rows[w * size:(w + 1) * size]), *args)
                for w in range(len(share_sizes(len(rows), world)))]

    @staticmethod
    def gather(group, calls: list) -> list:
        return [item for part in group.get(calls) for item in part]

    def update(self, prompts: list, rows: list[Row]) -> dict:
        """online.epochs passes over online.mini_batches mini-batches: one optimizer step of the
        policy (and critic) each, shares over the workers, micro-batches within."""
        generator = torch.Generator().manual_seed(self.spec.trainer.seed * 1000 + self.step)
        policy_sums, critic_sums, grad_norms = [], [], []
        kind = "policy_kl" if self.name in GROUP_BASELINES else "policy"  # else the KL is in the reward
        groups = groups_of([row.request for row in rows])  # a prompt's rows stay together (the group forward)
        for _ in range(self.online.epochs):
            order = torch.randperm(len(groups), generator=generator).tolist()
            size = -(-len(groups) // self.online.mini_batches)
            for start in range(0, len(groups), size):
                mini = [rows[i] for g in order[start:start + size] for i in groups[g]]
                tokens = float(sum(len(row.logprobs) for row in mini))
                shares = self.shares(self.policy, prompts, mini, kind, equal=self.spec.trainer.strategy == "deepspeed")
                policy = self.policy.map("train_step", shares, [None] * len(shares), [tokens] * len(shares))
                critic = []
                if self.critic is not None:
                    shares = self.shares(self.critic, prompts, mini, "values")
                    critic = self.critic.map("train_step", shares, [tokens] * len(shares))
                results = self.policy.get(policy)
                policy_sums += [s for r in results for s in r["sums"]]
                grad_norms.append(results[0]["grad_norm"])
                if critic:
                    critic_sums += [s for r in self.critic.get(critic) for s in r["sums"]]
        out = {f"train/{k}": v for k, v in finish_metrics(policy_sums).items() if k not in ("examples", "tokens")}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out.update({f"critic/{k}": v for k, v in finish_metrics(critic_sums).items() if k != "examples"})
        return out

    def shares(self, group, prompts: list, rows: list[Row], kind: str, equal: bool = False) -> list[RowsShare]:
        """Rows split evenly over the group's workers, each a RowsShare it collates into micro-batches
        (a worker may get none). `equal`: every worker runs as many micro-batches as the busiest one
        (DeepSpeed runs collectives in each forward and backward); the missing ones are a copy of a
        row with no label, which adds no loss, no gradient and no metric."""
        world, micro = group.world_size, self.spec.trainer.micro_batch_size
        size = -(-len(rows) // world)  # contiguous: a prompt's rows (adjacent) share a worker but at the cuts
        parts = [rows[w * size:(w + 1) * size] for w in range(world)]
        most = max(-(-len(part) // micro) for part in parts) if equal else 0
        return [RowsShare(prompts, part or rows[:1], micro, kind, pad_to=most, blank=not part,
                          temperature=self.online.temperature) for part in parts]

    def shutdown(self) -> None:
        if self.stream is not None:
            self.stream.close()
        groups = (self.policy, self.reference, self.rollout, self.reward_model, self.critic, self.judge)
        for group in {id(g): g for g in groups if g is not None}.values():
            group.shutdown()
        self.data.close()


def start_judging(judge, prompts: list, rows: list[Row], settings) -> list:
    """Ray tasks that send the rows to the judge (vlrlhf.rewards.judge), rows_per_task each;
    they fetch the prompts and their images themselves. 0 CPUs: they wait on the network."""
    import ray

    from vlrlhf.rewards.judge import judge_rows

    task = ray.remote(num_cpus=0, max_retries=0)(judge_rows)
    size, options = judge.rows_per_task, judge.model_dump()
    starts = range(0, len(rows), size)
    return ([task.remote(RowsShare(prompts, rows[start:start + size], size), settings, options) for start in starts],
            [len(rows[start:start + size]) for start in starts])


def finish_judging(judge, calls: list, sizes: list[int], wait: bool = False) -> tuple[torch.Tensor, int]:
    """(N,) scaled scores, `fallback` where a request failed for good, and how many did. `wait`
    (the judge's actor group): the calls get judge.timeout_s together, from here (the other rewards
    are in by then); a call past it fails its share of `sizes[i]` rows, the step goes on with
    fallback scores and the late answer is dropped."""
    import ray

    scores, deadline = [], time.monotonic() + judge.timeout_s
    for call, size in zip(calls, sizes, strict=True):
        if not isinstance(call, ray.ObjectRef):  # an in-process judge (resources.judge.num_workers 0)
            scores += call
        elif wait and not ray.wait([call], timeout=max(deadline - time.monotonic(), 0.0))[0]:
            scores += [None] * size
        else:
            scores += ray.get(call)
    failed = sum(score is None for score in scores)
    return torch.tensor([judge.fallback if s is None else s for s in scores], dtype=torch.float32), failed


def share_sizes(count: int, world: int) -> list[int]:
    """The sizes of the non-empty contiguous shares `spread` makes of `count` rows."""
    size = -(-count // world)
    return [len(range(count)[w * size:(w + 1) * size]) for w in range(world) if range(count)[w * size:(w + 1) * size]]


def local_judge(online) -> bool:
    """The judge is a checkpoint on its own actor group (online.judge.path), not an HTTP server."""
    return online.judge is not None and online.judge.path is not None


def rows_of(samples: list[Sample]) -> list[Row]:
    """The driver's rows of sampled completions (no tensors: workers build the examples)."""
    return [Row(None, s.request, s.logprobs, truncated=s.finish_reason == "length", token_ids=s.token_ids,
                text=s.text, mask=s.mask, example_ref=s.example) for s in samples]


def run_online(spec: JobSpec, run_dir: pathlib.Path) -> dict:
    """One job; after a worker or node failure, a new one from the last checkpoint (trainer.max_failures)."""
    from jobs.recovery import run_with_recovery

    return run_with_recovery(spec, lambda attempt: OnlineJob(attempt, run_dir))
