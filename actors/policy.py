"""The policy role: the trained model, its optimizer and scheduler.

Strategies: ddp (below) or DeepSpeed ZeRO-2/3 (actors.deepspeed_engine).
Verbs: `train_step(micro_batches, reference, normaliser)`, `evaluate(...)`,
`logprobs(...)` (reference = this policy with LoRA disabled), `save(dir)`,
`load_state(dir)`. Data parallelism: every worker holds a full replica; after the
micro-batches of a step, gradients are summed across workers with one all-reduce
(gloo on CPU, nccl on GPU). Losses arrive divided by the global normaliser, so the
sum is the gradient of the global mean (see vlrlhf.training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time

import torch

from actors.common import (device, load_options, load_state_file, mixed_precision, optimizer_step, rng_state,
                           schedule, set_rng_state)
from actors.group import WorkerBase, resolve
from actors.reference import reference_for_share, reference_logps
from actors.weight_sync import merged_state, send_staged, state_manifest, weight_group
from vlrlhf.config import AlgorithmSpec, ModelSpec, TrainerSpec
from vlrlhf.models.registry import load_adapter
from vlrlhf.data.pipeline import KTOBatch
from vlrlhf.data.shares import Prefetcher
from vlrlhf.rows import RowsShare, score_share
from vlrlhf.rows import micro_batches as collated
from vlrlhf.losses.preference import RunningMean
from vlrlhf.training import (dpo_micro_step, dpo_step_statistics, kto_micro_step, kto_step_reference_point,
                             move_pairs, reward_micro_step, rl_micro_step, sft_micro_step, uses_batch_statistics)

ONLINE = ("grpo", "rloo", "reinforce_pp", "ppo")


class PolicyWorker(WorkerBase):
    def __init__(self, model: ModelSpec, algorithm: AlgorithmSpec, trainer: TrainerSpec, total_steps: int,
                 online=None):
        torch.manual_seed(trainer.seed)
        self.online = online  # OnlineSpec of the online algorithms
        self.model_spec, self.algorithm, self.trainer = model, algorithm, trainer
        self.device = device()
        self.adapter = load_adapter(model.path, adapter=model.adapter, options=load_options(model))
        self.autocast_dtype = mixed_precision(model, trainer)
        options = load_options(model)
        if self.autocast_dtype is not None and model.lora is None:  # full fine-tuning: fp32 master weights
            options = dataclasses.replace(options, dtype="float32")
        network = self.adapter.load_model(options)
        if model.freeze_vision:
            self.adapter.freeze_vision(network)
        if model.lora is not None:
            from peft import LoraConfig, get_peft_model

            targets = self.adapter.lora_targets(network) if model.lora.targets == "auto" else model.lora.targets
            network = get_peft_model(network, LoraConfig(r=model.lora.r, lora_alpha=model.lora.alpha,
                                                         lora_dropout=model.lora.dropout, target_modules=targets))
        if self.autocast_dtype is not None:  # LoRA: the frozen base stays bf16, the adapters fp32
            for parameter in network.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        if model.gradient_checkpointing:
            network.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = network.to(self.device).train()
        self.head = None  # reward models: a scalar head on the VLM
        if algorithm.name == "reward":
            from vlrlhf.models.value_head import ScalarHead

            self.head = ScalarHead.create(self.model)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.parameters += list(self.head.parameters()) if self.head is not None else []
        # fused: one kernel over all parameters instead of a Python loop per tensor (CPU and CUDA)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=trainer.lr, weight_decay=trainer.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(trainer, total_steps))
        self.step = 0
        self.bco_baseline = RunningMean()  # bco_pair's delta: one per job, saved with checkpoints
        self.deepspeed = None  # DeepSpeedStrategy, built in setup_distributed (it needs the world size)
        self.prefetcher = Prefetcher()  # the next step's share, loaded while this one computes

    def setup_distributed(self, master, port, rank, world_size):
        import torch.distributed as dist

        super().setup_distributed(master, port, rank, world_size)
        if self.trainer.strategy == "deepspeed":
            from actors.deepspeed_engine import DeepSpeedStrategy

            if not dist.is_initialized():  # one worker: DeepSpeed still wants a process group,
                from actors.group import free_port  # and ZeRO puts this device's tensors through it

                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            self.deepspeed = DeepSpeedStrategy(self.model, self.optimizer, self.scheduler, self.trainer,
                                               world_size, self.model_spec.dtype,
                                               variable_steps=self.online is not None)
            if self.trainer.zero_stage == 3:  # ranks gather the same modules: a text-only batch runs the tower too
                from vlrlhf.models.vision_sync import keep_vision_in_every_forward

                keep_vision_in_every_forward(self.adapter, self.model)
        elif world_size > 1:  # identical replicas, whatever each process initialised
            for parameter in self.model.parameters():
                dist.broadcast(parameter.data, src=0)

    # ------------------------------------------------------------------ training
    def precision(self):
        """The forward's compute precision: bf16 autocast over fp32 master weights, or as loaded."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _gather(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every worker's (n_i, ...) values concatenated in rank order (the global batch's order
        when the driver gives each worker a contiguous share), and where this worker's start."""
        if self.world_size == 1:
            return values, 0
        import torch.distributed as dist

        sizes = [values.new_zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(sizes, values.new_tensor([len(values)], dtype=torch.long))
        sizes = [int(size) for size in sizes]
        padding = values.new_zeros((max(sizes) - len(values), *values.shape[1:]))
        parts = [values.new_empty((max(sizes), *values.shape[1:])) for _ in sizes]
        dist.all_gather(parts, torch.cat([values, padding]).contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:self.rank])

    def _step_statistics(self, micro_batches: list, references: list, train: bool) -> list:
        """Per micro-batch, what its loss needs from the step's global batch (a no-grad pass
        first; see vlrlhf.training): KTO's reference point, the batch-level DPO types'
        BatchStatistics, else None."""
        if self.algorithm.name == "kto":
            point = kto_step_reference_point(self.adapter, self.model, micro_batches, references, self.device,
                                             self._gather)
            return [point] * len(micro_batches)
        if uses_batch_statistics(self.algorithm):
            return dpo_step_statistics(self.adapter, self.model, micro_batches, references, self.algorithm,
                                       self.device, self._gather, self.bco_baseline, train=train)
        return [None] * len(micro_batches)

    def _micro_loss(self, micro, reference, normaliser, statistics=None):
        name = self.algorithm.name
        if name == "sft":
            return sft_micro_step(self.adapter, self.model, micro.to(self.device), self.algorithm, normaliser)
        if name in ONLINE:
            return rl_micro_step(self.adapter, self.model, micro.to(self.device), reference, self.online, normaliser)
        if name == "reward":
            return reward_micro_step(self.adapter, self.model, self.head, move_pairs(micro, self.device),
                                     self.algorithm, normaliser)
        if name == "dpo":
            return dpo_micro_step(self.adapter, self.model, move_pairs(micro, self.device), reference,
                                  self.algorithm, normaliser, statistics)
        moved = {}  # the completion and its mismatched twin share their pixels
        batch = KTOBatch(micro.completions.to(self.device, moved=moved), micro.mismatched.to(self.device, moved=moved),
                         micro.desirable)
        return kto_micro_step(self.adapter, self.model, batch, reference, self.algorithm, normaliser, statistics)

    def _from_share(self, share, normaliser: float | None, upcoming=None) -> tuple[list, list | None, float, dict]:
        """A Share of pipeline rows -> collated micro-batches, their reference log-probs, the
        global normaliser (token-mean SFT: label tokens summed over every worker) and what the
        driver logs: the largest order key consumed (its resume point) and the seconds this step
        waited for its rows to be fetched, unpickled and collated (part of time/data_wait_s).
        `upcoming`: the next step's share, loaded in the background meanwhile."""
        started = time.perf_counter()
        loaded = self.prefetcher.load(share, self.adapter)
        logged = {"last_key": loaded.last_key, "load_s": time.perf_counter() - started}
        self.prefetcher.start(upcoming, self.adapter)
        micro_batches = loaded.micro_batches
        reference = reference_for_share(self, share, micro_batches, loaded.chunks, loaded.values)
        if normaliser is None:  # this worker's weight, summed over the data-parallel group
            # on the collective's device: NCCL takes CUDA tensors only
            total = torch.tensor([loaded.weight], dtype=torch.float64, device=self.device)
            if self.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
            normaliser = float(total.item())
        return micro_batches, reference, normaliser, logged

    def train_step(self, micro_batches, reference, normaliser: float | None, upcoming=None) -> dict:
        """One optimizer step over this worker's micro-batches (or its Share of the step's
        pipeline rows; `upcoming`: the next step's share, to load while this one computes);
        returns metric sums."""
        logged = {}
        if isinstance(micro_batches, RowsShare):  # online: rollout rows, built and collated here
            micro_batches = collated(self.adapter, micro_batches)
        elif not isinstance(micro_batches, list):
            micro_batches, reference, normaliser, logged = self._from_share(micro_batches, normaliser, upcoming)
        return self._train_step(micro_batches, reference, normaliser) | logged

    def _train_step(self, micro_batches: list, reference, normaliser: float) -> dict:
        reference = resolve(reference)
        references = reference if reference is not None else [None] * len(micro_batches)
        sums = []
        with self.precision():
            statistics = self._step_statistics(micro_batches, references, train=True)
        if self.deepspeed is not None:
            self.deepspeed.check_boundary(len(micro_batches))
            for micro, ref, stats in zip(micro_batches, references, statistics, strict=True):
                self.deepspeed.before_forward()
                loss, metrics = self._micro_loss(micro, ref, normaliser, stats)
                self.deepspeed.backward(loss)
                sums.append(metrics)
            self.step += 1
            return {"sums": sums, "grad_norm": self.deepspeed.grad_norm(), "lr": self.scheduler.get_last_lr()[0]}
        for micro, ref, stats in zip(micro_batches, references, statistics, strict=True):
            with self.precision():
                loss, metrics = self._micro_loss(micro, ref, normaliser, stats)
            loss.backward()
            sums.append(metrics)
        grad_norm = optimizer_step(self.parameters, self.world_size, self.optimizer, self.scheduler,
                                   self.trainer.max_grad_norm)
        self.step += 1
        return {"sums": sums, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self, micro_batches, reference) -> dict:
        """Metric sums of the objective on held-out micro-batches, or a Share (no update)."""
        if not isinstance(micro_batches, list):
            micro_batches, reference, _, _ = self._from_share(micro_batches, 1.0)
        reference = resolve(reference)
        references = reference if reference is not None else [None] * len(micro_batches)
        self.model.eval()
        try:
            with self.precision():
                statistics = self._step_statistics(micro_batches, references, train=False)
                sums = [self._micro_loss(micro, ref, 1.0, stats)[1]
                        for micro, ref, stats in zip(micro_batches, references, statistics, strict=True)]
        finally:
            self.model.train()
        return {"sums": sums}

    def score_rows(self, share: RowsShare) -> list[list[float]]:
        """Reference log-probs (LoRA disabled) of each row of a RowsShare, over its completion tokens."""
        return score_share(self.adapter, share, self.logprobs)

    @torch.no_grad()
    def logprobs(self, micro_batches: list) -> list:
        """Reference log-probs from this policy with its LoRA adapters disabled."""
        self.model.eval()
        try:
            with self.model.disable_adapter(), self.precision():
                return reference_logps(self.adapter, self.model, micro_batches, self.device)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ state
    def save(self, folder: str, trainer_state: dict) -> None:
        """Rank 0 writes an HF folder (adapter folder for LoRA) plus the training state;
        with DeepSpeed every rank also writes its partition of the engine state."""
        out = pathlib.Path(folder)
        state = {"step": self.step, "rng": rng_state(), "bco_baseline": self.bco_baseline.state_dict(),
                 **trainer_state}
        full_weights = None
        if self.deepspeed is not None:  # collectives: every rank takes part
            full_weights = self.deepspeed.full_state_dict()
            self.deepspeed.save(folder)
        else:
            state |= {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.rank != 0:
            return
        self.model.save_pretrained(out, state_dict=full_weights)
        self.adapter.processor.save_pretrained(out)
        if self.head is not None:
            from vlrlhf.models.value_head import save_head

            save_head(self.head, out)
        torch.save(state, out / "trainer_state.pt")

    def load_state(self, folder: str) -> dict:
        """Weights, optimizer, scheduler and RNG from a checkpoint; returns its trainer state."""
        out = pathlib.Path(folder)
        state = load_state_file(out / "trainer_state.pt")  # tensors and plain values only
        if self.deepspeed is not None:  # weights, optimizer and schedule from the engine's own files
            self.deepspeed.load(folder)
        elif self.model_spec.lora is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(out / "adapter_model.safetensors"))
        else:
            loaded = type(self.model).from_pretrained(out, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(loaded.state_dict())
        if self.head is not None:
            from vlrlhf.models.value_head import load_head

            self.head.load_state_dict(load_head(out).state_dict())
        if self.deepspeed is None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if "bco_baseline" in state:  # checkpoints written before it was kept start from an empty mean
            self.bco_baseline.load_state_dict(state["bco_baseline"])
        set_rng_state(state["rng"])
        return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng", "bco_baseline")}

    def sync_state(self) -> dict:
        """The tensors a rollout engine must refresh (rank 0; the others return {}); every
        rank calls it (ZeRO-3 gathers). See actors.weight_sync.merged_state."""
        return merged_state(self.model, self.rank, self.deepspeed, dtype=getattr(torch, self.model_spec.dtype))

    def stage_weights(self) -> list:
        """weight_sync=collective, every rank: take the sync state (left on the device the
        broadcast sends from); rank 0 returns its manifest."""
        self.outgoing = merged_state(self.model, self.rank, self.deepspeed, dtype=getattr(torch, self.model_spec.dtype),
                                     to_cpu=False)
        return state_manifest(self.outgoing)

    def send_weights(self, host: str, port: int, world_size: int) -> int:
        """Broadcast the staged tensors to the rollout workers (ranks 1..) of the weight group."""
        if getattr(self, "weight_group", None) is None:
            self.weight_group = weight_group(host, port, 0, world_size)
        sent, self.outgoing = send_staged(self.weight_group, self.outgoing, self.device), {}
        return sent

    def trainable_state(self) -> dict:
        """name -> tensor of every trainable parameter (tests and weight sync)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def frozen_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if not p.requires_grad}
