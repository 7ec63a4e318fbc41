"""JobSpec: one YAML file describes one job. Validated up front, before Ray starts.

    spec = load_spec("configs/demo_dpo.yaml", ["trainer.max_steps=2", "algorithm.beta=0.2"])

Overrides are `dotted.key=value`, the value parsed as YAML (`a.b=[1, 2]`, `x=null`).
Unknown keys and wrong types are errors that name the key and the allowed values.
Relative paths in the spec resolve against the spec file's folder.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlrlhf.rewards.judge import RUBRIC as JUDGE_RUBRIC


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(Section):
    r: int = Field(16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Literal["auto"] | list[str] = "auto"  # auto: the language model's linear layers


class ModelSpec(Section):
    path: str
    adapter: str | None = None  # 'package.module:Class' for a family vlrlhf does not ship
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # a pair's (or a group's) image and prompt once, answers attending to them through a
    # shared-prefix mask: flash attention cannot take the mask, so with packing the training
    # roles run `flash_attention_2` as SDPA (said at start); false: separate forwards, attention as given
    packing: bool = True
    trust_remote_code: bool = False
    freeze_vision: bool = True
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    # the processor's from_pretrained options: image resolution per family, e.g. Qwen2/2.5-VL
    # {min_pixels: 200704, max_pixels: 1003520} (resize into the range; transformers >= 5.23
    # spells it size: {shortest_edge: .., longest_edge: ..}), LLaVA-NeXT
    # {image_grid_pinpoints: [[336, 672], ...]} (the tiling grid)
    processor: dict[str, Any] = {}


class DataSpec(Section):
    format: str
    train: list[str]
    eval: list[str] = []  # separate held-out files; else eval_fraction of train
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    image_root: str | None = None  # default: the first train file's folder
    max_length: int = Field(2048, gt=0)
    # A record over max_length after image expansion is never cut (vlrlhf.data.fit): resize
    # lowers its images' pixels until it fits, skip makes it a bad record (too_long), raise
    # stops the job naming it.
    image_overflow: Literal["resize", "skip", "raise"] = "resize"
    max_pixels: int = Field(40_000_000, gt=0)
    on_bad_record: Literal["raise", "skip"] = "raise"
    format_options: dict[str, Any] = {}
    # CPUs for the pipeline's window readers and warm encoders (Ray Data actors). They run
    # outside the actor groups' placement groups, so at least one CPU must be left free by
    # them: checked against the cluster before anything starts (jobs.common.pipeline_budget).
    pipeline_cpus: int = Field(1, ge=1)
    # Object-store memory the pipeline's blocks may hold ahead of the trainer (MiB); default
    # 256 for offline jobs (encoded rows), 16 for online prompt streams (records: small blocks,
    # and the driver keeps Ray Data's metadata for every block queued; jobs.common).
    pipeline_memory_mb: int | None = Field(None, ge=16)
    # The seeded order shuffles read units, then records inside windows of at least this many
    # records (vlrlhf.data.order); one window's records are held by one reader at a time.
    shuffle_window: int = Field(1024, ge=1)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value


class MDPOSpec(Section):
    """mDPO (Wang+ 2024): an image-conditional preference and a reward anchor."""

    image_weight: float = Field(1.0, ge=0)
    anchor: float = 0.0
    anchor_weight: float = Field(1.0, ge=0)
    keep: tuple[float, float] = (0.01, 0.2)  # area fraction the corrupting crop keeps

    @field_validator("keep")
    @classmethod
    def _fractions(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"keep={list(value)} must be [low, high] with 0 < low <= high <= 1")
        return value


class AlgorithmSpec(Section):
    name: Literal["sft", "dpo", "kto", "reward", "grpo", "rloo", "reinforce_pp", "ppo"]
    loss_type: str | list[str] | dict[str, float] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cDPO-style eps of the types that take it
    gamma: float = 0.5  # SimPO margin
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO
    sft_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    ddpo_gamma: float | None = Field(None, gt=0)  # DDPO: corrected tokens weigh gamma (RLHF-V: 5)
    mdpo: MDPOSpec | None = None
    center_coef: float = Field(0.0, ge=0)  # reward: coef * (r_chosen + r_rejected)^2 keeps scores centred

    @field_validator("loss_type", mode="before")
    @classmethod
    def _renamed_loss_types(cls, value):
        """Deprecated names (aot_pair) warn once here and are stored under the new name."""
        from vlrlhf.losses.preference import DEPRECATED, normalise_loss_types

        named = [value] if isinstance(value, str) else value
        if isinstance(named, (list, dict)) and any(old in named for old in DEPRECATED):
            renamed = normalise_loss_types(value)
            return next(iter(renamed)) if isinstance(value, str) else \
                list(renamed) if isinstance(value, list) else renamed
        return value

    @model_validator(mode="after")
    def _loss_options(self):
        """Options the chosen objective would not use are errors, not silently ignored."""
        from vlrlhf.losses.preference import BATCH_LEVEL, check_loss_options, normalise_loss_types

        if self.name != "dpo" and (self.ddpo_gamma is not None or self.mdpo is not None):
            raise ValueError("algorithm.ddpo_gamma and algorithm.mdpo are options of algorithm.name=dpo")
        defaults = {"loss_type": "sigmoid", "label_smoothing": 0.0, "gamma": 0.5}
        unused = [key for key, default in defaults.items() if getattr(self, key) != default]
        if self.name != "dpo" and unused:
            raise ValueError(f"algorithm.{unused[0]} is an option of algorithm.name=dpo, not {self.name}")
        unused = [key for key in ("desirable_weight", "undesirable_weight") if getattr(self, key) != 1.0]
        if self.name != "kto" and unused:
            raise ValueError(f"algorithm.{unused[0]} is an option of algorithm.name=kto, not {self.name}")
        if self.name == "dpo":
            try:
                weights = normalise_loss_types(self.loss_type)
                check_loss_options(weights, label_smoothing=self.label_smoothing, gamma=self.gamma)
            except ValueError as error:
                raise ValueError(f"algorithm.{error}") from None
            batch_level = [t for t in weights if t in BATCH_LEVEL]
            if batch_level and self.mdpo is not None:
                raise ValueError(f"algorithm.mdpo does not combine with the batch-level loss_type "
                                 f"{batch_level[0]!r}")
        return self


class RewardTermSpec(Section):
    function: str  # a built-in (exact_match, multiple_choice, numeric, ...) or 'package.module:function'
    weight: float = 1.0
    options: dict[str, Any] = {}
    on_error: Literal["raise", "fallback"] = "raise"
    fallback: float = 0.0
    timeout_s: float | None = Field(60.0, gt=0)  # per call; a call past it fails its batch's samples


class ToolSpec(Section):
    """A tool the policy may call in a multi-turn rollout (vlrlhf.tools): a built-in or a function."""

    builtin: Literal["zoom", "crop"] | None = None
    function: str | None = None  # 'package.module:function', called as function(images, **arguments)
    name: str | None = None  # what the model calls it (default: the built-in's or the function's name)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.builtin is None) == (self.function is None):
            raise ValueError("online.tools: each tool names exactly one of builtin or function")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"online.tools: function {self.function!r} must be 'package.module:function'")
        return self


class RewardModelSpec(Section):
    path: str  # a checkpoint of algorithm.name=reward (HF folder + value_head.safetensors)
    weight: float = 1.0


class JudgeRewardSpec(Section):
    """A VLM judge shown each prompt's images (vlrlhf.rewards.judge): an OpenAI-compatible API
    (base_url + model), or a checkpoint (path) served by its own actor group (resources.judge)."""

    base_url: str | None = None
    model: str | None = None  # the served model's name (base_url)
    path: str | None = None  # a local VLM checkpoint, hosted by resources.judge (actors/judge.py)
    engine: Literal["transformers", "vllm"] = "transformers"  # path: the judge's engine
    # path: generate a greedy reply and read 'Score: N' from it; expected: the probability-weighted
    # mean of the score tokens after "Score:" (one forward, never unparseable; transformers engine)
    scoring: Literal["generate", "expected"] = "generate"
    api_key_env: str | None = None  # the variable's name, never the key
    weight: float = 1.0
    rubric: str = JUDGE_RUBRIC
    min_score: float = 0.0
    max_score: float = 10.0
    fallback: float = Field(0.0, ge=0, le=1)  # the scaled score of a sample whose request failed for good
    timeout_s: float = Field(60.0, gt=0)  # HTTP: per request; path: for all of a step's shares together
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(8, gt=0)  # requests in flight per task
    max_tokens: int = Field(256, gt=0)
    cache: str | None = None  # a JSONL file of replies (per node)
    rows_per_task: int = Field(64, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # path: requests per forward
    max_model_len: int = Field(4096, gt=0)  # path with engine vllm
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # path with engine vllm

    @model_validator(mode="after")
    def _range(self):
        if self.max_score <= self.min_score:
            raise ValueError(f"online.judge: max_score={self.max_score} must exceed min_score={self.min_score}")
        for field in ("question", "completion"):
            if "{" + field + "}" not in self.rubric:
                raise ValueError(f"online.judge.rubric must contain {{{field}}}")
        if (self.base_url is None) == (self.path is None):
            raise ValueError("online.judge needs either base_url (an OpenAI-compatible server, with model) or "
                             "path (a checkpoint served by resources.judge), not both")
        if self.base_url is not None and self.model is None:
            raise ValueError("online.judge.base_url needs model (the served model's name)")
        if self.scoring == "expected" and (self.path is None or self.engine != "transformers"):
            raise ValueError("online.judge.scoring=expected reads the score tokens' probabilities: it needs path "
                             "with engine transformers")
        if self.scoring == "expected" and not (float(self.min_score).is_integer() and
                                               float(self.max_score).is_integer()):
            raise ValueError("online.judge.scoring=expected needs whole min_score and max_score (the score tokens)")
        return self


class DynamicSamplingSpec(Section):
    """DAPO's dynamic sampling (grpo, rloo): sample more prompts until the step holds
    prompts_per_step groups whose rewards are not all equal, or max_rounds rollouts were made."""

    max_rounds: int = Field(3, ge=1)  # rollouts per step at most, the first included


class CriticSpec(Section):
    """PPO's value model: a VLM with a scalar head and its own optimizer."""

    path: str | None = None  # default: model.path; a reward model's folder brings its trained head
    lr: float = Field(1e-5, gt=0)
    value_clip: float | None = Field(0.2, gt=0)  # None: the plain squared error
    lora: LoraSpec | None = None  # adapters on the language model (and the head) instead of every weight


