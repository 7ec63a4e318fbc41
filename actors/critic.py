"""The critic role (PPO): a VLM with a scalar value head and its own optimizer.

    critic = ActorGroup(CriticWorker, spec.resources.critic, name="critic", args=(...))
    values = critic.get([critic.call(0, "values", micro_batches)])[0]   # (B, T) per micro-batch
    critic.map("train_step", shards, [normaliser] * world)              # one optimizer step

The critic starts from `online.critic.path` (default: the policy's model.path); a reward
model folder brings its trained head, otherwise the head is fresh. V(s_t) is read at
position t - 1, aligned with each generated token's log-prob (vlrlhf.models.value_head).
`online.critic.lora` trains LoRA adapters on the language model (and the head) instead of
every weight: a 7B critic then needs no Adam state for its backbone.
Data parallelism as the policy's: full replicas, one all-reduce of the gradients.
Checkpoints hold the critic's weights (an adapter folder with LoRA), head, optimizer,
schedule and RNG (`save` / `load_state`), so a resumed PPO run continues exactly.
"""

from __future__ import annotations

import pathlib

import torch

from actors.group import WorkerBase
from actors.common import device, load_options, load_state_file, optimizer_step, rng_state, schedule, set_rng_state
from vlrlhf.config import ModelSpec, TrainerSpec
from vlrlhf.models.batch import ModelBatch
from vlrlhf.models.value_head import load_head, save_head, token_values
from vlrlhf.training import ValueBatch, value_micro_step

STATE_FILE = "critic_state.pt"


class CriticWorker(WorkerBase):
    def __init__(self, model: ModelSpec, critic, trainer: TrainerSpec, total_steps: int):
        torch.manual_seed(trainer.seed + 1)
        path = critic.path or model.path
        self.critic, self.trainer, self.device = critic, trainer, device()
        from actors.generator import load_for_inference

        # a full checkpoint, or a reward model trained with LoRA (its adapters merged into the base)
        self.adapter, network = load_for_inference(path, model.adapter, load_options(model))
        for parameter in network.parameters():  # merged weights come back frozen
            parameter.requires_grad_(True)
        if model.freeze_vision:
            self.adapter.freeze_vision(network)
        if critic.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = critic.lora
            targets = self.adapter.lora_targets(network) if lora.targets == "auto" else lora.targets
            network = get_peft_model(network, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=targets))
        if model.gradient_checkpointing:
            network.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = network.to(self.device).train()
        self.head = load_head(path, self.model).to(self.device)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=critic.lr, weight_decay=trainer.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(trainer, total_steps))

    def setup_distributed(self, master, port, rank, world_size):
        import torch.distributed as dist

        super().setup_distributed(master, port, rank, world_size)
        if world_size > 1:
            for parameter in self.parameters:
                dist.broadcast(parameter.data, src=0)

    @torch.no_grad()
    def values(self, micro_batches: list) -> list[torch.Tensor]:
        """(B, T) values per micro-batch (RLBatch or ModelBatch), on the CPU."""
        self.model.eval()
        try:
            out = []
            for micro in micro_batches:
                micro = micro.to(self.device)
                if isinstance(micro, ModelBatch):
                    out.append(token_values(self.adapter, self.model, self.head, micro).cpu())
                else:  # RLBatch: its rows' groups pack
                    out.append(token_values(self.adapter, self.model, self.head, micro.batch, micro.groups,
                                            micro.representatives).cpu())
            return out
        finally:
            self.model.train()

    def score_rows(self, share) -> list[list[float]]:
        """V(s_t) of each row of a RowsShare (vlrlhf.rows), over its completion tokens."""
        from vlrlhf.rows import score_share

        return score_share(self.adapter, share, self.values)

    def train_step(self, micro_batches: list[ValueBatch], normaliser: float) -> dict:
        """One optimizer step over this worker's micro-batches, or a RowsShare it builds them from."""
        if not isinstance(micro_batches, list):
            from vlrlhf.rows import micro_batches as collated

            micro_batches = collated(self.adapter, micro_batches)
        sums = []
        for micro in micro_batches:
            loss, metrics = value_micro_step(self.adapter, self.model, self.head, micro.to(self.device),
                                             self.critic.value_clip, normaliser)
            loss.backward()
            sums.append(metrics)
        grad_norm = optimizer_step(self.parameters, self.world_size, self.optimizer, self.scheduler,
                                   self.trainer.max_grad_norm)
        return {"sums": sums, "grad_norm": grad_norm}

    def save(self, folder: str) -> None:
        """Rank 0: an HF folder (an adapter folder with LoRA), the value head and critic_state.pt
        (optimizer, schedule, RNG)."""
        if self.rank == 0:
            self.model.save_pretrained(folder)
            self.adapter.processor.save_pretrained(folder)
            save_head(self.head, folder)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": rng_state()}, pathlib.Path(folder) / STATE_FILE)

    def load_state(self, folder: str) -> None:
        """What `save` wrote: weights, head, optimizer, schedule, RNG."""
        from safetensors.torch import load_file

        out = pathlib.Path(folder)
        if self.critic.lora is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(out / "adapter_model.safetensors"))
        else:
            loaded = type(self.model).from_pretrained(out, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(loaded.state_dict())
        self.head.load_state_dict(load_head(out).state_dict())
        state = load_state_file(out / STATE_FILE)  # tensors and plain values only
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