ONLINE_ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "ppo")


class OnlineSpec(Section):
    """Online RL (ppo, grpo, rloo, reinforce_pp): sampling, rewards and the policy-gradient update."""

    engine: Literal["transformers", "vllm"] = "transformers"
    n: int = Field(4, ge=2)  # samples per prompt (the group)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(32, gt=0)
    max_model_len: int = Field(1024, gt=0)  # vLLM; with tools, the longest episode (both engines)
    tensor_parallel_size: int = Field(1, gt=0)  # vLLM: GPUs per engine (resources.rollout.gpus to match)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # vLLM: share of each GPU for weights + KV cache
    prompts_per_step: int = Field(8, gt=0)
    rewards: list[RewardTermSpec] = []  # rule functions, weighted; and/or a reward model
    reward_model: RewardModelSpec | None = None
    judge: JudgeRewardSpec | None = None  # a VLM judge that sees the images (HTTP or an actor group)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)  # > clip_low: DAPO's clip-higher
    # sequence: GSPO's one ratio per completion (geometric mean of its tokens'), clipped whole;
    # the paper clips at 3e-4 / 4e-4 (clip_low / clip_high)
    importance_ratio: Literal["token", "sequence"] = "token"
    kl_coef: float = Field(0.0, ge=0)  # grpo/rloo: KL in the loss (k3); reinforce_pp/ppo: in the reward (k1)
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # None: k3 in the loss, k1 in the reward
    truncated: Literal["keep", "mask"] = "keep"  # mask: no loss on completions cut at max_tokens (DAPO)
    reinforce_baseline: bool = False  # reinforce_pp: subtract the group mean (REINFORCE++-baseline)
    advantage_scale: Literal["group", "batch", "none"] = "group"  # GRPO std; none: Dr. GRPO
    skip_equal_groups: bool = True  # groups whose rewards are all equal carry no signal
    dynamic_sampling: DynamicSamplingSpec | None = None  # DAPO: refill the step with informative groups
    epochs: int = Field(1, gt=0)  # passes over each rollout batch
    mini_batches: int = Field(1, gt=0)  # optimizer steps per pass
    gamma: float = Field(1.0, ge=0, le=1)  # ppo: GAE discount
    lam: float = Field(0.95, ge=0, le=1)  # ppo: GAE lambda
    critic: CriticSpec = CriticSpec()  # ppo
    async_rollout: bool = False  # one step off: rollout t+1 overlaps training step t
    weight_sync: Literal["object_store", "collective"] = "object_store"  # collective: gloo/NCCL broadcast
    # multi-turn rollouts: the model calls these tools (<tool_call>{json}</tool_call>), reads their
    # results, and goes on, for at most max_turns assistant turns (actors/episodes.py)
    tools: list[ToolSpec] = []
    max_turns: int = Field(1, ge=1)
    tool_timeout_s: float = Field(10.0, gt=0)  # per turn's calls, run as Ray tasks

    @model_validator(mode="after")
    def _some_reward(self):
        if not self.rewards and self.reward_model is None and self.judge is None:
            raise ValueError("online needs rewards (functions), a reward_model or a judge (any of them together)")
        return self

    @model_validator(mode="after")
    def _tools(self):
        if self.max_turns > 1 and not self.tools:
            raise ValueError(f"online.max_turns={self.max_turns} needs online.tools (a turn follows a tool call)")
        if self.tools and self.max_turns < 2:
            raise ValueError("online.tools needs online.max_turns >= 2 (the turn after a tool call)")
        names = [tool.name or tool.builtin or tool.function.rsplit(":", 1)[-1] for tool in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"online.tools: two tools share a name ({', '.join(names)}); set `name`")
        if self.tools and self.async_rollout:
            raise ValueError("online.tools with async_rollout is not supported: the saved next-step samples "
                             "cannot carry the episodes' examples")
        return self


class GroupSpec(Section):
    num_workers: int = Field(1, ge=0)  # 0: run in the driver process, no Ray actor
    gpus: float = Field(0.0, ge=0)  # per worker
    cpus: float = Field(1.0, ge=0)  # per worker
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    colocate: Literal["policy"] | None = None  # share the policy's bundles (worker i on bundle i)
    # custom Ray resources per bundle, to pin a role to a kind of node (KubeRay: rayStartParams
    # resources); a colocated role lives in the policy's bundles and adds none of its own
    custom_resources: dict[str, float] = {}


class ResourcesSpec(Section):
    policy: GroupSpec = GroupSpec()
    reference: GroupSpec = GroupSpec(num_workers=0)
    rollout: GroupSpec = GroupSpec(num_workers=0)
    reward: GroupSpec = GroupSpec(num_workers=0)  # the reward model (online.reward_model)
    critic: GroupSpec = GroupSpec(num_workers=0)  # ppo
    judge: GroupSpec = GroupSpec()  # online.judge.path's engines (0: in the driver)
    # memory per GPU the plan checks the roles against (vlrlhf plan; jobs.plan_memory); None: 80
    gpu_memory_gb: float | None = Field(None, gt=0)


class ReferenceSpec(Section):
    # separate: a reference group loads model.path (or `path`); policy: the policy with
    # its LoRA adapters disabled; precomputed: a reference group scores every pair once
    # before training and is released (DPO); none: reference-free losses (SimPO, CPO, ORPO, SFT).
    mode: Literal["separate", "policy", "precomputed", "none"] = "separate"
    path: str | None = None


class TrainerSpec(Section):
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(1e-5, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = 1.0
    batch_size: int = Field(8, gt=0)  # global: examples (pairs) per optimizer step
    micro_batch_size: int = Field(8, gt=0)  # per worker per forward; accumulation fills the rest
    max_steps: int | None = Field(None, gt=0)
    epochs: int = Field(1, gt=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # steps; 0: only at the end
    log_every: int = Field(1, gt=0)
    # Cluster runtime (docs/cluster.md). max_failures as Ray Train's FailureConfig: after a worker
    # or node failure the job restarts from its last complete checkpoint this many times (-1: always).
    max_failures: int = Field(0, ge=-1)
    placement_timeout_s: float = Field(1800.0, gt=0)  # a group waits this long for its bundles (autoscaling)
    placement_report_s: float = Field(30.0, gt=0)  # while waiting, what is missing is printed this often
    collective_timeout_s: float = Field(600.0, gt=0)  # all-reduce & co. fail after this when a peer is lost


class CheckpointSpec(Section):
    dir: str = "runs/checkpoints"
    every: int = Field(0, ge=0)  # steps; 0: by time only (every_minutes) and at the end
    every_minutes: float = Field(30.0, ge=0)  # also save once this long passed since the last save; 0: off
    keep_last: int = Field(2, gt=0)
    resume: str = "auto"  # auto | off | a checkpoint folder

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_words(cls, value):
        # YAML reads a bare off / no / false as False (and on / yes / true as True), in files and in
        # `checkpoint.resume=off` overrides alike: take them as the words they were meant to be
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value


class TrackingSpec(Section):
    # Logs go to the run folder (`vlrlhf run --run-dir`, default runs/NAME): metrics.jsonl
    # always, tensorboard/ or wandb/ beside it, curves.png at the end.
    kind: Literal["jsonl", "tensorboard", "wandb"] = "jsonl"
    project: str = "vlrlhf"
    offline: bool = True  # wandb without a network


class EvaluationSpec(Section):
    """Benchmarks to run on the final checkpoint and, with every_steps, during training
    (see docs/evaluation.md)."""

    benchmarks: list[str]
    data: str  # a folder of VLMEvalKit TSVs
    limit: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    judge: dict[str, Any] | None = None  # the eval spec's judge section
    rules: Literal["official", "vlmevalkit"] = "official"  # scoring rules (docs/evaluation.md)
    # also every N steps, on that step's checkpoint, logged as bench/<name> beside the training
    # metrics (jobs.benchmarks); the step's checkpoint is written for it if checkpoint.every is not due
    every_steps: int | None = Field(None, gt=0)
    # the generator actors (Ray Data); num_workers 0 generates in the driver, which needs no
    # free CPU or GPU while the training roles hold theirs
    resources: GroupSpec = GroupSpec(num_workers=1)

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, value):
        from vlrlhf.eval.benchmarks import BENCHMARKS

        unknown = [name for name in value if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(BENCHMARKS))}")
        return value


class JobSpec(Section):
    name: str = "job"
    model: ModelSpec
    data: DataSpec
    algorithm: AlgorithmSpec
    resources: ResourcesSpec = ResourcesSpec()
    reference: ReferenceSpec = ReferenceSpec()
    trainer: TrainerSpec = TrainerSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    tracking: TrackingSpec = TrackingSpec()
    evaluation: EvaluationSpec | None = None
    online: OnlineSpec | None = None

    @model_validator(mode="after")
    def _consistent(self):
        online = self.algorithm.name in ONLINE_ALGORITHMS
        if online != (self.online is not None):
            raise ValueError("the online section is required by algorithm.name=ppo|grpo|rloo|reinforce_pp, and "
                             "only by them")
        if self.algorithm.name == "reward" and self.trainer.strategy != "ddp":
            raise ValueError("algorithm.name=reward trains with trainer.strategy=ddp (the scalar head sits "
                             "outside a DeepSpeed engine)")
        workers = max(self.resources.policy.num_workers, 1)
        if self.trainer.batch_size % workers:
            raise ValueError(f"trainer.batch_size={self.trainer.batch_size} must divide evenly over "
                             f"resources.policy.num_workers={workers}")
        if self.algorithm.name == "kto" and self.trainer.batch_size < 2:
            # z_ref is a mean over the whole step's mismatched pairs (all micro-batches and workers),
            # so micro-batches of any size work; one pair in a step is no estimate.
            raise ValueError("algorithm.name=kto needs trainer.batch_size >= 2 (KTO's KL reference point is a "
                             "mean over the step's mismatched pairs)")
        for role in ("reference", "rollout", "reward", "critic", "judge"):
            group = getattr(self.resources, role)
            if group.colocate and (group.num_workers != self.resources.policy.num_workers or group.num_workers == 0):
                raise ValueError(f"resources.{role}.colocate=policy needs num_workers equal to "
                                 f"resources.policy.num_workers (>= 1), got {group.num_workers}")
        if self.resources.policy.colocate:
            raise ValueError("resources.policy.colocate: the policy owns the bundles others colocate on")
        if self.online is not None and self.online.dynamic_sampling is not None:
            if self.algorithm.name not in ("grpo", "rloo"):
                raise ValueError("online.dynamic_sampling refills a step with groups whose rewards differ, which "
                                 "only the group baselines use (algorithm.name=grpo or rloo)")
            if self.online.async_rollout:
                raise ValueError("online.dynamic_sampling samples more prompts after a step's rewards are in, while "
                                 "online.async_rollout has already sent the next step's prompts: use one of them")
        rollout = self.resources.rollout
        tensor_parallel = self.online.tensor_parallel_size if self.online is not None else 1
        if (self.online is not None and self.online.engine == "vllm" and rollout.gpus > 0 and not rollout.colocate
                and (rollout.gpus >= 1 or tensor_parallel > 1) and rollout.gpus != tensor_parallel):
            raise ValueError(f"resources.rollout.gpus={rollout.gpus:g} must equal online.tensor_parallel_size="
                             f"{self.online.tensor_parallel_size}: each vLLM engine shards over the GPUs of its own "
                             "bundle")
        if (self.online is not None and self.online.weight_sync == "collective" and rollout.colocate
                and max(rollout.gpus, self.resources.policy.gpus) > 0):
            raise ValueError("online.weight_sync=collective with resources.rollout.colocate=policy would put a "
                             "policy rank and an engine rank of one NCCL group on the same GPU, which NCCL "
                             "refuses; use online.weight_sync=object_store for colocated engines")
        if self.resources.reference.num_workers not in (0, self.resources.policy.num_workers):
            raise ValueError("resources.reference.num_workers must be 0 (in the driver) or equal to "
                             f"resources.policy.num_workers={self.resources.policy.num_workers}")
        if self.reference.mode == "precomputed" and self.algorithm.name != "dpo":
            raise ValueError("reference.mode=precomputed is for algorithm.name=dpo (KTO's KL pairs change with "
                             "the data order; SFT has no reference)")
        if self.reference.mode == "policy" and self.model.lora is None and self.algorithm.name not in ("sft",
                                                                                                        "reward"):
            raise ValueError("reference.mode=policy needs model.lora (the reference is the policy with its "
                             "adapters disabled); use reference.mode=separate for full fine-tuning")
        return self


class SpecError(ValueError):
    """A bad job spec: one message naming the key and what is allowed."""


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "literal_error":
            message = f"must be one of {item['ctx']['expected']} (got {item['input']!r})"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise SpecError(f"override {override!r} must look like key.sub=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            raise SpecError(f"override {override!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def _resolve(path: str | None, base: pathlib.Path) -> str | None:
    if path is None or "://" in path or path.startswith("hf:") or pathlib.Path(path).is_absolute():
        return path
    return str((base / path).resolve())


def _tiny(path: str) -> str:
    """'tiny:<family>': a tiny random checkpoint, built on first use (demos, tests)."""
    if not path.startswith("tiny:"):
        return path
    from vlrlhf.models.tiny import ensure_tiny_model

    try:
        return str(ensure_tiny_model(path))
    except ValueError as error:
        raise SpecError(str(error)) from None


def load_spec(path: str | pathlib.Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a spec; paths become absolute (relative to the file)."""
    spec_path = pathlib.Path(path)
    if not spec_path.is_file():
        from vlrlhf.bundle import bundled_spec

        shipped = bundled_spec(spec_path)  # configs/X.yaml outside a checkout: the copy that ships
        if shipped is None:
            raise SpecError(f"job spec {spec_path} does not exist")
        print(f"{spec_path} is not in {pathlib.Path.cwd()}: using the spec that ships with vlrlhf, {shipped}",
              file=sys.stderr)
        spec_path = shipped
    try:
        data = yaml.safe_load(spec_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"{spec_path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{spec_path}: a job spec is a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_error(error, str(spec_path))) from None
    here = spec_path.resolve().parent
    given = {override.partition("=")[0] for override in overrides}

    def base_for(key: str) -> pathlib.Path:
        """Paths written in the file resolve against its folder; paths given on the command line
        (overrides) against the working directory, as a shell user expects."""
        return pathlib.Path.cwd() if key in given or key.rsplit(".", 1)[0] in given else here

    spec.model.path = _resolve(_tiny(spec.model.path), base_for("model.path"))
    spec.data.train = [_resolve(p, base_for("data.train")) for p in spec.data.train]
    spec.data.eval = [_resolve(p, base_for("data.eval")) for p in spec.data.eval]
    spec.data.image_root = _resolve(spec.data.image_root, base_for("data.image_root")) or str(
        pathlib.Path(spec.data.train[0]).parent)
    spec.reference.path = _resolve(spec.reference.path, base_for("reference.path"))
    if spec.online is not None:
        if spec.online.reward_model is not None:
            spec.online.reward_model.path = _resolve(spec.online.reward_model.path,
                                                     base_for("online.reward_model.path"))
        spec.online.critic.path = _resolve(spec.online.critic.path, base_for("online.critic.path"))
        if spec.online.judge is not None and spec.online.judge.path is not None:
            spec.online.judge.path = _resolve(_tiny(spec.online.judge.path), base_for("online.judge.path"))
    spec.checkpoint.dir = _resolve(spec.checkpoint.dir, pathlib.Path.cwd())
    if spec.evaluation is not None:
        spec.evaluation.data = _resolve(spec.evaluation.data, base_for("evaluation.data"))
    return spec


def check_inputs(spec: JobSpec) -> None:
    """Files the job needs exist: fail before any Ray start."""
    model = pathlib.Path(spec.model.path)
    if "://" not in spec.model.path:
        if not (model / "config.json").is_file():
            raise SpecError(f"model.path={spec.model.path}: no config.json there")
        if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
            raise SpecError(f"model.path={spec.model.path}: no weights (*.safetensors) there")
    if spec.evaluation is not None and not pathlib.Path(spec.evaluation.data).exists():
        raise SpecError(f"evaluation.data={spec.evaluation.data}: no such folder")
    from vlrlhf.data.sources import expand_sources

    for key, paths in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        try:
            expand_sources(paths)  # listings and Parquet footers only
        except ValueError as error:
            raise SpecError(f"{key}: {error}") from None
